"""The lecture's recurrent neural network, written out.

    h_t = g(W_hhᵀ h_{t−1} + W_xhᵀ x_t)   the cell: the same weights at every time step
    ŷ_t = W_hyᵀ h_t                      the output head, a separate dense layer (`Dense`)

Weights are stored as [in, out] like `Dense`, so Wᵀx for a column vector x is x @ W for a row batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from deepzoo.layers.dense import ACTIVATIONS

CELL_ACTIVATIONS = ("tanh", "relu")


class RecurrentCell(nn.Module):
    """One step: h_t = g(W_hhᵀ h_{t−1} + W_xhᵀ x_t + b).

    `identity_init` starts W_hh at the identity with zero biases (Le et al. 2015, "IRNN"): at first the
    state is carried forward nearly unchanged, so gradients through time do not vanish. Le et al. pair it
    with ReLU, whose unbounded state can blow up the first updates (clip gradients); tanh keeps it bounded.
    """

    def __init__(self, input_size: int, hidden_size: int, activation: str = "tanh", identity_init: bool = False):
        super().__init__()
        if activation not in CELL_ACTIVATIONS:
            raise ValueError(f"activation must be one of {CELL_ACTIVATIONS}, got {activation!r}")
        self.hidden_size = hidden_size
        self.activation = ACTIVATIONS[activation]
        # Weights ~ N(0, σ²) with σ = 1/√fan-in, as in `Dense`.
        self.W_xh = nn.Parameter(torch.randn(input_size, hidden_size) / math.sqrt(input_size))
        random_hh = torch.randn(hidden_size, hidden_size) / math.sqrt(hidden_size)
        self.W_hh = nn.Parameter(torch.eye(hidden_size) if identity_init else random_hh)
        self.b = nn.Parameter(torch.zeros(hidden_size))  # zero in both cases, as identity init asks

    def input_projection(self, x: Tensor) -> Tensor:
        """W_xhᵀ x_t + b, for one step or, with x [B, T, in], for all steps at once."""
        return x @ self.W_xh + self.b

    def step(self, projected_x: Tensor, h: Tensor) -> Tensor:
        return self.activation.g(projected_x + h @ self.W_hh)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """x [B, in], h [B, hidden] → h_t [B, hidden]."""
        return self.step(self.input_projection(x), h)


class Recurrent(nn.Module):
    """The cell unrolled over a sequence: x [B, T, in] → (states [B, T, hidden], last state [B, hidden])."""

    def __init__(self, input_size: int, hidden_size: int, activation: str = "tanh", identity_init: bool = False):
        super().__init__()
        self.cell = RecurrentCell(input_size, hidden_size, activation, identity_init)

    def forward(self, x: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if h is None:
            h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        # W_xhᵀ x_t does not depend on h, so one matrix product covers every step; only W_hhᵀ h_{t−1}
        # must wait for the previous step.
        projected = self.cell.input_projection(x)  # [B, T, hidden]
        states = []
        for t in range(x.shape[1]):
            h = self.cell.step(projected[:, t], h)
            states.append(h)
        return torch.stack(states, dim=1), h
