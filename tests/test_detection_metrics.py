"""COCO evaluation of detections: perfect, shifted, mislabelled and missing detections score as COCO defines."""

from __future__ import annotations

import pytest
import torch

from deepzoo.data import scenes
from deepzoo.metrics import detection


def truth() -> dict[str, torch.Tensor]:
    """Two scenes: one with a T-shirt and a bag, one with a sneaker."""
    return {"images": torch.zeros(2, 96, 96, dtype=torch.uint8), "masks": torch.zeros(2, 96, 96, dtype=torch.uint8),
            "boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0], [50.0, 50.0, 90.0, 80.0], [20.0, 30.0, 60.0, 50.0]]),
            "labels": torch.tensor([0, 8, 7]), "offsets": torch.tensor([0, 2, 3])}


def found_from(boxes: torch.Tensor, labels: torch.Tensor, offsets: list[int]) -> list[detection.Detections]:
    return [detection.Detections(boxes[a:b], torch.linspace(0.9, 0.8, b - a), labels[a:b], 7)
            for a, b in zip(offsets, offsets[1:])]


def test_perfect_detections_score_one():
    t = truth()
    headline, per_class, _ = detection.coco_evaluation(t, found_from(t["boxes"], t["labels"], [0, 2, 3]))
    assert headline == {"map_50": 1.0, "map_50_95": 1.0}
    assert {row["class"]: row["ap_50"] for row in per_class}["Bag"] == 1.0
    assert all(row["ap_50"] != row["ap_50"] for row in per_class if row["class"] == "Dress")  # NaN: no dresses


def test_a_loose_box_counts_at_iou_half_but_not_at_the_strict_thresholds():
    t = truth()
    loose = t["boxes"].clone()
    loose[0] = torch.tensor([10.0, 10.0, 40.0, 70.0])  # IoU 40·30 / 60·30 = 0.67 with the T-shirt's box
    headline, per_class, _ = detection.coco_evaluation(t, found_from(loose, t["labels"], [0, 2, 3]))
    assert headline["map_50"] == 1.0
    assert headline["map_50_95"] < 1.0
    assert {row["class"]: row["ap_50_95"] for row in per_class}["T-shirt/top"] == pytest.approx(0.4, abs=0.01)


def test_wrong_labels_and_no_detections_score_zero():
    t = truth()
    headline, _, _ = detection.coco_evaluation(t, found_from(t["boxes"], (t["labels"] + 1) % 10, [0, 2, 3]))
    assert headline == {"map_50": 0.0, "map_50_95": 0.0}
    empty = detection.Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0)
    headline, per_class, _ = detection.coco_evaluation(t, [empty, empty])
    assert headline == {"map_50": 0.0, "map_50_95": 0.0} and len(per_class) == 10


def test_evaluate_detector_times_every_scene_and_writes_its_reports(tmp_path):
    t = truth()
    t["images"][1] += 1  # the fake detector below tells scenes apart by their pixels
    found = found_from(t["boxes"], t["labels"], [0, 2, 3])
    calls = []

    def detect(images):
        calls.append(len(images))
        return [found[next(i for i, scene in enumerate(t["images"]) if torch.equal(scene, image))] for image in images]

    metrics = detection.evaluate_detector(detect, t, tmp_path, figure_scenes=2)
    assert calls[:2] == [1, 1]  # the scored detections: every scene alone, as its latency is timed
    assert metrics["map_50"] == 1.0 and metrics["proposals_per_image"] == 7.0 and metrics["seconds_per_image"] >= 0
    assert metrics["fastest_batch_size"] in detection.THROUGHPUT_BATCHES and metrics["seconds_per_image_batched"] >= 0
    assert (tmp_path / "per_class_ap.csv").read_text().startswith("class,ap_50,ap_50_95\nT-shirt/top,1.0,1.0")
    assert "Average Precision" in (tmp_path / "coco_summary.txt").read_text()
    assert (tmp_path / "detections.png").stat().st_size > 0


def test_detection_tensors_pad_each_scene_to_the_largest():
    images, boxes, labels = scenes.detection_tensors(truth())
    assert boxes.shape == (2, 2, 4) and labels.tolist() == [[0, 8], [7, -1]]
    assert torch.equal(boxes[1, 0], truth()["boxes"][2])


def test_throughput_detects_every_image_once_per_batch_size_after_a_warm_up_batch():
    images = torch.zeros(5, 8, 8, dtype=torch.uint8)
    calls = []

    def detect(batch):
        calls.append(len(batch))
        return [None] * len(batch)

    seconds = detection.throughput(detect, images, batch_sizes=(2, 8))
    assert calls == [2, 2, 2, 1, 5, 5]
    assert list(seconds) == [2, 8] and all(s >= 0 for s in seconds.values())
