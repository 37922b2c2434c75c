"""What the lectures write by hand: activations with their derivatives, and a dense layer."""

from deepzoo.layers.dense import ACTIVATIONS, Activation, Dense

__all__ = ["ACTIVATIONS", "Activation", "Dense"]
