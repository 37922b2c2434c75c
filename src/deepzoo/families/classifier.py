"""What the Fashion-MNIST classifiers (`mlp`, `cnn`, `resnet`) share: batches, loss, augmentation, data and evaluation.

A subclass only defines `forward(x)`: x is a float batch [B, 1, 28, 28] in [0, 1], the result logits [B, 10].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from deepzoo.config import Section, TrainConfig
from deepzoo.data import fashion_mnist
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, Trainable
from deepzoo.engine.trainer import evaluate as mean_loss
from deepzoo.metrics import classification

EXPERIMENT = "fashion-mnist-classification"


class EvaluateConfig(Section):
    batch_size: int = Field(ge=1)


class ClassifierTrainConfig(TrainConfig):
    target_accuracy: float = Field(gt=0, le=1)  # test accuracy whose first crossing is timed (`seconds_to_target`)


class ImageClassifier(Trainable):
    chance_accuracy = 1 / len(fashion_mnist.CLASSES)
    label_smoothing = 0.0  # share of the target spread over all classes (Szegedy et al. 2016)

    def prepare(self, batch: Batch) -> Batch:
        images, labels = batch
        return fashion_mnist.to_unit(images), labels

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = batch
        logits = self(images)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing), {"accuracy": accuracy}


def shift_and_flip(images: Tensor, max_shift: int) -> Tensor:
    """Each image shifted by its own random offset of up to `max_shift` pixels (zero fill), and flipped left-right
    with probability 1/2: clothes are left-right symmetric and sit anywhere near the centre."""
    batch, _, height, width = images.shape
    flip = torch.rand(batch, 1, 1, 1, device=images.device) < 0.5
    padded = F.pad(torch.where(flip, images.flip(-1), images), (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch, 1, 1), device=images.device)
    rows = torch.arange(height, device=images.device).view(1, -1, 1) + offsets[0]  # [B, H, 1]
    cols = torch.arange(width, device=images.device).view(1, 1, -1) + offsets[1]  # [B, 1, W]
    picked = torch.arange(batch, device=images.device).view(-1, 1, 1)
    return padded[picked, 0, rows, cols].unsqueeze(1)  # one channel: [B, 1, H, W]


def single_variant(name: str, model: ImageClassifier) -> dict[str, Variant]:
    return {name: Variant(model, fashion_mnist.splits())}


def evaluate(ctx: Context) -> dict[str, float]:
    """Test loss and accuracy, the confusion matrix and per-class accuracy."""
    (variant,) = ctx.variants.values()
    test = variant.data["test"]
    scores = mean_loss(variant.model, test, ctx.cfg.evaluate.batch_size, ctx.device)
    y_pred = classification.predict(variant.model, test, ctx.device, ctx.cfg.evaluate.batch_size)
    classification.report(test[1].numpy(), y_pred, fashion_mnist.CLASSES, ctx.out)
    return {"test_accuracy": round(scores["accuracy"], 4), "test_loss": round(scores["loss"], 4)}
