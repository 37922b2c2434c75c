"""`lstm`: a character model of folk tunes on `torch.nn.LSTM`, whose gates (forget, store, update, output)
let the state carry information across many steps without vanishing gradients."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from deepzoo.engine.stages import Variant
from deepzoo.families import sequence
from deepzoo.families.sequence import EXPERIMENT, evaluate, generate  # noqa: F401 - the family contract


class ModelConfig(sequence.ModelConfig):
    layers: int = Field(ge=1)  # stacked LSTMs; `dropout` also applies between them


class Config(sequence.Config):
    model: ModelConfig


def variants(cfg: Config) -> dict[str, Variant]:
    m = cfg.model
    between_layers = m.dropout if m.layers > 1 else 0.0  # nn.LSTM warns about dropout with nothing to drop between
    core = nn.LSTM(m.embedding_dim, m.hidden_size, m.layers, batch_first=True, dropout=between_layers)
    return sequence.single_variant("lstm", cfg, core)
