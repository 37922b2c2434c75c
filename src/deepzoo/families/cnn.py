"""`cnn`: lecture 3's convolutional classifier; its architecture is also FID's feature extractor (`embed_images`).

Default = the lecture's model: Conv 32 3×3 → ReLU → MaxPool 2 → Conv 64 3×3 → ReLU → MaxPool 2 →
Flatten → Dense 1024 → ReLU → Dense 10. Params switch on batch norm, dropout, width and augmentation.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from pydantic import Field
from torch import Tensor, nn

from deepzoo.config import Section, Width
from deepzoo.data import fashion_mnist
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch
from deepzoo.families import classifier
from deepzoo.storage import save_figure

EXPERIMENT = classifier.EXPERIMENT


class ModelConfig(Section):
    filters: tuple[Width, Width]  # feature maps of the two conv layers: the "depth" of each volume
    dense: int = Field(ge=1)
    batch_norm: bool
    dropout: float = Field(ge=0, lt=1)  # before the last dense layer
    augment: bool  # random shifts of up to 2 pixels and horizontal flips while training


class TrainConfig(classifier.ClassifierTrainConfig):
    ema: float | None = Field(gt=0, lt=1)  # the recipe's weight average is its own choice: no default


class Config(Section):
    model: ModelConfig
    train: TrainConfig
    evaluate: classifier.EvaluateConfig


def conv_block(inputs: int, outputs: int, batch_norm: bool) -> nn.Sequential:
    """Convolution → non-linearity → pooling: filters slide over the image, ReLU, then downsample by 2."""
    norm = [nn.BatchNorm2d(outputs)] if batch_norm else []
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3), *norm, nn.ReLU(), nn.MaxPool2d(2))


class CNN(classifier.ImageClassifier):
    def __init__(self, cfg: ModelConfig, classes: int = 10):
        super().__init__()
        self.cfg = cfg
        first, second = cfg.filters
        # 28×28 → conv 26×26 → pool 13×13 → conv 11×11 → pool 5×5
        self.features_2d = nn.Sequential(conv_block(1, first, cfg.batch_norm), conv_block(first, second, cfg.batch_norm))
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(second * 5 * 5, cfg.dense), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.dense, classes))

    def prepare(self, batch: Batch) -> Batch:
        images, labels = super().prepare(batch)
        if self.training and self.cfg.augment:
            images = classifier.shift_and_flip(images, max_shift=2)
        return images, labels

    def features(self, x: Tensor) -> Tensor:
        """The penultimate layer (Dense 1024 after ReLU): the embedding FID compares."""
        return self.dense(self.features_2d(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def variants(cfg: Config) -> dict[str, Variant]:
    return classifier.single_variant("cnn", CNN(cfg.model))


def evaluate(ctx: Context) -> dict[str, float]:
    metrics = classifier.evaluate(ctx)
    model, test = ctx.variants["cnn"].model, ctx.variants["cnn"].data["test"]
    save_figure(ctx.out / "filters.png", filters_figure(model))
    save_figure(ctx.out / "feature_maps.png", feature_maps_figure(model, test[0][:1].to(ctx.device)))
    return metrics


def filters_figure(model: CNN) -> plt.Figure:
    weights = model.features_2d[0][0].weight.detach().cpu()[:, 0]  # [32, 3, 3]
    fig, axes = plt.subplots(4, len(weights) // 4, figsize=(len(weights) // 4, 4.4))
    for ax, kernel in zip(axes.flat, weights, strict=False):
        ax.imshow(kernel, cmap="gray")
        ax.axis("off")
    fig.suptitle("First-layer filters (3×3)")
    return fig


def feature_maps_figure(model: CNN, image: Tensor) -> plt.Figure:
    """The input and the first conv layer's feature maps (after ReLU) for one test image."""
    x = fashion_mnist.to_unit(image)
    maps = model.features_2d[0][:-1](x)[0].cpu()  # conv → (bn) → ReLU, before pooling: [32, 26, 26]
    fig, axes = plt.subplots(4, len(maps) // 4 + 1, figsize=(len(maps) // 4 + 1, 4.4))
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(x[0, 0].cpu(), cmap="gray")
    axes[0, 0].set_title("input", fontsize=7)
    for ax, fmap in zip(axes[:, 1:].flat, maps, strict=False):
        ax.imshow(fmap, cmap="viridis")
    fig.suptitle("Feature maps of the first convolution")
    return fig
