"""Residual networks' parts (He et al. 2016): the block, the trunk of `resnet`, and that trunk as the backbone the
scenes families start from.

Detectors and segmenters fine-tune a network pretrained on classification, as R-CNN, Faster R-CNN and FCN did with
ImageNet's: here the trained `resnet`, whose stem and first stages (`Backbone`) become their feature extractor.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from deepzoo import registry
from deepzoo.config import Section, Width
from deepzoo.engine import stages

CHECKPOINT = Path(registry.PRETRAINED) / "resnet.pt"  # the classifier whose trunk the scenes families start from


class FrozenBatchNorm2d(nn.Module):
    """Batch norm fixed at its trained statistics and affine, in training too: how ResNet detectors fine-tune a
    pretrained trunk on small batches (He et al. 2016; Detectron also freezes the stem and first stage). Its state
    has batch norm's keys, so a trained resnet loads into it."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ResidualBlock(nn.Module):
    """y = ReLU(F(x) + x): the block learns a residual F, so a deep stack starts near the identity and its
    gradients reach the first layers through the shortcuts."""

    def __init__(self, inputs: int, outputs: int, stride: int, norm: type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, padding=1, bias=False), norm(outputs), nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), norm(outputs))
        # Where the shape changes, the shortcut averages 2×2 cells, then a 1×1 conv projects it (ResNet-D, He et al.
        # 2019): a strided 1×1 conv would drop 3 of every 4 inputs (and crashes on 4-channel channels-last CPU tensors).
        downsample = [nn.AvgPool2d(stride, ceil_mode=True, count_include_pad=False)] if stride > 1 else []
        self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
            *downsample, nn.Conv2d(inputs, outputs, 1, bias=False), norm(outputs))

    def forward(self, x: Tensor) -> Tensor:
        return (self.residual(x) + self.shortcut(x)).relu()


def trunk(widths: tuple[int, ...] | list[int], blocks: int, frozen: int = 0) -> nn.Sequential:
    """[stem, stage 1, stage 2, …]: a full-resolution stem conv with `widths[0]` channels, then a stage per width
    of `blocks` residual blocks, the first halving the map. Level i's map has stride 2^i. The first `frozen`
    levels get no gradients and keep their batch norm statistics."""
    def norm(level: int) -> type[nn.Module]:
        return FrozenBatchNorm2d if level < frozen else nn.BatchNorm2d

    levels = [nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False), norm(0)(widths[0]), nn.ReLU())]
    for level, (inputs, width) in enumerate(zip((widths[0], *widths), widths, strict=False), 1):
        levels.append(nn.Sequential(*(ResidualBlock(inputs if block == 0 else width, width, 2 if block == 0 else 1,
                                                    norm(level)) for block in range(blocks))))
    for level in levels[:frozen]:
        level.requires_grad_(False)
    return nn.Sequential(*levels)


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """A copy of `module` for inference (eval mode) with each conv that a batch norm follows in a Sequential, as in
    the trunk and its blocks, merged with that norm into one conv: a deployed ResNet's inference, the same outputs
    to float rounding without a normalisation pass per conv. `module` itself, which trains and is logged, keeps
    its norms."""
    folded = copy.deepcopy(module).eval()
    for sequence in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(sequence) - 1):
            if isinstance(sequence[i], nn.Conv2d) and isinstance(sequence[i + 1], (nn.BatchNorm2d, FrozenBatchNorm2d)):
                sequence[i] = fuse_conv_bn_eval(sequence[i], sequence[i + 1])
                sequence[i + 1] = nn.Identity()
    return folded


class Backbone(Section):
    """The stem and first stages of `resnet`'s trunk, as a scenes family's feature extractor."""

    widths: tuple[Width, ...] = Field(min_length=1)  # channels of its stages: the start of `resnet.model.widths`
    blocks: int = Field(ge=1)  # residual blocks per stage, as `resnet.model.blocks`
    pretrained: bool  # start from the trained `resnet`'s weights (models/resnet) instead of random ones
    frozen: int = Field(ge=0)  # first levels (the stem is level 0) kept as trained: no gradients, fixed batch norm

    @model_validator(mode="after")
    def _frozen_levels_exist_and_are_trained(self) -> Backbone:
        if self.frozen > len(self.widths) + 1:
            raise ValueError(f"frozen {self.frozen} is more levels than the backbone's {len(self.widths) + 1} "
                             f"(a stem and {len(self.widths)} stages)")
        if self.frozen and not self.pretrained:
            raise ValueError(f"frozen {self.frozen} would keep randomly initialised levels: set `frozen: 0` or "
                             f"`pretrained: true`")
        return self

    def build(self) -> nn.Sequential:
        return trunk(self.widths, self.blocks, self.frozen)

    def warm_start(self, levels: nn.Sequential, scores: nn.Linear | nn.Conv2d | None = None
                   ) -> Callable[[], dict[str, str]] | None:
        """What a scenes family's `Variant.warm_start` runs: `load_pretrained` into its modules, or nothing when the
        backbone starts from random weights."""
        return (lambda: self.load_pretrained(levels, scores)) if self.pretrained else None

    def load_pretrained(self, levels: nn.Sequential, scores: nn.Linear | nn.Conv2d | None = None,
                        path: Path = CHECKPOINT) -> dict[str, str]:
        """Copy the trained `resnet`'s stem and first stages into `levels` (built by `build`) and, given the layer
        that scores background + 10 classes on the last of all its stages, its dense layer into that layer's class
        rows (background starting at zero: FCN's "convolutionalised" classifier); what was copied from which
        checkpoint, as tags for the run."""
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the scenes families start from the trained resnet, run "
                                    f"`dvc repro train@resnet` first (or set their backbone's `pretrained: false`)")
        checkpoint = stages._load_checkpoint(path, "resnet")  # an unreadable file: how to restore it
        trained, state = checkpoint["config"]["model"], checkpoint["state_dict"]
        if self.blocks != trained["blocks"] or list(self.widths) != trained["widths"][: len(self.widths)]:
            raise ValueError(f"the backbone (widths {list(self.widths)}, blocks {self.blocks}) is not the start of "
                             f"the resnet trained in {path} (widths {trained['widths']}, blocks "
                             f"{trained['blocks']}): make its widths a prefix of resnet.model.widths with the same "
                             f"blocks, or set `pretrained: false`")
        levels.load_state_dict({key.removeprefix("trunk."): value for key, value in state.items()
                                if key.startswith("trunk.") and int(key.split(".")[1]) < len(levels)})
        scores = scores if len(self.widths) == len(trained["widths"]) else None  # its features are what it scored
        if scores is not None:
            with torch.no_grad():
                scores.weight.zero_()
                scores.bias.zero_()
                scores.weight[1:] = state["head.2.weight"].view_as(scores.weight[1:])
                scores.bias[1:] = state["head.2.bias"]
        run = path.parent / "training.json"  # what `train@resnet` wrote beside it: its MLflow run
        return {"pretrained_from": str(path), "pretrained_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "pretrained_run_id": json.loads(run.read_text())["run_id"] if run.is_file() else "unknown",
                "pretrained_stages": str(len(self.widths)), "pretrained_classifier": str(scores is not None).lower()}
