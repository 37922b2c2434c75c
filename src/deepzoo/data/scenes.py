"""Fashion-MNIST scenes: garments scattered on a black canvas, for object detection and semantic segmentation.

A scene holds `min_items`–`max_items` images of one Fashion-MNIST split, each rescaled (bilinear) to a random square
of `min_size`–`max_size` pixels and placed fully inside the canvas where its box overlaps every earlier box by at
most `max_overlap` IoU; an item that finds no such place in PLACEMENT_TRIES draws is dropped (the first always
fits). Items are bright on black, so the image is their per-pixel maximum.

Output `data/processed/scenes/{train,val,test}.pt`, each a ragged batch of S scenes:
    images   uint8 [S, H, W]   the composite, H = W = canvas
    masks    uint8 [S, H, W]   0 = background, c + 1 = class c: the item that is brightest there (the one the image
                               shows; the earlier item on a tie) if it is brighter than mask_threshold, so
                               mask > 0 exactly where image > mask_threshold
    boxes    float32 [K, 4]    (x1, y1, x2, y2), tight around the item's pixels above mask_threshold, hidden ones
                               included; pixel (row i, column j) covers [j, j + 1] × [i, i + 1], as in deepzoo.ops
    labels   int64 [K]         the items' classes, 0–9
    offsets  int64 [S + 1]     scene s owns boxes[offsets[s] : offsets[s + 1]] and labels likewise
and `params.json`, the params they were composed with; `examples.png`: six training scenes with their boxes, beside
their masks.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle
from pydantic import Field, model_validator
from torch import Tensor

from deepzoo.config import Section
from deepzoo.data import fashion_mnist
from deepzoo.storage import atomic_path, save_figure

OUTPUT = Path("data/processed/scenes")
EXPERIMENT = "fashion-mnist-scenes"  # the MLflow experiment of the families trained on scenes
SPLITS = ("train", "val", "test")
PARAMS = "params.json"  # the params the scenes were composed with, for families that compose more of them
KEYS = {"images": torch.uint8, "masks": torch.uint8, "boxes": torch.float32, "labels": torch.int64,
        "offsets": torch.int64}  # fmt: skip
# Positions an item tries before it is dropped: at 1–5 items of 20–44 px on 96 px, 32 tries drop 0.01% of the items
# (8 drop 0.3%); the tries are drawn for every item, used or not, so more cost memory and time for nothing.
PLACEMENT_TRIES = 32


class SceneDataError(ValueError):
    """A scenes file (or its Fashion-MNIST source) is missing or inconsistent; the message names the file and why."""


class Params(Section):
    canvas: int = Field(ge=28, le=1024)  # scene side in pixels
    min_items: int = Field(ge=1)  # items drawn per scene, uniformly; some may be dropped as not fitting
    max_items: int = Field(ge=1, le=32)
    min_size: int = Field(ge=8)  # side of a rescaled item in pixels, uniformly in [min_size, max_size]
    max_size: int = Field(ge=8)
    max_overlap: float = Field(ge=0, le=1)  # largest IoU of a new item's box with any earlier box in its scene
    mask_threshold: int = Field(ge=0, le=254)  # an item's pixels brighter than this are its mask and box
    train_scenes: int = Field(ge=1)  # composed from training images only, like val and test from theirs
    val_scenes: int = Field(ge=1)
    test_scenes: int = Field(ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> Params:
        if self.min_items > self.max_items:
            raise ValueError(f"min_items ({self.min_items}) must be <= max_items ({self.max_items})")
        if not self.min_size <= self.max_size <= self.canvas:
            raise ValueError(f"need min_size <= max_size <= canvas, got {self.min_size}, {self.max_size}, "
                             f"{self.canvas}")
        return self


def rescale(images: Tensor, size: int) -> Tensor:
    """uint8 [N, h, w] → uint8 [N, size, size], bilinear."""
    resized = F.interpolate(images[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return resized[:, 0].round().clamp(0, 255).to(torch.uint8)


def tight_boxes(pixels: Tensor, threshold: int) -> tuple[Tensor, Tensor]:
    """Boxes [N, 4] around each item's pixels above `threshold`, in the item's own frame, and which are non-empty."""
    on = pixels > threshold
    rows, columns = on.any(2).int(), on.any(1).int()  # [N, size]
    size = pixels.shape[1]
    box = torch.stack([columns.argmax(1), rows.argmax(1), size - columns.flip(1).argmax(1),
                       size - rows.flip(1).argmax(1)], 1)  # fmt: skip
    return box.float(), rows.any(1)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU [S, T, J] of each scene's boxes a [S, T, 4] with its boxes b [S, J, 4]."""
    top_left = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    bottom_right = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = lambda boxes: (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # noqa: E731
    return intersection / (area(a)[:, :, None] + area(b)[:, None, :] - intersection)


def paste(image: np.ndarray, mask: np.ndarray, pixels: np.ndarray, x: int, y: int, label: int, threshold: int) -> None:
    """Composite one item [size, size] into a scene's image and mask [H, W] (numpy views of the tensors) at (x, y)."""
    size = len(pixels)
    region, classes = image[y : y + size, x : x + size], mask[y : y + size, x : x + size]
    # Strictly brighter wins, so the mask labels the item the max composite shows, and ties keep the earlier one.
    classes[(pixels > region) & (pixels > threshold)] = label + 1
    np.maximum(region, pixels, out=region)


def compose(images: Tensor, labels: Tensor, count: int, params: Params,
            generator: torch.Generator) -> dict[str, Tensor]:
    """`count` scenes of the images [N, h, w] and labels [N] of one split, in the layout of the module docstring."""
    S, M, C, thr = count, params.max_items, params.canvas, params.mask_threshold
    # Every draw happens up front in a fixed order, so the scenes depend only on the params and the generator.
    drawn = torch.arange(M) < torch.randint(params.min_items, M + 1, (S,), generator=generator)[:, None]  # [S, M]
    sources = torch.randint(len(images), (S, M), generator=generator)
    sizes = torch.randint(params.min_size, params.max_size + 1, (S, M), generator=generator)
    tries = torch.rand(S, M, PLACEMENT_TRIES, 2, generator=generator)  # corners as fractions of the free room
    scenes = {"images": torch.zeros(S, C, C, dtype=torch.uint8), "masks": torch.zeros(S, C, C, dtype=torch.uint8)}
    image_array, mask_array = scenes["images"].numpy(), scenes["masks"].numpy()  # views: numpy slices cost less
    boxes, kept, everyone = torch.zeros(S, M, 4), torch.zeros(S, M, dtype=torch.bool), torch.arange(S)
    for j in range(M):  # item slot j of all scenes at once (but the paste): one rescale per item size
        local, usable, groups = torch.zeros(S, 4), drawn[:, j].clone(), []
        for size in sizes[drawn[:, j], j].unique().tolist():
            at = (drawn[:, j] & (sizes[:, j] == size)).nonzero()[:, 0]
            pixels = rescale(images[sources[at, j]], size)
            local[at], usable[at] = tight_boxes(pixels, thr)
            groups.append((at, pixels))
        corners = (tries[:, j] * (C - sizes[:, j] + 1)[:, None, None]).floor()  # [S, T, (x, y)] of the square
        candidates = local[:, None] + corners.repeat(1, 1, 2)  # [S, T, 4]
        fits = ((pairwise_iou(candidates, boxes[:, :j]) <= params.max_overlap) | ~kept[:, None, :j]).all(2)
        first = fits.int().argmax(1)  # the first try that fits
        kept[:, j] = usable & fits.any(1)
        boxes[:, j] = candidates[everyone, first]
        corner = corners[everyone, first].int()
        for at, pixels in groups:
            placed = kept[at, j]
            at, pixels = at[placed], pixels[placed].numpy()
            for s, item, (x, y), label in zip(at.tolist(), pixels, corner[at].tolist(), labels[sources[at, j]].tolist(),
                                              strict=True):
                paste(image_array[s], mask_array[s], item, x, y, label, thr)
    counts = kept.sum(1)
    return {**scenes, "boxes": boxes[kept], "labels": labels[sources][kept].to(torch.int64),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])}


