"""What the lectures write by hand: activations with their derivatives, a dense layer, a recurrent cell."""

from deepzoo.layers.dense import ACTIVATIONS, Activation, Dense
from deepzoo.layers.recurrent import Recurrent, RecurrentCell

__all__ = ["ACTIVATIONS", "Activation", "Dense", "Recurrent", "RecurrentCell"]
