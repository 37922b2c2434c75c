"""`faster_rcnn`: object detection that learns its own region proposals (Ren et al. 2015; lecture 3).

R-CNN crops every heuristic proposal out of the image and runs a CNN on each. Faster R-CNN runs one conv
backbone over the whole image instead and shares its feature map between two small heads:
- the region proposal network (RPN) slides over the map and, at every cell, scores A anchor boxes (a few sizes
  and aspect ratios) as object or not and regresses each towards the object it covers;
- the detection head pools each of the best proposals' features to a fixed grid (RoI Align), runs the trunk's last
  stage on it and averages it (the ResNet "C4" design of He et al. 2016), then classifies it (10 classes +
  background) with one box refinement per class.
The trunk is `resnet`'s, started from the trained classifier as Faster R-CNN started from ImageNet's.
Both are trained together, from one loss: the RPN's (sampled anchors) plus the head's (sampled proposals).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from deepzoo.config import Section, TrainConfig
from deepzoo.data import fashion_mnist, scenes
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, Trainable
from deepzoo.families.residual import Backbone, fold_batch_norm
from deepzoo.metrics import detection
from deepzoo.ops.detection import (anchors, batched_nms, clip_boxes, decode_boxes, encode_boxes, match_anchors,
                                   mirror, nms, region_targets, remove_small, roi_align, sample_labels,
                                   training_regions)

EXPERIMENT = scenes.EXPERIMENT
HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the box head's targets are small offsets: scaled to about unit variance
MIN_PROPOSAL = 2.0  # pixels: thinner proposals only add noise to NMS and pooling


class ModelConfig(Section):
    backbone: Backbone  # `resnet`'s trunk: all but its last stage make the shared map, of stride 2^(stages - 1)
    roi_size: int = Field(ge=1)  # RoI Align's output grid: the proposal's features as the head's stage sees them
    flip: bool  # training augmentation: each scene mirrored left-right with probability 1/2
    anchor_sizes: tuple[float, ...] = Field(min_length=1)  # √area of the anchors, pixels
    anchor_ratios: tuple[float, ...] = Field(min_length=1)  # height / width
    rpn_batch: int = Field(ge=2)  # anchors sampled per image for the RPN loss, up to half of them positive
    proposals_train: int = Field(ge=1)  # RPN proposals kept after NMS per image, while training
    proposals_test: int = Field(ge=1)  # and when detecting
    rpn_nms: float = Field(gt=0, le=1)  # IoU above which a lower-scored proposal is suppressed
    head_batch: int = Field(ge=2)  # proposals sampled per image for the head's loss
    head_positive_fraction: float = Field(gt=0, le=1)
    # The detector's post-processing, part of the model: the logged model serves its detections with them.
    score_threshold: float = Field(ge=0, lt=1)  # detections below this score are dropped
    nms: float = Field(gt=0, le=1)  # per-class IoU above which a lower-scored detection is suppressed
    max_detections: int = Field(ge=1, le=100)  # COCO counts at most 100 per image


class EvaluateConfig(Section):
    figure_scenes: int = Field(ge=1)


class FasterRCNNTrainConfig(TrainConfig):
    mixed_precision: bool  # the recipe's own choice: its mAP was measured in float32 (params.yaml)


class Config(Section):
    model: ModelConfig
    train: FasterRCNNTrainConfig
    evaluate: EvaluateConfig


class FasterRCNN(Trainable):
    def __init__(self, cfg: ModelConfig, canvas: int) -> None:
        super().__init__()
        self.cfg = cfg
        if len(cfg.backbone.widths) < 2:
            raise ValueError("the backbone needs at least 2 stages: the shared map's and the head's")
        self.stride = 2 ** (len(cfg.backbone.widths) - 1)
        trunk = cfg.backbone.build()
        self.backbone, head_stage = trunk[:-1], trunk[-1]
        channels, per_cell = cfg.backbone.widths[-2], len(cfg.anchor_sizes) * len(cfg.anchor_ratios)
        self.rpn = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.objectness = nn.Conv2d(channels, per_cell, 1)
        self.rpn_deltas = nn.Conv2d(channels, per_cell * 4, 1)
        self.head = nn.Sequential(head_stage, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classify = nn.Linear(cfg.backbone.widths[-1], len(fashion_mnist.CLASSES) + 1)  # 0 = background
        self.box_deltas = nn.Linear(cfg.backbone.widths[-1], len(fashion_mnist.CLASSES) * 4)
        cells = canvas // self.stride
        self.canvas = canvas
        self.register_buffer("anchors", anchors(cells, cells, self.stride, cfg.anchor_sizes, cfg.anchor_ratios),
                             persistent=False)
        # Channels-last from the start, as the trainer trains it, so detection gets oneDNN's fast CPU convolutions too.
        self.to(memory_format=torch.channels_last)

    def trunk(self) -> nn.Sequential:
        """The trunk's levels in order (the shared ones, then the head's stage): the same modules, not copies."""
        return nn.Sequential(*self.backbone, self.head[0])

    def prepare(self, batch: Batch) -> Batch:
        images, *targets = batch
        images = images.unsqueeze(1).float().div_(255)
        if self.training and self.cfg.flip:
            boxes, labels = targets
            images, boxes = mirror(images, boxes, torch.rand(len(images), device=images.device) < 0.5)
            targets = [boxes, labels]
        return images, *targets

    def propose(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """Features, per-anchor objectness logits [B, N] and deltas [B, N, 4], and each image's proposals."""
        features = self.backbone(images)
        hidden = self.rpn(features)
        batch = len(images)
        objectness = self.objectness(hidden).permute(0, 2, 3, 1).reshape(batch, -1)  # the order of `anchors`
        deltas = self.rpn_deltas(hidden).reshape(batch, -1, 4, *hidden.shape[2:]).permute(0, 3, 4, 1, 2)
        deltas = deltas.reshape(batch, -1, 4)
        keep = self.cfg.proposals_train if self.training else self.cfg.proposals_test
        decoded = clip_boxes(decode_boxes(self.anchors, deltas.detach()), self.canvas, self.canvas)  # [B, N, 4]
        proposals = []
        for scores, boxes in zip(objectness.detach(), decoded, strict=True):
            sizable = remove_small(boxes, MIN_PROPOSAL)
            top = sizable[scores[sizable].topk(min(len(sizable), 2 * keep)).indices]  # NMS costs N²: prune first
            proposals.append(boxes[top[nms(boxes[top], scores[top], self.cfg.rpn_nms)[:keep]]])
        return features, objectness, deltas, proposals

    def head_outputs(self, features: Tensor, boxes: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits [R, 11] and per-class box deltas [R, 10, 4] of `boxes` [R, 4] on images `image` [R]."""
        pooled = roi_align(features, boxes, image, self.cfg.roi_size, 1 / self.stride, sampling=1)
        hidden = self.head(pooled)
        return self.classify(hidden), self.box_deltas(hidden).reshape(len(hidden), -1, 4)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        images, gt_boxes, gt_labels = batch
        features, objectness, deltas, proposals = self.propose(images)
        # The whole batch at once (its ground truth is padded, `truth_iou`); only the sampling goes image by image.
        anchor_labels, matched = match_anchors(self.anchors, gt_boxes, gt_labels)  # [B, N]
        rpn_offset = encode_boxes(self.anchors, gt_boxes.gather(1, matched[..., None].expand(-1, -1, 4)))
        counts = torch.tensor([len(p) for p in proposals], device=images.device)
        padded = nn.utils.rnn.pad_sequence(proposals, batch_first=True)  # [B, most proposals, 4]
        regions, roles, nearest = training_regions(padded, gt_boxes, gt_labels, 0.5, 0.5,
                                                   torch.arange(padded.shape[1], device=images.device) < counts[:, None])
        rpn_targets, chosen = [], []
        for labels, role in zip(anchor_labels, roles, strict=True):
            rpn_targets.append(sample_labels(labels, self.cfg.rpn_batch, 0.5, torch.default_generator))
            chosen.append(sample_labels(role, self.cfg.head_batch, self.cfg.head_positive_fraction,
                                        torch.default_generator) >= 0)
        rpn_target = torch.stack(rpn_targets)
        counted, positive_anchors = rpn_target >= 0, rpn_target == 1
        rpn_class = F.binary_cross_entropy_with_logits(objectness[counted], rpn_target[counted].float())
        rpn_box = F.smooth_l1_loss(deltas[positive_anchors], rpn_offset[positive_anchors], beta=1 / 9,
                                   reduction="sum") / counted.sum()
        boxes, image, target, offset = region_targets(regions, torch.stack(chosen), roles, nearest, gt_boxes,
                                                      gt_labels, HEAD_WEIGHTS)
        logits, box_deltas = self.head_outputs(features, boxes, image)
        foreground = target > 0
        head_class = F.cross_entropy(logits, target)
        head_box = F.smooth_l1_loss(box_deltas[foreground, target[foreground] - 1], offset[foreground], beta=1.0,
                                    reduction="sum") / len(target)
        loss = rpn_class + rpn_box + head_class + head_box
        return loss, {"rpn_class_loss": rpn_class, "rpn_box_loss": rpn_box, "head_class_loss": head_class,
                      "head_box_loss": head_box, "roi_accuracy": (logits.argmax(1) == target).float().mean()}

    @torch.no_grad()
    def detect(self, images: Tensor) -> list[detection.Detections]:
        """Each image's detections: per-class refined boxes, scores above the threshold, per-class NMS."""
        cfg = self.cfg
        features, _, _, proposals = self.propose(images)
        counts = [len(p) for p in proposals]
        image = torch.arange(len(proposals), device=images.device).repeat_interleave(
            torch.tensor(counts, device=images.device))
        boxes = torch.cat(proposals)
        logits, box_deltas = self.head_outputs(features, boxes, image)
        refined = clip_boxes(decode_boxes(boxes[:, None], box_deltas, HEAD_WEIGHTS), self.canvas, self.canvas)
        classes = torch.arange(len(fashion_mnist.CLASSES), device=boxes.device)
        found = []
        for image_boxes, image_scores, proposed in zip(refined.split(counts), logits.softmax(1)[:, 1:].split(counts),
                                                       counts, strict=True):
            image_boxes, scores = image_boxes.reshape(-1, 4), image_scores.reshape(-1)  # proposal-major, class-minor
            labels = classes.repeat(proposed)
            kept = torch.where(scores >= cfg.score_threshold)[0]
            kept = kept[batched_nms(image_boxes[kept], scores[kept], labels[kept], cfg.nms)[: cfg.max_detections]]
            found.append(detection.Detections(image_boxes[kept], scores[kept], labels[kept], proposed))
        return found

    def forward(self, images: Tensor) -> Tensor:
        """Images [B, 1, H, W] in [0, 1] → detections [B, max_detections, 6] of (x1, y1, x2, y2, score, class),
        best first, zero rows after the last: one tensor, so the logged model serves like any other."""
        rows = images.new_zeros(len(images), self.cfg.max_detections, 6)
        for b, found in enumerate(self.detect(images)):
            rows[b, : len(found.labels)] = torch.cat([found.boxes, found.scores[:, None],
                                                      found.labels[:, None].to(rows.dtype)], 1)
        return rows


def variants(cfg: Config) -> dict[str, Variant]:
    data = {split: scenes.detection_tensors(scenes.load(split)) for split in scenes.SPLITS}
    model = FasterRCNN(cfg.model, data["train"][0].shape[-1])
    return {"faster_rcnn": Variant(model, data, cfg.model.backbone.warm_start(model.trunk(), model.classify))}


def detector(ctx: Context) -> detection.Detector:
    """The trained model as a detector of stored images, as evaluation times it: with its batch norms folded
    into its convs, as a deployed detector runs."""
    model = fold_batch_norm(ctx.variants["faster_rcnn"].model)
    return lambda images: model.detect(model.prepare((images.to(ctx.device),))[0])


def evaluate(ctx: Context) -> dict[str, float]:
    """COCO mAP, seconds and proposals per image on the test scenes, one image at a time; seconds in batches."""
    return detection.evaluate_detector(detector(ctx), scenes.load("test"), ctx.out, ctx.cfg.evaluate.figure_scenes)