def garments(split: str, params: Params, source: Path = fashion_mnist.OUTPUT) -> tuple[Tensor, Tensor]:
    """The images [N, 28, 28] and labels [N] of a Fashion-MNIST split that scenes hold: every one with a pixel
    above mask_threshold. Blank images would make empty items; without them a scene's first item always shows."""
    data = fashion_mnist.load(split, source)
    visible = data["images"].amax((1, 2)) > params.mask_threshold
    if not visible.any():
        raise SceneDataError(f"{source / split}.pt: no image has a pixel above mask_threshold "
                             f"({params.mask_threshold})")
    return data["images"][visible], data["labels"][visible]


def prepare(params: Params, seed: int, output: Path = OUTPUT, source: Path = fashion_mnist.OUTPUT) -> dict[str, int]:
    counts = {"train": params.train_scenes, "val": params.val_scenes, "test": params.test_scenes}
    splits = {}
    for index, split in enumerate(SPLITS):
        # One stream per split: changing test_scenes leaves the training scenes as they were.
        generator = torch.Generator().manual_seed(seed * len(SPLITS) + index)
        splits[split] = compose(*garments(split, params, source), counts[split], params, generator)
        if (empty := splits[split]["offsets"].diff() == 0).any():
            raise SceneDataError(f"{source / split}.pt: scene {int(empty.nonzero()[0])} has no item brighter "
                                 f"than mask_threshold ({params.mask_threshold}) once rescaled")
    with atomic_path(output) as tmp:
        tmp.mkdir()
        for split, tensors in splits.items():
            torch.save(tensors, tmp / f"{split}.pt")
        (tmp / PARAMS).write_text(params.model_dump_json(indent=2))
        save_figure(tmp / "examples.png", examples_figure(splits["train"]))
    items = sum(len(t["labels"]) for t in splits.values())
    return {**{split: len(t["images"]) for split, t in splits.items()}, "items": items}


