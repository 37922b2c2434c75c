"""Object-detection primitives for the R-CNN family, in plain PyTorch (torchvision is not a dependency).

Boxes are float tensors [N, 4] of (x1, y1, x2, y2) in continuous pixel coordinates: pixel (row i, column j)
covers [j, j + 1] × [i, i + 1], so its centre is (j + 0.5, i + 0.5) and a box's width is x2 − x1 (no "+1").
This is the convention of torchvision's `roi_align(aligned=True)` and of `grid_sample(align_corners=False)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

BBOX_EXP_CLAMP = math.log(1000.0 / 16)  # Detectron's bound on dw, dh: exp() of a wild regression would overflow
Weights = tuple[float, float, float, float]  # (wx, wy, ww, wh) of the box parameterisation


def box_area(boxes: Tensor) -> Tensor:
    """Areas [...] of `boxes` [..., 4]; inverted boxes count as empty rather than negative."""
    return (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise intersection over union [..., N, M] of `a` [..., N, 4] and `b` [..., M, 4]: leading dimensions
    broadcast, so a batch of images' boxes [B, N, 4] against shared anchors [M, 4] is one call.

    The intersection never exceeds the union, so where two empty boxes have a zero union the intersection is 0
    too: clamping the denominator defines their IoU as 0 (never NaN, also in the backward pass).
    Computed on each coordinate's contiguous column, with in-place ops: a detector calls it for every image, on tens
    of boxes, where each op's fixed cost is what counts (an op broadcasting [N, 1, 2] against [1, M, 2] pairs costs
    3× one on [N, 1] and [1, M] columns), or on thousands.
    """
    ax1, ay1, ax2, ay2 = (column[..., :, None] for column in a.movedim(-1, 0).contiguous())  # [..., N, 1] each
    bx1, by1, bx2, by2 = (column[..., None, :] for column in b.movedim(-1, 0).contiguous())  # [..., 1, M] each
    width = torch.minimum(ax2, bx2).sub_(torch.maximum(ax1, bx1)).clamp_(min=0)  # [..., N, M]
    height = torch.minimum(ay2, by2).sub_(torch.maximum(ay1, by1)).clamp_(min=0)
    intersection = width.mul_(height)
    union = (box_area(a)[..., :, None] + box_area(b)[..., None, :]).sub_(intersection)
    return intersection / union.clamp_(min=torch.finfo(union.dtype).tiny)


def _centres_and_sizes(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Centres [..., 2] and sizes [..., 2] of `boxes` [..., 4], as (x, y) pairs: half the ops of four coordinates,
    for detection's per-image latency."""
    size = boxes[..., 2:] - boxes[..., :2]
    return boxes[..., :2] + 0.5 * size, size


def encode_boxes(reference: Tensor, target: Tensor, weights: Weights = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Regression targets [..., 4] that move `reference` boxes onto `target` boxes [..., 4] (R-CNN, Girshick et
    al. 2014); leading dimensions broadcast.

    Offsets are relative to the reference size and sizes are log-ratios, so the targets are scale-invariant;
    `weights` (wx, wy, ww, wh) rescale them to roughly unit variance, e.g. (10, 10, 5, 5) for the box head.
    """
    centre, size = _centres_and_sizes(reference)
    target_centre, target_size = _centres_and_sizes(target)
    scale = target.new_tensor(weights)
    return torch.cat([scale[:2] * (target_centre - centre) / size, scale[2:] * torch.log(target_size / size)], dim=-1)


def decode_boxes(reference: Tensor, deltas: Tensor, weights: Weights = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Boxes [..., 4] obtained by applying `deltas` [..., 4] to `reference` [..., 4]: the inverse of `encode_boxes`."""
    centre, size = _centres_and_sizes(reference)
    scale = deltas.new_tensor(weights)
    centre = centre + deltas[..., :2] / scale[:2] * size
    half = 0.5 * size * torch.exp((deltas[..., 2:] / scale[2:]).clamp(max=BBOX_EXP_CLAMP))
    return torch.cat([centre - half, centre + half], dim=-1)


def clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    """`boxes` [..., 4] clamped to the image [0, width] × [0, height], so decoded proposals stay on the image."""
    return torch.clamp(boxes, boxes.new_zeros(4), boxes.new_tensor([width, height, width, height]))


def mirror(images: Tensor, boxes: Tensor, flip: Tensor) -> tuple[Tensor, Tensor]:
    """Images [B, …, W] and their boxes [B, M, 4] mirrored left-right where `flip` [B] (bool) is set: the
    horizontal-flip augmentation of Fast and Faster R-CNN."""
    width = images.shape[-1]
    mirrored = torch.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], -1)
    images = torch.where(flip.view(-1, *[1] * (images.dim() - 1)), images.flip(-1), images)
    return images, torch.where(flip.view(-1, 1, 1), mirrored, boxes)


