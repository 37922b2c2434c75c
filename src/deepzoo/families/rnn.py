"""`rnn`: a character model of folk tunes on the lecture's recurrent cell, written out in `layers/recurrent.py`.

Embedding → h_t = g(W_hhᵀ h_{t−1} + W_xhᵀ x_t) → ŷ_t = W_hyᵀ h_t. Against exploding gradients: clipping
(`train.clip_grad_norm`); against vanishing ones: W_hh initialised to the identity (`model.identity_init`),
with g = tanh or ReLU (`model.activation`).
"""

from __future__ import annotations

from typing import Literal

from deepzoo.engine.stages import Variant
from deepzoo.families import sequence
from deepzoo.families.sequence import EXPERIMENT, evaluate, generate  # noqa: F401 - the family contract
from deepzoo.layers import Recurrent


class ModelConfig(sequence.ModelConfig):
    activation: Literal["tanh", "relu"]
    identity_init: bool  # W_hh = I and zero biases at the start (Le et al. 2015)


class Config(sequence.Config):
    model: ModelConfig


def variants(cfg: Config) -> dict[str, Variant]:
    m = cfg.model
    core = Recurrent(m.embedding_dim, m.hidden_size, m.activation, m.identity_init)
    return sequence.single_variant("rnn", cfg, core)
