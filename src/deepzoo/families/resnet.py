"""`resnet`: what took CNNs past the lecture's two-conv design, a small residual network with batch norm
(He et al. 2016), trained with a modern recipe.

A full-resolution stem conv → stages of residual blocks (each halves the map and widens it) → global
average pooling → Dense 10. The recipe's parts are params: shift-and-flip augmentation, label smoothing,
a large batch with a warm-up + cosine ("onecycle") schedule, an exponential moving average of the weights, and
test-time flip averaging.

Its trained trunk (`residual.trunk`) is where the scenes families start.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from deepzoo.config import Section, Width
from deepzoo.engine.stages import Variant
from deepzoo.engine.trainer import Batch
from deepzoo.families import classifier
from deepzoo.families.classifier import EXPERIMENT, evaluate  # noqa: F401 - the family contract
from deepzoo.families.residual import trunk


class ModelConfig(Section):
    widths: list[Width] = Field(min_length=1)  # channels per stage; each stage halves the map: 14×14, 7×7, 4×4, …
    blocks: int = Field(ge=1)  # residual blocks per stage
    shift: int = Field(ge=0, le=8)  # training augmentation: random shifts of up to this many pixels, and flips
    label_smoothing: float = Field(ge=0, lt=1)
    flip_tta: bool  # evaluation averages the logits of each image and its mirror image


class TrainConfig(classifier.ClassifierTrainConfig):
    warmup: float = Field(gt=0, lt=1)  # the recipe's warm-up and weight average are its own choices: no defaults
    ema: float | None = Field(gt=0, lt=1)
    mixed_precision: bool  # the recipe's own choice: its accuracy was measured in float32 (params.yaml)


class Config(Section):
    model: ModelConfig
    train: TrainConfig
    evaluate: classifier.EvaluateConfig


class ResNet(classifier.ImageClassifier):
    def __init__(self, cfg: ModelConfig, classes: int = 10):
        super().__init__()
        self.cfg, self.label_smoothing = cfg, cfg.label_smoothing
        self.trunk = trunk(cfg.widths, cfg.blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cfg.widths[-1], classes))
        # oneDNN's CPU convolutions, like tensor cores, run fastest on channels-last tensors (1.6× here).
        self.to(memory_format=torch.channels_last)

    def prepare(self, batch: Batch) -> Batch:
        images, labels = super().prepare(batch)
        if self.training and self.cfg.shift:
            images = classifier.shift_and_flip(images, self.cfg.shift)
        return images, labels

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.trunk(x))
        if self.cfg.flip_tta and not self.training:
            logits = (logits + self.head(self.trunk(x.flip(-1)))) / 2
        return logits


def variants(cfg: Config) -> dict[str, Variant]:
    return classifier.single_variant("resnet", ResNet(cfg.model))

