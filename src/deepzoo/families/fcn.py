"""`fcn`: semantic segmentation with a fully convolutional network (Long et al. 2015; lecture 3).

Every pixel of a scene gets one of 11 labels (0 = background, c + 1 = Fashion-MNIST class c). The encoder is
`resnet`'s trunk, started from the trained classifier as FCN started from ImageNet's: a full-resolution stem, then
stages that each halve the resolution, so its deepest features see whole garments: they know "what" but only
coarsely "where". A 1×1 convolution turns them into class scores, which are upsampled (bilinear) onto the next finer
level and added to that level's own scores, `skips` times (FCN-8s: the two levels above the deepest of five), then
upsampled to the input. No dense layer anywhere: the network takes a canvas of any size.
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from pydantic import Field, model_validator
from torch import Tensor, nn

from deepzoo.config import Section, TrainConfig
from deepzoo.data import fashion_mnist, scenes
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, Trainable, evaluate as mean_loss
from deepzoo.families.residual import Backbone
from deepzoo.storage import save_figure

EXPERIMENT = scenes.EXPERIMENT
LABELS = ("background", *fashion_mnist.CLASSES)


class ModelConfig(Section):
    backbone: Backbone  # the encoder: its stem at full resolution, then each stage halves H, W
    skips: int = Field(ge=0)  # finer levels whose class scores join the deepest's: 2 of 5 levels = FCN-8s
    flip: bool  # training augmentation: each scene mirrored left-right (with its mask) with probability 1/2
    fresh_scenes: bool  # training augmentation: every epoch after the first composes new scenes, as prepare_scenes did
    flip_tta: bool  # evaluation averages the logits of each scene and of its mirror image, mirrored back

    @model_validator(mode="after")
    def _levels(self) -> ModelConfig:
        if self.skips > len(self.backbone.widths):
            raise ValueError(f"skips ({self.skips}) must be below the number of encoder levels (the stem and "
                             f"{len(self.backbone.widths)} stages)")
        return self


class EvaluateConfig(Section):
    batch_size: int = Field(ge=1)
    figure_scenes: int = Field(ge=1)


class Config(Section):
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig


class FCN(Trainable):
    chance_accuracy = None  # background alone is ~80% of the pixels: accuracy says little, the IoUs say it

    def __init__(self, cfg: ModelConfig, classes: int = len(LABELS)) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = cfg.backbone.build()
        widths = (cfg.backbone.widths[0], *cfg.backbone.widths)  # the stem's and each stage's
        # A 1×1 convolution scores every pixel of a level for each class; the deepest level and `skips` finer ones.
        self.score = nn.ModuleList(nn.Conv2d(width, classes, 1) for width in reversed(widths[-1 - cfg.skips :]))
        # The finer levels' score layers start at zero, as FCN's did: training starts from the deepest level's
        # predictions (the convolutionalised classifier's, when pretrained) and each skip learns what its level adds.
        for skip in self.score[1:]:
            nn.init.zeros_(skip.weight)
            nn.init.zeros_(skip.bias)
        # Channels-last from the start, as the trainer trains it: evaluation and the served model get oneDNN's fast
        # CPU convolutions too (1.4× per step here).
        self.to(memory_format=torch.channels_last)

    def prepare(self, batch: Batch) -> Batch:
        images, masks = batch
        if self.training and self.cfg.flip:
            flip = torch.rand(len(images), 1, 1, device=images.device) < 0.5
            images, masks = torch.where(flip, images.flip(-1), images), torch.where(flip, masks.flip(-1), masks)
        return images.unsqueeze(1).float().div_(255), masks.long()

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 1, H, W] in [0, 1] → logits [B, 11, H, W]."""
        logits = self.segment(x)
        if self.cfg.flip_tta and not self.training:
            logits = (logits + self.segment(x.flip(-1)).flip(-1)) / 2
        return logits

    def segment(self, x: Tensor) -> Tensor:
        size, levels = x.shape[-2:], []
        for level in self.encoder:
            x = level(x)
            levels.append(x)
        # FCN-8s: the coarse scores know "what", finer levels' scores add "where", each upsampled onto the next.
        logits = self.score[0](levels[-1])
        for score, level in zip(self.score[1:], reversed(levels[:-1]), strict=False):
            logits = score(level) + F.interpolate(logits, size=level.shape[-2:], mode="bilinear", align_corners=False)
        # With skips down to the stem the logits already have the input's size: resizing them onto it would change
        # nothing and cost ~6 % of a training step.
        if logits.shape[-2:] == size:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        images, masks = batch
        logits = self(images)
        return F.cross_entropy(logits, masks), {"pixel_accuracy": (logits.max(1).indices == masks).float().mean()}


def variants(cfg: Config) -> dict[str, Variant]:
    data = {split: (found["images"], found["masks"]) for split in scenes.SPLITS for found in [scenes.load(split)]}
    model = FCN(cfg.model)
    redraw = fresh_scenes(len(data["train"][0])) if cfg.model.fresh_scenes else None
    return {"fcn": Variant(model, data, cfg.model.backbone.warm_start(model.encoder, model.score[0]), redraw)}


def fresh_scenes(count: int) -> Callable[[torch.Generator], Batch]:
    """(images, masks) of `count` new training scenes, drawn from a generator: an epoch's training data."""
    draw = scenes.fresh_training_scenes(count)

    def redraw(generator: torch.Generator) -> Batch:
        drawn = draw(generator)
        return drawn["images"], drawn["masks"]

    return redraw


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
