"""What the Fashion-MNIST classifiers (`mlp`, `cnn`) share: batches, loss, data and evaluation.

A subclass only defines `forward(x)`: x is a float batch [B, 1, 28, 28] in [0, 1], the result logits [B, 10].
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from deepzoo.config import Section
from deepzoo.data import fashion_mnist
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, Trainable, evaluate as mean_loss
from deepzoo.metrics import classification

EXPERIMENT = "fashion-mnist-classification"


class EvaluateConfig(Section):
    batch_size: int = Field(ge=1)


class ImageClassifier(Trainable):
    chance_accuracy = 1 / len(fashion_mnist.CLASSES)

    def prepare(self, batch: Batch) -> Batch:
        images, labels = batch
        return fashion_mnist.to_unit(images), labels

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = batch
        logits = self(images)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return F.cross_entropy(logits, labels), {"accuracy": accuracy}


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
