"""`fcn`: semantic segmentation with a fully convolutional network (Long et al. 2015; lecture 3).

Every pixel of a scene gets one of 11 labels (0 = background, c + 1 = Fashion-MNIST class c). An encoder of conv
blocks halves the resolution at each level, so its deepest features see whole garments: they know "what" but only
coarsely "where". A 1×1 convolution turns them into class scores, which are upsampled (bilinear) onto the next finer
level and added to that level's own scores, `skips` times (FCN-8s: the two levels above the deepest of five), then
upsampled to the input. No dense layer anywhere: the network takes a canvas of any size.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from pydantic import Field, model_validator
from torch import Tensor, nn

from deepzoo.config import Section, TrainConfig, Width
from deepzoo.data import fashion_mnist, scenes
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, Trainable, evaluate as mean_loss
from deepzoo.storage import save_figure

EXPERIMENT = scenes.EXPERIMENT
LABELS = ("background", *fashion_mnist.CLASSES)


class ModelConfig(Section):
    widths: tuple[Width, ...] = Field(min_length=2)  # channels per encoder level; each after the first halves H, W
    skips: int = Field(ge=0)  # finer levels whose class scores join the deepest's: 2 of 4 levels = FCN-8s

    @model_validator(mode="after")
    def _levels(self) -> ModelConfig:
        if self.skips >= len(self.widths):
            raise ValueError(f"skips ({self.skips}) must be below the number of levels ({len(self.widths)})")
        return self


class EvaluateConfig(Section):
    batch_size: int = Field(ge=1)
    figure_scenes: int = Field(ge=1)


class Config(Section):
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig


def conv_block(inputs: int, outputs: int) -> nn.Sequential:
    """Two 3×3 convolutions, each with batch norm and ReLU; padding keeps the size."""
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(),
                         nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU())


class FCN(Trainable):
    chance_accuracy = None  # background alone is ~80% of the pixels: accuracy says little, the IoUs say it

    def __init__(self, cfg: ModelConfig, classes: int = len(LABELS)) -> None:
        super().__init__()
        self.down = nn.ModuleList(conv_block(a, b) for a, b in zip((1, *cfg.widths), cfg.widths, strict=False))
        # A 1×1 convolution scores every pixel of a level for each class; the deepest level and `skips` finer ones.
        self.score = nn.ModuleList(nn.Conv2d(width, classes, 1) for width in reversed(cfg.widths[-1 - cfg.skips :]))
        # Channels-last from the start, as the trainer trains it: evaluation and the served model get oneDNN's fast
        # CPU convolutions too (1.4× per step here).
        self.to(memory_format=torch.channels_last)

    def prepare(self, batch: Batch) -> Batch:
        images, masks = batch
        return images.unsqueeze(1).float().div_(255), masks.long()

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 1, H, W] in [0, 1] → logits [B, 11, H, W]."""
        size, levels = x.shape[-2:], []
        for depth, block in enumerate(self.down):
            x = block(x if depth == 0 else F.max_pool2d(x, 2))
            levels.append(x)
        # FCN-8s: the coarse scores know "what", finer levels' scores add "where", each upsampled onto the next.
        logits = self.score[0](levels[-1])
        for score, level in zip(self.score[1:], reversed(levels[:-1]), strict=False):
            logits = score(level) + F.interpolate(logits, size=level.shape[-2:], mode="bilinear", align_corners=False)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        images, masks = batch
        logits = self(images)
        return F.cross_entropy(logits, masks), {"pixel_accuracy": (logits.max(1).indices == masks).float().mean()}


def variants(cfg: Config) -> dict[str, Variant]:
    data = {split: (found["images"], found["masks"]) for split in scenes.SPLITS for found in [scenes.load(split)]}
    return {"fcn": Variant(FCN(cfg.model), data)}


@torch.no_grad()
def predict(model: FCN, images: Tensor, device: torch.device, batch_size: int) -> Tensor:
    """Predicted masks uint8 [N, H, W] of stored images uint8 [N, H, W]."""
    model.eval()
    return torch.cat([model(model.prepare((chunk.to(device), chunk))[0]).max(1).indices.byte().cpu()
                      for chunk in images.split(batch_size)])


def evaluate(ctx: Context) -> dict[str, float]:
    """Pixel accuracy, IoU of every label and their mean, foreground-vs-background IoU; a figure of a few scenes."""
    from torchmetrics.classification import MulticlassJaccardIndex

    variant = ctx.variants["fcn"]
    images, masks = variant.data["test"]
    predicted = predict(variant.model, images, ctx.device, ctx.cfg.evaluate.batch_size)
    per_label, fg_bg = MulticlassJaccardIndex(len(LABELS), average="none"), MulticlassJaccardIndex(2, average="none")
    # A chunk at a time: all 2,000 scenes' pixels as int64 at once took the stage to 1.9 GB.
    for guess, truth in zip(predicted.split(ctx.cfg.evaluate.batch_size), masks.split(ctx.cfg.evaluate.batch_size),
                            strict=True):
        per_label.update(guess.long(), truth.long())
        fg_bg.update((guess > 0).long(), (truth > 0).long())
    per_class, foreground = per_label.compute(), fg_bg.compute()[1]
    scores = mean_loss(variant.model, variant.data["test"], ctx.cfg.evaluate.batch_size, ctx.device)
    with (ctx.out / "per_class_iou.csv").open("w") as f:
        f.write("class,iou\n" + "".join(f"{name},{iou:.4f}\n" for name, iou in zip(LABELS, per_class.tolist())))
    save_figure(ctx.out / "segmentations.png",
                segmentation_figure(images, masks, predicted, ctx.cfg.evaluate.figure_scenes))
    return {"mean_iou": round(per_class.mean().item(), 4), "foreground_iou": round(foreground.item(), 4),
            "pixel_accuracy": round((predicted == masks).float().mean().item(), 4),
            "test_loss": round(scores["loss"], 4)}


def segmentation_figure(images: Tensor, masks: Tensor, predicted: Tensor, count: int) -> plt.Figure:
    """Rows of test scenes: the image, its true mask, the predicted mask."""
    colors = ListedColormap([(0, 0, 0), *plt.get_cmap("tab10").colors])
    fig, axes = plt.subplots(count, 3, figsize=(6, 2 * count), squeeze=False)
    for row, (image, mask, guess) in enumerate(zip(images[:count], masks[:count], predicted[:count])):
        for ax, picture, title in zip(axes[row], (image, mask, guess), ("image", "true mask", "predicted mask")):
            ax.imshow(picture.numpy(), cmap="gray" if title == "image" else colors, vmin=0,
                      vmax=255 if title == "image" else 10, interpolation="nearest")
            ax.set_title(title if row == 0 else "", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig
