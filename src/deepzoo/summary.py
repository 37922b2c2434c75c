"""`summarize`: one table of every family's results, from the metrics files of its evaluation (pandas).

Writes `reports/summary.csv` (every number), `reports/summary.md` (the README's results table, pasted between its
markers by `python -m deepzoo.summary --readme`, which `make run` runs; the tests hold them equal),
`reports/summary.png`, and the classifiers' test accuracy against training seconds (`reports/plots/accuracy_vs_seconds.*`,
from their training histories). Run as `python -m deepzoo.summary` (the `summarize` stage).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from deepzoo import registry
from deepzoo.storage import atomic_path, save_figure

METRICS, PLOTS, OUTPUT = Path("reports/metrics"), Path("reports/plots"), Path("reports")
CLASSIFIERS = [name for name, family in registry.FAMILIES.items() if family.headline == "test_accuracy"]
README = Path("README.md")
DETECTION = ("map_50", "map_50_95", "seconds_per_image", "seconds_per_image_batched", "fastest_batch_size",
             "proposals_per_image")
BEGIN, END = "<!-- summary: generated from reports/summary.md -->", "<!-- /summary -->"


def table(metrics_dir: Path = METRICS) -> pd.DataFrame:
    """One row per family: its headline metric, the goal, training time and size."""
    rows = []
    for name, family in registry.FAMILIES.items():
        metrics = json.loads((metrics_dir / f"{name}.json").read_text())
        rows.append({"family": name, "data": family.data, "headline": family.headline,
                     "value": metrics[family.headline], "goal": family.goal or "",
                     "train_minutes": round(metrics["train_seconds"] / 60, 1),
                     "epochs": metrics.get("epochs_run"), "parameters": metrics["parameters"]})
    return pd.DataFrame(rows).set_index("family")


def detectors(metrics_dir: Path = METRICS) -> pd.DataFrame:
    """The lecture's comparison: each detector's mAP, speed and proposals on the same test scenes."""
    rows = []
    for name, family in registry.FAMILIES.items():
        if family.headline == "map_50":
            metrics = json.loads((metrics_dir / f"{name}.json").read_text())
            rows.append({"family": name, **{key: metrics[key] for key in DETECTION},
                         "train_minutes": round(metrics["train_seconds"] / 60, 1)})
    return pd.DataFrame(rows).set_index("family")


def detection_markdown(frame: pd.DataFrame) -> str:
    header = ["detector", "mAP@0.5", "mAP@[0.5:0.95]", "seconds per image", "… in batches", "its batch size",
              "proposals per image", "train min"]
    text = markdown_table(header, ([f"`{name}`", *(f"{v:g}" for v in row)] for name, row in frame.iterrows()))
    if {"rcnn", "faster_rcnn"} <= set(frame.index):
        speedup, batched = (frame.at["rcnn", key] / frame.at["faster_rcnn", key]
                            for key in ("seconds_per_image", "seconds_per_image_batched"))
        text += (f"\nFaster R-CNN detects **{speedup:.1f}×** faster per image than R-CNN one image at a time, "
                 f"and **{batched:.1f}×** in batches (each at its fastest batch size).\n")
    return text


def markdown_table(header: list[str], rows: Iterable[Iterable[object]]) -> str:
    """GitHub markdown (pandas' own `to_markdown` needs `tabulate`, one more dependency)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(frame: pd.DataFrame) -> str:
    """The table as GitHub markdown."""
    shown = frame.assign(value=frame["value"].map(lambda v: f"**{v:g}**"),
                         epochs=frame["epochs"].map(lambda e: "" if pd.isna(e) else f"{int(e)}"),
                         parameters=frame["parameters"].map(lambda p: f"{int(p):,}"),
                         headline=frame["headline"].map(lambda h: f"`{h}`")).reset_index()
    shown["family"] = shown["family"].map(lambda f: f"`{f}`")
    header = ["family", "data", "headline metric", "value", "goal", "train min", "epochs", "parameters"]
    return markdown_table(header, shown.itertuples(index=False))


def figure(frame: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ordered = frame.sort_values("train_minutes")
    ax.barh(ordered.index, ordered["train_minutes"], color="tab:blue")
    for y, (minutes, headline, value) in enumerate(ordered[["train_minutes", "headline", "value"]].itertuples(False)):
        ax.text(minutes, y, f" {headline} {value:g}", va="center", fontsize=7)
    ax.set(xlabel="training minutes (default params)", title="deepzoo: training time and headline result per family")
    ax.set_xlim(0, ordered["train_minutes"].max() * 1.6)
    return fig


def accuracy_curves(plots_dir: Path = PLOTS) -> pd.DataFrame:
    """Each classifier's test accuracy after every epoch, against its training seconds so far (`seconds`)."""
    curves = []
    for name in CLASSIFIERS:
        history = pd.read_csv(plots_dir / name / "history" / f"{name}.csv")
        if "monitor/accuracy" in history:
            curves.append(pd.DataFrame({"family": name, "epoch": history["epoch"],
                                        "seconds": history["epoch_seconds"].cumsum().round(1),
                                        "test_accuracy": history["monitor/accuracy"]}))
    return pd.concat(curves, ignore_index=True)


def accuracy_figure(curves: pd.DataFrame, target: float = 0.91) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, curve in curves.groupby("family", sort=False):
        ax.plot(curve["seconds"], curve["test_accuracy"], marker="o", markersize=3, label=name)
    ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"{target:g}")
    ax.set(xlabel="training seconds (2 CPU cores unless the run says otherwise)", ylabel="test accuracy",
           title="Fashion-MNIST classifiers: accuracy against training time", ylim=(0.8, 1.0))
    ax.legend()
    return fig


def with_table(readme: str, summary: str) -> str:
    """`readme` with the text between the summary markers replaced by `summary`."""
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise ValueError(f"{README} has no {BEGIN} … {END} block for the results table")
    return pattern.sub(lambda _: f"{BEGIN}\n{summary}{END}", readme)


def main(argv: list[str] | None = None) -> int:
    if "--readme" in (sys.argv[1:] if argv is None else argv):
        README.write_text(with_table(README.read_text(), (OUTPUT / "summary.md").read_text()))
        return 0
    frame = table()
    with atomic_path(OUTPUT / "summary.csv") as tmp:
        frame.to_csv(tmp)
    with atomic_path(OUTPUT / "summary.md") as tmp:
        tmp.write_text(markdown(frame) + "\n" + detection_markdown(detectors()))
    save_figure(OUTPUT / "summary.png", figure(frame))
    curves = accuracy_curves()
    with atomic_path(PLOTS / "accuracy_vs_seconds.csv") as tmp:
        curves.to_csv(tmp, index=False)
    save_figure(PLOTS / "accuracy_vs_seconds.png", accuracy_figure(curves))
    print((OUTPUT / "summary.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
