"""`rcnn`: object detection by classifying region proposals one by one (R-CNN, Girshick et al. 2014; lecture 3).

The lecture's pipeline, in three steps that know nothing of each other:
1. Region proposals, by a heuristic with nothing learned: windows of every width × height slide over the image and
   are ranked by how well they frame some foreground, i.e. every border strip touches it and they hold most of
   what lies in a ring around them. The best `proposals_per_image` windows go on.
2. Every proposal, with a margin of context, is cropped and warped to a fixed square and classified by a CNN into
   10 classes + background: `resnet`'s trunk, started from the trained classifier as R-CNN started from ImageNet's,
   then global pooling; the same CNN regresses one box refinement per class (class-specific bounding-box
   regression). Trained on crops: proposals with IoU ≥ `positive_iou` with a ground-truth box (and the ground
   truth itself) are that box's class, those below `background_iou` background, a quarter positives per scene.
   As the paper's fine-tuned network, the softmax scores the crops (no per-class SVMs).
3. Per class, the refined boxes of the scores above a threshold go through non-maximum suppression.
The cost is step 2: a full CNN pass per proposal, hundreds per image, where Faster R-CNN shares one pass.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from deepzoo.config import Section, TrainConfig, Width
from deepzoo.data import fashion_mnist, scenes
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, Trainable
from deepzoo.families.residual import Backbone, fold_batch_norm
from deepzoo.metrics import detection
from deepzoo.ops.detection import (
    batched_nms,
    clip_boxes,
    decode_boxes,
    region_targets,
    roi_align,
    sample_labels,
    training_regions,
    truth_iou,
)

EXPERIMENT = scenes.EXPERIMENT
CLASSES = len(fashion_mnist.CLASSES)
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # refinements are small offsets: scaled to about unit variance


class ModelConfig(Section):
    window_sizes: tuple[Width, ...] = Field(min_length=1)  # window sides, px: every width with every height
    window_stride: float = Field(gt=0, le=1)  # step between windows, as a fraction of their side
    foreground: int = Field(ge=0, le=254)  # a pixel brighter than this belongs to some garment
    ring: float = Field(gt=0)  # the margin around a window (fraction of its side) whose foreground it should hold
    edge: float = Field(gt=0, le=0.5)  # width of the four border strips (fraction of the side) that must touch it
    proposals_per_image: int = Field(ge=1)  # best-ranked windows that are classified
    context: float = Field(ge=0)  # margin warped along with each proposal, as a fraction of its side
    crop: int = Field(ge=4)  # side of the warped square
    backbone: Backbone  # the crop classifier's trunk, before global pooling
    rois_per_scene: int = Field(ge=2)  # crops sampled per training scene
    positive_fraction: float = Field(gt=0, lt=1)  # of them at most this share object crops
    positive_iou: float = Field(gt=0, le=1)  # a proposal this close to a ground-truth box is that object
    background_iou: float = Field(gt=0, le=1)  # one below this is background; in between, not trained on

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.background_iou > self.positive_iou:
            raise ValueError(f"background_iou ({self.background_iou}) must be <= positive_iou ({self.positive_iou})")
        return self


class EvaluateConfig(Section):
    score_threshold: float = Field(ge=0, lt=1)  # detections below this score are dropped
    nms: float = Field(gt=0, le=1)  # per-class IoU above which a lower-scored detection is suppressed
    max_detections: int = Field(ge=1, le=100)  # COCO counts at most 100 per image
    figure_scenes: int = Field(ge=1)


class Config(Section):
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig


@cache
def sliding_windows(height: int, width: int, sizes: tuple[int, ...], stride: float) -> Tensor:
    """Integer boxes [N, 4] of every width × height in `sizes`, from edge to edge of the image at about `stride` of
    their side apart."""
    windows = []
    for w in (s for s in sizes if s <= width):
        for h in (s for s in sizes if s <= height):
            xs = torch.linspace(0, width - w, int((width - w) / (stride * w)) + 2).round().unique()
            ys = torch.linspace(0, height - h, int((height - h) / (stride * h)) + 2).round().unique()
            y, x = torch.meshgrid(ys, xs, indexing="ij")
            windows.append(torch.stack([x, y, x + w, y + h], -1).reshape(-1, 4))
    return torch.cat(windows).long()


def box_sums(integral: Tensor, boxes: Tensor) -> Tensor:
    """Sums [B, N] of each image's pixels inside integer `boxes` [N, 4], from integral images [B, H + 1, W + 1]."""
    x1, y1, x2, y2 = boxes.T
    row = integral.shape[2]
    corners = torch.cat([y2 * row + x2, y1 * row + x2, y2 * row + x1, y1 * row + x1])
    # one index_select of the flat images: 5× faster than indexing [B, y, x] four times
    bottom_right, top_right, bottom_left, top_left = integral.flatten(1).index_select(1, corners).chunk(4, 1)
    return bottom_right - top_right - bottom_left + top_left


