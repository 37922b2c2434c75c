"""Confusion matrix and per-class accuracy, as DVC plot data (CSV) and figures (PNG)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from deepzoo.engine.trainer import Batch, Trainable, batches, to_device
from deepzoo.storage import save_figure


@torch.no_grad()
def predict(model: Trainable, data: Batch, device: torch.device, batch_size: int = 1000) -> np.ndarray:
    model.eval()
    predictions = [model(model.prepare(to_device(batch, device))[0]).argmax(-1).cpu()
                   for batch in batches(data, batch_size)]
    return torch.cat(predictions).numpy()


def report(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], out: Path) -> None:
    """Write `confusion.csv` (one row per test item, DVC's confusion template), its figure, and
    `per_class_accuracy.csv`: per-class numbers live in this table, not among the headline metrics, so that
    `dvc exp show` and MLflow's charts stay readable."""
    with (out / "confusion.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(y_true, y_pred, strict=True))
    k = len(classes)
    matrix = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)  # [actual, predicted] counts
    per_class = matrix.diagonal() / matrix.sum(axis=1).clip(min=1)
    with (out / "per_class_accuracy.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "accuracy"])
        writer.writerows((c, f"{a:.4f}") for c, a in zip(classes, per_class, strict=True))
    save_figure(out / "confusion.png", _confusion_figure(matrix, classes))


def _confusion_figure(matrix: np.ndarray, classes: Sequence[str]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="actual",
           title="Confusion matrix (test set)")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, count, ha="center", va="center", fontsize=7,
                color="white" if count > matrix.max() / 2 else "black")
    return fig
