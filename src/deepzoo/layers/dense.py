"""The perceptron's pieces as the lecture notes write them.

    ŷ = g(w₀ + Σ xᵢ wᵢ)      one neuron: a weighted sum, a bias, a non-linearity g
    z = x W + b,  ŷ = g(z)   a dense layer: many neurons side by side
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Activation:
    """A non-linearity g and its derivative g′, written, as in the notes, in terms of z or g(z)."""

    name: str
    g: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]  # g′(z)


def _sigmoid_derivative(z: Tensor) -> Tensor:
    g = torch.sigmoid(z)
    return g * (1 - g)


ACTIVATIONS = {
    "sigmoid": Activation("sigmoid", torch.sigmoid, _sigmoid_derivative),  # g′ = g(1 − g)
    "tanh": Activation("tanh", torch.tanh, lambda z: 1 - torch.tanh(z) ** 2),  # g′ = 1 − g²
    "relu": Activation("relu", lambda z: torch.clamp(z, min=0), lambda z: (z > 0).to(z.dtype)),  # g′ = 1 if z > 0
    "linear": Activation("linear", lambda z: z, torch.ones_like),  # stacking these stays linear
}


class Dense(nn.Module):
    """z = x W + b, then g: the dense layer written out (W is [in, out], so no transpose)."""

    def __init__(self, in_features: int, out_features: int, activation: str = "linear", init_std: float | None = None):
        super().__init__()
        # Weights ~ N(0, σ²) as in the lecture; σ = 1/√in keeps z's scale stable from layer to layer.
        std = init_std if init_std is not None else 1 / math.sqrt(in_features)
        self.W = nn.Parameter(torch.randn(in_features, out_features) * std)
        self.b = nn.Parameter(torch.zeros(out_features))
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.activation.g(x @ self.W + self.b)