def grow(boxes: Tensor, fraction: float, height: int, width: int) -> Tensor:
    """Integer `boxes` widened by `fraction` of their size (at least a pixel) on each side, within the image."""
    margin = ((boxes[:, 2:] - boxes[:, :2]) * fraction).round().long().clamp(min=1).repeat(1, 2)
    return clip_boxes(boxes + margin * torch.tensor([-1, -1, 1, 1], device=boxes.device), height, width)


def propose(images: Tensor, cfg: ModelConfig) -> Tensor:
    """The `proposals_per_image` best windows [B, K, 4] of images uint8 [B, H, W]: deterministic, no learning.

    A window frames an object when each of its four border strips touches foreground and it holds most of the
    foreground of a ring around it; windows equal on that are ranked by how full they are. At the defaults this
    finds 98.6% of the val split's ground-truth boxes at IoU ≥ 0.5 with 300 proposals per image (97.7% with 200).
    """
    height, width = images.shape[1:]
    windows = sliding_windows(height, width, cfg.window_sizes, cfg.window_stride).to(images.device)
    integral = F.pad((images > cfg.foreground).float().cumsum(1).cumsum(2), (1, 0, 1, 0))  # exact up to 2^24 px
    inside = box_sums(integral, windows)
    size = windows[:, 2:] - windows[:, :2]
    fill = inside / size.prod(1)
    held = inside / box_sums(integral, grow(windows, cfg.ring, height, width)).clamp(min=1)
    strip = (size * cfg.edge).round().long().clamp(min=1)
    x1, y1, x2, y2 = windows.T
    strips = (torch.stack([x1, y1, x1 + strip[:, 0], y2], 1), torch.stack([x2 - strip[:, 0], y1, x2, y2], 1),
              torch.stack([x1, y1, x2, y1 + strip[:, 1]], 1), torch.stack([x1, y2 - strip[:, 1], x2, y2], 1))
    touches = torch.stack([box_sums(integral, s) for s in strips]).amin(0) > 0
    score = touches * held + 0.01 * fill  # fill only breaks ties: it never outranks a better frame
    best = score.topk(min(cfg.proposals_per_image, len(windows)), dim=1, sorted=True).indices
    return windows[best].float()