def problem(data: object) -> str | None:
    """What is wrong with a loaded scenes file, or None."""
    if not isinstance(data, dict) or set(data) != set(KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        return f"expected a dict with keys {sorted(KEYS)}, found {found}"
    for key, dtype in KEYS.items():
        if not isinstance(data[key], Tensor) or data[key].dtype != dtype:
            return f"{key} must be a {dtype} tensor, found {getattr(data[key], 'dtype', type(data[key]).__name__)}"
    images, masks, boxes, labels, offsets = (data[key] for key in KEYS)
    if images.ndim != 3 or masks.shape != images.shape:
        return f"images [S, H, W] and masks of the same shape expected, found {list(images.shape)}, {list(masks.shape)}"
    if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
        return f"boxes [K, 4] and labels [K] expected, found {list(boxes.shape)}, {list(labels.shape)}"
    if offsets.shape != (len(images) + 1,) or offsets[0] != 0 or offsets[-1] != len(boxes):
        return (f"offsets must be [S + 1] = [{len(images) + 1}] running from 0 to the {len(boxes)} boxes, found "
                f"{list(offsets.shape)} from {offsets[:1].tolist()} to {offsets[-1:].tolist()}")
    per_scene = offsets.diff()
    if (per_scene < 0).any():
        return f"offsets decrease at scene {int((per_scene < 0).nonzero()[0])}"
    if (per_scene == 0).any():
        return f"scene {int((per_scene == 0).nonzero()[0])} has no item"
    if masks.max() > len(fashion_mnist.CLASSES):
        return f"mask values must be 0 (background) to {len(fashion_mnist.CLASSES)}, found {int(masks.max())}"
    height, width = images.shape[1:]
    limits = torch.tensor([width, height, width, height])
    checks = ((~((boxes >= 0) & (boxes <= limits)).all(1), f"lies outside the {width}×{height} canvas"),  # or NaN
              ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]), "is empty (x2 <= x1 or y2 <= y1)"),
              ((labels < 0) | (labels >= len(fashion_mnist.CLASSES)), "has a label outside 0–9"))  # fmt: skip
    for bad, what in checks:
        if bad.any():
            k = int(bad.nonzero()[0])
            scene = int(torch.searchsorted(offsets, k, right=True)) - 1
            return f"box {k} (scene {scene}: {boxes[k].tolist()}, label {int(labels[k])}) {what}"
    return None


