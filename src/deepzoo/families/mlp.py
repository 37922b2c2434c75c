"""`mlp`: a dense network on flattened Fashion-MNIST images (lecture 1's deep neural network)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from deepzoo.config import Section, Width
from deepzoo.engine.stages import Variant
from deepzoo.families.classifier import (  # noqa: F401 - EXPERIMENT and evaluate: the family contract
    EXPERIMENT,
    ClassifierTrainConfig,
    EvaluateConfig,
    ImageClassifier,
    evaluate,
    single_variant,
)

NONLINEARITIES = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


class ModelConfig(Section):
    hidden: list[Width] = Field(min_length=1)  # neurons per hidden layer
    activation: Literal["relu", "tanh", "sigmoid", "gelu"]
    dropout: float = Field(ge=0, lt=1)


class Config(Section):
    model: ModelConfig
    train: ClassifierTrainConfig
    evaluate: EvaluateConfig


class MLP(ImageClassifier):
    def __init__(self, cfg: ModelConfig, inputs: int = 28 * 28, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]  # [B, 1, 28, 28] -> [B, 784]
        for width in cfg.hidden:
            layers += [nn.Linear(inputs, width), NONLINEARITIES[cfg.activation](), nn.Dropout(cfg.dropout)]
            inputs = width
        layers.append(nn.Linear(inputs, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def variants(cfg: Config) -> dict[str, Variant]:
    return single_variant("mlp", MLP(cfg.model))
