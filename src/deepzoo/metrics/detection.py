"""How the detectors (`rcnn`, `faster_rcnn`) are measured: COCO's own evaluation, seconds per image, a figure.

Both detectors go through `evaluate_detector` on the same test scenes, one image at a time (the latency a user
of a detector sees), so their mAP and speed compare directly; and in batches (the throughput a server that
batches its requests gets), each detector at the fastest of the same few batch sizes. mAP comes from
`pycocotools`' COCOeval fed
in-memory dicts: the reference implementation, rather than a re-derivation that could differ in its details
(101-point interpolation, crowd handling, max 100 detections per image).
"""

from __future__ import annotations

import contextlib
import csv
import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle
from torch import Tensor

from deepzoo.data import fashion_mnist, scenes
from deepzoo.storage import save_figure

FIGURE_SCORE = 0.5  # detections drawn in the figure: those at least this confident
# Throughput: one timed pass over the first THROUGHPUT_SCENES test scenes at each size, the fastest counted. Up to 16:
# R-CNN's 300 crops of 32 scenes took `evaluate@rcnn` to 1.99 GB, and Faster R-CNN is no faster at 32 than at 8.
THROUGHPUT_BATCHES = (1, 2, 8, 16)
THROUGHPUT_SCENES = 256


class Detections(NamedTuple):
    """One image's detections, best first: boxes [k, 4] (x1, y1, x2, y2), scores [k] in [0, 1], labels [k] 0–9,
    and how many region proposals the detector classified to find them."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    proposals: int


Detector = Callable[[Tensor], list[Detections]]  # stored images uint8 [B, H, W] → each one's detections


def _xywh(boxes: Tensor) -> list[list[float]]:
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()


def coco_evaluation(truth: dict[str, Tensor], found: list[Detections]) -> tuple[dict[str, float], list[dict], str]:
    """COCO mAP@0.5 and mAP@[0.5:0.95] of `found` (one entry per scene of `truth`), per-class AP rows, and
    COCOeval's own printed summary."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # COCO's ids start at 1: pycocotools takes an id of 0 for "none" in places, so scene s is image s + 1 and
    # class c is category c + 1.
    annotations, results = [], []
    for s, detections in enumerate(found):
        boxes, labels = scenes.items(truth, s)
        annotations += [{"id": len(annotations) + k + 1, "image_id": s + 1, "category_id": int(label) + 1,
                         "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
                        for k, (box, label) in enumerate(zip(_xywh(boxes), labels.tolist(), strict=True))]
        results += [{"image_id": s + 1, "category_id": int(label) + 1, "bbox": box, "score": float(score)}
                    for box, label, score in zip(_xywh(detections.boxes), detections.labels.tolist(),
                                                 detections.scores.tolist(), strict=True)]
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(fashion_mnist.CLASSES)]
    if not results:  # COCO.loadRes cannot take an empty list; nothing found is an AP of 0 everywhere
        return ({"map_50": 0.0, "map_50_95": 0.0},
                [{"class": name, "ap_50": 0.0, "ap_50_95": 0.0} for name in fashion_mnist.CLASSES], "no detections\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ground_truth = COCO()
        ground_truth.dataset = {"images": [{"id": s + 1} for s in range(len(found))], "annotations": annotations,
                                "categories": categories}
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # precision [IoU thresholds, recall points, classes, area ranges, max dets]; -1 marks "no such object"
    precision = evaluation.eval["precision"][:, :, :, 0, -1]

    def ap(values: np.ndarray) -> float:
        values = values[values > -1]
        return round(float(values.mean()), 4) if values.size else float("nan")

    per_class = [{"class": name, "ap_50": ap(precision[0, :, c]), "ap_50_95": ap(precision[:, :, c])}
                 for c, name in enumerate(fashion_mnist.CLASSES)]
    headline = {"map_50": round(float(evaluation.stats[1]), 4), "map_50_95": round(float(evaluation.stats[0]), 4)}
    return headline, per_class, printed.getvalue()


def seconds_per_image(detect: Detector, images: Tensor, batch_size: int) -> float:
    """Wall seconds per image of detecting `images` [N, H, W] in batches of `batch_size`, after one untimed batch
    (the first call at a new size pays one-off allocations)."""
    detect(images[:batch_size])
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        detect(images[first : first + batch_size])
    return (time.perf_counter() - start) / len(images)


def throughput(detect: Detector, images: Tensor, batch_sizes: Sequence[int] = THROUGHPUT_BATCHES) -> dict[int, float]:
    """Seconds per image of detecting `images` at each batch size."""
    with torch.inference_mode():
        return {size: seconds_per_image(detect, images, size) for size in batch_sizes}


def evaluate_detector(detect: Detector, truth: dict[str, Tensor], out: Path, figure_scenes: int) -> dict[str, float]:
    """Detect every scene of `truth`, one image at a time, timed; COCO's metrics, proposals and seconds per image;
    and the seconds per image in batches (`throughput` on the first THROUGHPUT_SCENES scenes), at the fastest size.

    Writes `per_class_ap.csv`, `coco_summary.txt` and `detections.png` (ground truth beside predictions) to `out`.
    """
    found, seconds = [], 0.0
    with torch.inference_mode():  # no autograd bookkeeping at all, as a deployed detector would run
        for image in truth["images"]:
            start = time.perf_counter()
            found.extend(detect(image[None]))
            seconds += time.perf_counter() - start
    batched = throughput(detect, truth["images"][:THROUGHPUT_SCENES])
    fastest = min(batched, key=batched.get)
    headline, per_class, printed = coco_evaluation(truth, found)
    with (out / "per_class_ap.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["class", "ap_50", "ap_50_95"])
        writer.writeheader()
        writer.writerows(per_class)
    (out / "coco_summary.txt").write_text(printed)
    save_figure(out / "detections.png", detections_figure(truth, found, figure_scenes))
    scenes_count = len(found)
    return {**headline, "seconds_per_image": round(seconds / scenes_count, 5),
            "seconds_per_image_batched": round(batched[fastest], 5), "fastest_batch_size": fastest,
            "proposals_per_image": round(sum(d.proposals for d in found) / scenes_count, 1)}


def detections_figure(truth: dict[str, Tensor], found: list[Detections], count: int) -> plt.Figure:
    """Rows of test scenes: the ground truth's boxes beside the detections scoring ≥ FIGURE_SCORE, with scores."""
    colors = plt.get_cmap("tab10").colors
    count = min(count, len(found))
    fig, axes = plt.subplots(count, 2, figsize=(5, 2.5 * count), squeeze=False)
    height, width = truth["images"].shape[1:]
    for s, (truth_ax, found_ax) in enumerate(axes):
        boxes, labels = scenes.items(truth, s)
        confident = found[s].scores >= FIGURE_SCORE
        panels = ((truth_ax, boxes, labels, None, "ground truth"),
                  (found_ax, found[s].boxes[confident], found[s].labels[confident], found[s].scores[confident],
                   f"detections (score ≥ {FIGURE_SCORE})"))  # fmt: skip
        for ax, panel_boxes, panel_labels, scores, title in panels:
            ax.imshow(truth["images"][s].numpy(), cmap="gray", vmin=0, vmax=255, extent=(0, width, height, 0),
                      interpolation="nearest")
            for k, ((x1, y1, x2, y2), label) in enumerate(zip(panel_boxes.tolist(), panel_labels.tolist(),
                                                             strict=True)):
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colors[label], lw=1))
                text = fashion_mnist.CLASSES[label] + ("" if scores is None else f" {scores[k]:.2f}")
                ax.text(x1, y1, text, color="white", fontsize=5, va="bottom",
                        bbox={"facecolor": colors[label], "pad": 0.5, "linewidth": 0})
            ax.set_title(title if s == 0 else "", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig
