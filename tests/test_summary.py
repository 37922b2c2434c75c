"""The cross-family summary: a pandas table of the metrics files, which is the README's results table."""

from __future__ import annotations

import json

import pytest
from configs import ROOT

from deepzoo import registry, summary


def test_the_table_has_one_row_per_family_with_its_headline(tmp_path):
    for i, (name, family) in enumerate(registry.FAMILIES.items()):
        metrics = {family.headline: 0.5 + i, "train_seconds": 60.0 * i, "epochs_run": i + 1, "parameters": 1000 * i}
        (tmp_path / f"{name}.json").write_text(json.dumps(metrics))
    frame = summary.table(tmp_path)
    assert list(frame.index) == list(registry.FAMILIES)
    assert frame.loc["cnn", "value"] == 2.5 and frame.loc["cnn", "train_minutes"] == 2.0
    text = summary.markdown(frame)
    assert text.count("\n") == 2 + len(registry.FAMILIES)
    assert "| `cnn` | fashion_mnist | `test_accuracy` | **2.5** | ≥ 0.915 | 2.0 | 3 | 2,000 |" in text


def test_the_readme_results_table_is_the_committed_summary():
    readme = (ROOT / "README.md").read_text()
    assert summary.with_table(readme, (ROOT / "reports/summary.md").read_text()) == readme, (
        "README.md's results table differs from reports/summary.md: run `make run` (or "
        "`PYTHONPATH=src python -m deepzoo.summary --readme`)")


def test_a_readme_without_the_markers_is_an_error():
    with pytest.raises(ValueError, match="no <!-- summary"):
        summary.with_table("# a readme\n", "| table |\n")


def test_the_detectors_compare_side_by_side_with_the_speedup(tmp_path):
    for name, seconds, batched, size in [("rcnn", 0.08, 0.075, 2), ("faster_rcnn", 0.004, 0.0025, 32)]:
        metrics = {"map_50": 0.9, "map_50_95": 0.6, "seconds_per_image": seconds, "seconds_per_image_batched": batched,
                   "fastest_batch_size": size, "proposals_per_image": 32, "train_seconds": 300.0}
        (tmp_path / f"{name}.json").write_text(json.dumps(metrics))
    frame = summary.detectors(tmp_path)
    assert list(frame.index) == ["rcnn", "faster_rcnn"]
    text = summary.detection_markdown(frame)
    assert "| `faster_rcnn` | 0.9 | 0.6 | 0.004 | 0.0025 | 32 | 32 | 5 |" in text
    assert "**20.0×** faster per image than R-CNN one image at a time, and **30.0×** in batches" in text


def test_accuracy_curves_accumulate_epoch_seconds_of_the_classifiers_that_measured_test_accuracy(tmp_path):
    rows = {"mlp": "epoch,epoch_seconds,val/accuracy\n1,2.0,0.8\n",  # no monitor/accuracy: not in the figure
            "cnn": "epoch,epoch_seconds,monitor/accuracy\n1,10.0,0.88\n2,12.5,0.91\n",
            "resnet": "epoch,epoch_seconds,monitor/accuracy\n1,30.0,0.9\n"}
    for name, text in rows.items():
        (tmp_path / name / "history").mkdir(parents=True)
        (tmp_path / name / "history" / f"{name}.csv").write_text(text)
    curves = summary.accuracy_curves(tmp_path)
    assert curves[["family", "seconds", "test_accuracy"]].values.tolist() == [
        ["cnn", 10.0, 0.88], ["cnn", 22.5, 0.91], ["resnet", 30.0, 0.9]]
    summary.accuracy_figure(curves)