def remove_small(boxes: Tensor, min_size: float) -> Tensor:
    """Indices [K] of the boxes at least `min_size` wide and high: slivers only add noise to NMS and RoI pooling."""
    keep = (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
    return torch.where(keep)[0]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices [K] of the boxes kept by greedy non-maximum suppression, by decreasing score.

    Each box, best first, is kept unless a kept box overlaps it with IoU > `iou_threshold`. The [N, N] IoU matrix
    is computed once and dominates the cost; the Python loop only ORs rows of a boolean matrix, in NumPy, whose
    per-element indexing costs a tenth of a tensor's (a training step runs this once per image).
    Equal scores keep their input order (stable sort), so the result is deterministic.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    overlaps = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu().numpy()  # [N, N], in score order
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlaps[i]
    return order[torch.from_numpy(np.array(keep, dtype=np.int64)).to(order.device)]


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """`nms` within each label only: per-class suppression for the detection head, in one call.

    Each label's boxes are shifted by label × (extent of all boxes + 1), so boxes of different labels never overlap.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    extent = boxes.max() - boxes.min() + 1
    return nms(boxes + (labels.to(boxes.dtype) * extent)[:, None], scores, iou_threshold)


def anchors(
    feature_height: int, feature_width: int, stride: float, sizes: Sequence[float], ratios: Sequence[float]
) -> Tensor:
    """Anchor boxes [H·W·A, 4] (on the CPU: build once, move with `.to`) for a map of stride `stride`.

    Every cell (i, j) gets A = len(sizes) · len(ratios) anchors centred on ((j + 0.5) · stride, (i + 0.5) · stride),
    of area size² and height / width = ratio. Ordering: cells row-major (i, then j), then per cell sizes-major,
    ratios-minor: anchor index = ((i · W + j) · len(sizes) + s) · len(ratios) + r, as a [H, W, A] head output.
    """
    size = torch.tensor(sizes, dtype=torch.float32)[:, None]  # [S, 1]
    ratio = torch.tensor(ratios, dtype=torch.float32)[None, :]  # [1, R]
    half_w = (0.5 * size / ratio.sqrt()).reshape(-1)  # [A]: w = size / √ratio, h = size · √ratio
    half_h = (0.5 * size * ratio.sqrt()).reshape(-1)  # [A]
    cell = torch.stack([-half_w, -half_h, half_w, half_h], dim=1)  # [A, 4], centred on 0
    cy = (torch.arange(feature_height, dtype=torch.float32) + 0.5) * stride
    cx = (torch.arange(feature_width, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")  # [H, W] each
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # [H·W, 1, 4]
    return (centres + cell[None]).reshape(-1, 4)  # [H·W·A, 4]


def roi_align(
    features: Tensor, boxes: Tensor, batch_index: Tensor, output_size: int, spatial_scale: float, sampling: int = 2
) -> Tensor:
    """Fixed-size features [K, C, output_size, output_size] of `boxes` [K, 4] (RoI Align, He et al. 2017).

    `boxes` are in image pixels and `batch_index` [K] says which image of `features` [B, C, H, W] each comes from.
    Each output cell averages sampling × sampling bilinear samples spread evenly over it: unlike RoI Pool there is
    no rounding, so the result is a differentiable function of the box position as well as of the features.
    Samples beyond the map take the nearest border value (torchvision instead zeroes those more than a pixel out).
    """
    _, channels, height, width = features.shape
    points = output_size * sampling
    if len(boxes) == 0:
        return features.new_zeros(0, channels, output_size, output_size)
    # Coordinates in float32 whatever the features' dtype: bf16 would round a 96-px box's corners to 0.5 px.
    steps = (torch.arange(points, dtype=torch.float32, device=features.device) + 0.5) / points  # [P]
    scaled = boxes.float() * spatial_scale
    xs = scaled[:, 0:1] + steps * (scaled[:, 2:3] - scaled[:, 0:1])  # [K, P], in feature pixels
    ys = scaled[:, 1:2] + steps * (scaled[:, 3:4] - scaled[:, 1:2])  # [K, P]
    # align_corners=False maps [-1, 1] onto the pixel edges [0, width], i.e. our continuous coordinates
    gx = (2 * xs / width - 1)[:, None, :].expand(-1, points, -1)  # [K, P (y), P (x)]
    gy = (2 * ys / height - 1)[:, :, None].expand(-1, -1, points)  # [K, P (y), P (x)]
    grid = torch.stack([gx, gy], dim=-1)  # [K, P, P, 2]
    # Each run of boxes on one image in a single call (callers list an image's boxes together, so usually one run per
    # image): grid [1, K_b·P, P, 2] -> [1, C, K_b·P, P] -> [K_b, C, P, P]
    images, counts = torch.unique_consecutive(batch_index, return_counts=True)
    samples = torch.cat([
        F.grid_sample(features[b : b + 1].float(), run.reshape(1, -1, points, 2), align_corners=False,  # in float32,
                      padding_mode="border").reshape(channels, -1, points, points).transpose(0, 1)  # as autocast would
        for b, run in zip(images.tolist(), grid.split(counts.tolist()), strict=True)]).to(features.dtype)
    return samples if sampling == 1 else F.avg_pool2d(samples, sampling)  # a 1×1 average is a copy, and not cheap


def truth_iou(boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> Tensor:
    """IoU [B, N, G] of each image's `boxes` [B, N, 4] (or [N, 4], the same for every image) with its ground truth.

    `gt_boxes` [B, G, 4] and `gt_labels` [B, G] hold each image's boxes padded to G with label −1 (the scenes'
    rectangular layout); a padding box's IoU is −1, below any real one's, so it is never a box's best match.
    """
    return box_iou(boxes, gt_boxes).masked_fill_((gt_labels < 0)[:, None, :], -1.0)


def match_anchors(
    anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, high: float = 0.7, low: float = 0.3
) -> tuple[Tensor, Tensor]:
    """Labels [B, A] (1 object, 0 background, −1 ignored) and the index [B, A] of each anchor's best ground-truth box,
    for a batch's padded ground truth (`truth_iou`).

    Faster R-CNN's rule: IoU ≥ `high` is positive, < `low` negative, in between ignored; and each gt box's best
    anchors (all ties) are positive even below `high`, so that small or oddly shaped objects still get a match.
    A gt box that overlaps no anchor at all is left unmatched rather than making every anchor its "best".
    In an image with no gt boxes every anchor is background and the index is 0 (meaningless, but safe to gather with).
    """
    if gt_boxes.shape[1] == 0:
        zeros = torch.zeros(len(gt_boxes), len(anchors), dtype=torch.long, device=anchors.device)
        return zeros, zeros.clone()
    iou = truth_iou(anchors, gt_boxes, gt_labels)  # [B, A, G]
    best_iou, matched = iou.max(dim=2)  # [B, A]
    labels = torch.full_like(matched, -1)
    labels[best_iou < low] = 0
    labels[best_iou >= high] = 1
    best_per_gt = iou.max(dim=1, keepdim=True).values  # [B, 1, G]
    labels[((iou == best_per_gt) & (best_per_gt > 0)).any(dim=2)] = 1
    return labels, matched


def training_regions(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, positive_iou: float, background_iou: float,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A detection head's candidate training regions [B, N + G, 4]: each image's `proposals` [B, N, 4] (`valid`
    [B, N] marks the real ones of a padded batch; default all), then its ground-truth boxes, which give the head
    perfect examples from the first step on. With each region's role [B, N + G]: 1 object (IoU ≥ `positive_iou`
    with its nearest ground-truth box), 0 background (IoU < `background_iou`), −1 neither or padding; and the index
    [B, N + G] of that nearest box.
    """
    regions = torch.cat([proposals, gt_boxes], 1)
    best_iou, nearest = truth_iou(regions, gt_boxes, gt_labels).max(dim=2)
    role = torch.full_like(nearest, -1)
    role[best_iou < background_iou] = 0
    role[best_iou >= positive_iou] = 1
    real = torch.ones(proposals.shape[:2], dtype=torch.bool, device=proposals.device) if valid is None else valid
    role[~torch.cat([real, gt_labels >= 0], 1)] = -1
    return regions, role, nearest