def load(split: str, root: Path = OUTPUT) -> dict[str, Tensor]:
    path = root / f"{split}.pt"
    if not path.is_file():
        raise SceneDataError(f"{path} not found: run `dvc repro prepare_scenes` first")
    try:
        data = torch.load(path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise SceneDataError(f"{path}: not a readable torch file ({err}); run `dvc repro prepare_scenes`") from None
    if (found := problem(data)) is not None:
        raise SceneDataError(f"{path}: {found}")
    return data


def fresh_training_scenes(count: int, root: Path = OUTPUT,
                          source: Path = fashion_mnist.OUTPUT) -> Callable[[torch.Generator], dict[str, Tensor]]:
    """A drawer of `count` new training scenes, composed as `prepare` composed the stored ones (its params, the
    training split's garments) from the generator it is given: a family's training data afresh every epoch."""
    path = root / PARAMS
    if not path.is_file():
        raise SceneDataError(f"{path} not found: run `dvc repro prepare_scenes` first")
    params = Params.model_validate_json(path.read_text())
    pool: tuple[Tensor, Tensor] | None = None  # loaded at the first draw: evaluation rebuilds a family, never draws

    def draw(generator: torch.Generator) -> dict[str, Tensor]:
        nonlocal pool
        pool = pool or garments("train", params, source)
        return compose(*pool, count, params, generator)

    return draw


def items(data: dict[str, Tensor], scene: int) -> tuple[Tensor, Tensor]:
    """(boxes [k, 4], labels [k]) of one scene."""
    start, end = data["offsets"][scene : scene + 2].tolist()
    return data["boxes"][start:end], data["labels"][start:end]


def detection_tensors(data: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(images [S, H, W], boxes [S, M, 4], labels [S, M]) with M the most items in a scene, the missing ones as label
    −1 and box 0: rectangular tensors, which the trainer slices into batches like any other data."""
    counts = data["offsets"].diff()
    slot = torch.arange(len(data["labels"])) - data["offsets"][:-1].repeat_interleave(counts)
    scene = torch.arange(len(counts)).repeat_interleave(counts)
    boxes = torch.zeros(len(counts), int(counts.max()), 4)
    labels = torch.full((len(counts), int(counts.max())), -1, dtype=torch.int64)
    boxes[scene, slot], labels[scene, slot] = data["boxes"], data["labels"]
    return data["images"], boxes, labels


def examples_figure(data: dict[str, Tensor], count: int = 6) -> plt.Figure:
    """The first `count` scenes, each image with its labelled boxes beside its mask, in matching class colours."""
    colors = plt.get_cmap("tab10").colors
    columns = 3
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2.2 * 2 * columns, 2.3 * rows + 0.4), squeeze=False)
    height, width = data["images"].shape[1:]
    extent = (0, width, height, 0)  # pixel edges, as the boxes are
    for s, (image_ax, mask_ax) in enumerate(zip(axes.flat[0::2], axes.flat[1::2], strict=True)):
        for ax in (image_ax, mask_ax):
            ax.axis("off")
        if s >= min(count, len(data["images"])):
            continue
        image_ax.imshow(data["images"][s].numpy(), cmap="gray", vmin=0, vmax=255, extent=extent,
                        interpolation="nearest")
        boxes, labels = items(data, s)
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
            image_ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colors[label], lw=1))
            image_ax.text(x1, y1, fashion_mnist.CLASSES[label], color="white", fontsize=5, va="bottom",
                          bbox={"facecolor": colors[label], "pad": 0.5, "linewidth": 0})
        mask_ax.imshow(data["masks"][s].numpy(), cmap=ListedColormap([(0, 0, 0), *colors]), vmin=-0.5, vmax=10.5,
                       extent=extent, interpolation="nearest")
        image_ax.set_title(f"scene {s}: {len(labels)} item{'s' * (len(labels) != 1)}", fontsize=8)
        mask_ax.set_title("mask", fontsize=8)
    handles = [Patch(color=colors[c], label=name) for c, name in enumerate(fashion_mnist.CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False, bbox_to_anchor=(0.5, -0.02))
    return fig