class RCNN(Trainable):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.chance_accuracy = 1 - cfg.positive_fraction  # calling every crop background
        self.trunk = cfg.backbone.build()
        self.features = nn.Sequential(self.trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        width = cfg.backbone.widths[-1]
        self.classify = nn.Linear(width, CLASSES + 1)  # 0 = background
        self.box_deltas = nn.Linear(width, CLASSES * 4)
        # Channels-last from the start, as the trainer trains it: detection 1.4× faster here, as fast as this CNN goes.
        self.to(memory_format=torch.channels_last)

    def warp(self, images: Tensor, boxes: Tensor, index: Tensor) -> Tensor:
        """Crops [N, 1, crop, crop] of `boxes` [N, 4] (with their context) of images uint8 [B, H, W]."""
        margin = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2) * self.cfg.context
        widened = boxes + margin * torch.tensor([-1, -1, 1, 1], device=boxes.device)
        return roi_align(images[:, None].float().div(255), widened, index, self.cfg.crop, 1.0)

    def sample(self, images: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Training regions of scenes uint8 [B, H, W] with boxes [B, M, 4] and labels [B, M] (−1 = none): boxes
        [N, 4], the scene of each [N], its class [N] (0 = background) and the deltas [N, 4] onto its nearest object.

        A proposal is its nearest object's class at IoU ≥ `positive_iou`, background below `background_iou`;
        `rois_per_scene` of them per scene, up to `positive_fraction` objects, drawn with torch's global generator.
        """
        regions, roles, nearest = training_regions(propose(images, self.cfg), gt_boxes, gt_labels,
                                                   self.cfg.positive_iou, self.cfg.background_iou)
        chosen = torch.stack([sample_labels(role, self.cfg.rois_per_scene, self.cfg.positive_fraction,
                                            torch.default_generator) >= 0 for role in roles])
        return region_targets(regions, chosen, roles, nearest, gt_boxes, gt_labels, BOX_WEIGHTS)

    def prepare(self, batch: Batch) -> Batch:
        """Scenes → their sampled regions' crops [N, 1, crop, crop], classes [N] and box deltas [N, 4]."""
        images = batch[0]
        rois, scene, classes, targets = self.sample(*batch)
        return self.warp(images, rois, scene), classes, targets

    def example_input(self, data: Batch) -> Tensor:
        """The warped ground-truth boxes of the first scene: what the logged classifier takes."""
        images, boxes, labels = (t[:1] for t in data)
        present = labels[0] >= 0
        return self.warp(images, boxes[0][present], torch.zeros(int(present.sum()), dtype=torch.long))

    def outputs(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits [N, 11] and per-class box deltas [N, 10, 4] of crops [N, 1, crop, crop]."""
        hidden = self.features(crops)
        return self.classify(hidden), self.box_deltas(hidden).reshape(len(hidden), CLASSES, 4)

    def forward(self, crops: Tensor) -> Tensor:
        """Crops [N, 1, crop, crop] in [0, 1] → class logits [N, 11], 0 = background."""
        return self.outputs(crops)[0]

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        crops, classes, targets = batch
        logits, deltas = self.outputs(crops)
        objects = classes > 0
        class_loss = F.cross_entropy(logits, classes)
        box_loss = F.smooth_l1_loss(deltas[objects, classes[objects] - 1], targets[objects], reduction="sum",
                                    beta=1.0) / len(classes)
        return class_loss + box_loss, {"class_loss": class_loss, "box_loss": box_loss,
                                       "accuracy": (logits.argmax(1) == classes).float().mean()}

    @torch.no_grad()
    def detect(self, images: Tensor, cfg: EvaluateConfig) -> list[detection.Detections]:
        """Each image of uint8 [B, H, W]: every proposal classified, refined per class, thresholded, per-class NMS."""
        height, width = images.shape[1:]
        proposals = propose(images, self.cfg)  # [B, K, 4]
        count = proposals.shape[1]
        index = torch.arange(len(images), device=images.device).repeat_interleave(count)
        logits, deltas = self.outputs(self.warp(images, proposals.reshape(-1, 4), index))
        scores = logits.softmax(1)[:, 1:].reshape(len(images), -1)  # [B, K · 10]: proposal-major, class-minor
        boxes = decode_boxes(proposals[:, :, None], deltas.reshape(len(images), count, CLASSES, 4), BOX_WEIGHTS)
        boxes = clip_boxes(boxes, height, width).reshape(len(images), -1, 4)  # [B, K · 10, 4], as the scores
        labels = torch.arange(CLASSES, device=images.device).repeat(count)
        found = []
        for image_boxes, image_scores in zip(boxes, scores, strict=True):
            kept = torch.where(image_scores >= cfg.score_threshold)[0]
            kept = kept[batched_nms(image_boxes[kept], image_scores[kept], labels[kept], cfg.nms)[: cfg.max_detections]]
            found.append(detection.Detections(image_boxes[kept].cpu(), image_scores[kept].cpu(), labels[kept].cpu(),
                                              count))
        return found


def variants(cfg: Config) -> dict[str, Variant]:
    data = {split: scenes.detection_tensors(scenes.load(split)) for split in scenes.SPLITS}
    model = RCNN(cfg.model)
    return {"rcnn": Variant(model, data, cfg.model.backbone.warm_start(model.trunk, model.classify))}


def proposal_recall(truth: dict[str, Tensor], cfg: ModelConfig, iou: float = 0.5, batch_size: int = 100) -> float:
    """The share of ground-truth boxes with a proposal at IoU ≥ `iou`: what no classifier can recover is lost here."""
    images, boxes, labels = scenes.detection_tensors(truth)
    found = 0
    for start in range(0, len(images), batch_size):
        chunk = slice(start, start + batch_size)
        best = truth_iou(propose(images[chunk], cfg), boxes[chunk], labels[chunk]).amax(1)  # [B, G]: padding −1
        found += int((best >= iou).sum())
    return found / len(truth["boxes"])


def detector(ctx: Context) -> detection.Detector:
    """The trained model as a detector of stored images, as evaluation times it: with its batch norms folded
    into its convs, as a deployed detector runs."""
    model = fold_batch_norm(ctx.variants["rcnn"].model)
    return lambda images: model.detect(images.to(ctx.device), ctx.cfg.evaluate)


def evaluate(ctx: Context) -> dict[str, float]:
    """COCO mAP, seconds and proposals per image on the test scenes, one image at a time; seconds in batches; the
    proposals' recall."""
    test = scenes.load("test")
    metrics = detection.evaluate_detector(detector(ctx), test, ctx.out, ctx.cfg.evaluate.figure_scenes)
    return metrics | {"proposal_recall_50": round(proposal_recall(test, ctx.variants["rcnn"].model.cfg), 4)}