def region_targets(
    regions: Tensor, chosen: Tensor, role: Tensor, nearest: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
    weights: Weights,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The `chosen` [B, N] (bool) of `training_regions`, every image's in turn: boxes [K, 4], the image of each
    [K], its class [K] (0 background, c + 1 an object of class c) and the deltas [K, 4] onto its nearest box."""
    image, slot = torch.where(chosen)
    boxes, near = regions[image, slot], nearest[image, slot]
    classes = torch.where(role[image, slot] == 1, gt_labels[image, near] + 1, 0)
    return boxes, image, classes, encode_boxes(boxes, gt_boxes[image, near], weights)


def sample_labels(labels: Tensor, batch_size: int, positive_fraction: float, generator: torch.Generator) -> Tensor:
    """`labels` with at most `batch_size` kept (the rest set to −1): positives up to the quota, then negatives.

    Anchors are overwhelmingly background; sampling a fixed, positive-rich mini-batch keeps the loss balanced.
    Which ones are kept is drawn with `generator`, so a seeded generator makes training reproducible.
    """
    positive, negative = torch.where(labels == 1)[0], torch.where(labels == 0)[0]
    num_positive = min(len(positive), int(batch_size * positive_fraction))
    num_negative = min(len(negative), batch_size - num_positive)

    def draw(indices: Tensor, count: int) -> Tensor:
        chosen = torch.randperm(len(indices), generator=generator, device=generator.device)[:count]
        return indices[chosen.to(indices.device)]

    sampled = torch.full_like(labels, -1)
    sampled[draw(positive, num_positive)] = 1
    sampled[draw(negative, num_negative)] = 0
    return sampled
