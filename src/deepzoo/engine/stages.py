"""The DVC stages `train@F`, `evaluate@F` and `generate@F`: orchestration only, the same for every family.

A family module supplies `EXPERIMENT`, `Config` (its params section) and `variants(cfg)` (its model or
models with their data); `evaluate(...)` and, for families that generate, `generate(...)`.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from deepzoo import config
from deepzoo.engine import distributed, tracking
from deepzoo.engine.device import configure_threads, resolve, seed_everything
from deepzoo.engine.trainer import Batch, FitResult, Trainable, fit
from deepzoo.storage import atomic_path, save_torch, write_json

FAMILIES = ("perceptron", "mlp", "cnn", "rnn", "lstm", "autoencoder", "vae", "betavae", "gan")
MODELS, METRICS, PLOTS, SAMPLES = Path("models"), Path("reports/metrics"), Path("reports/plots"), Path("reports/samples")
RUN_FILE = "training.json"


@dataclass
class Variant:
    """One model a family trains, with its data splits (`train`, `val`, `test`) as tuples of tensors."""

    model: Trainable
    data: dict[str, Batch]


@dataclass
class Context:
    """What a family's evaluate/generate step gets: its trained variants, config, device and output folder."""

    variants: dict[str, Variant]
    cfg: Any
    device: torch.device
    out: Path
    seed: int


def family_module(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise config.ConfigError(f"unknown family '{name}'; choose one of {', '.join(FAMILIES)}")
    return importlib.import_module(f"deepzoo.families.{name}")


def _setup(name: str) -> tuple[ModuleType, Any, int, torch.device]:
    family = family_module(name)
    cfg = config.load_section(name, family.Config)
    seed = config.load_section("common", config.Common).seed
    configure_threads()
    return family, cfg, seed, resolve()


def train(name: str) -> None:
    family, cfg, seed, device = _setup(name)
    if cfg.train.processes > 1 and "WORLD_SIZE" not in os.environ:
        if distributed.relaunch(cfg.train.processes, ["train", name]) != 0:
            raise RuntimeError(f"torchrun with {cfg.train.processes} processes failed (see the ranks' errors above)")
        return
    distributed.init(device)
    device = distributed.local_device(device)
    try:
        # Only rank 0 tracks and writes; the other ranks just train their shards.
        with tracking.run(family.EXPERIMENT, name, "train", str(device)) if distributed.is_main() \
                else nullcontext() as tracker:
            if tracker is not None:
                tracker.log_params(cfg.model_dump())
            generator = seed_everything(seed)
            variants = family.variants(cfg)
            results = {}
            for variant_name, variant in variants.items():
                distributed.print_once(f"training {name}/{variant_name} on {device} x {distributed.world_size()}")
                prefix = f"{variant_name}/" if len(variants) > 1 else ""
                log = (lambda epoch, row, p=prefix: tracker.log_metrics({p + k: v for k, v in row.items()}, epoch)
                       ) if tracker is not None else (lambda *_: None)
                results[variant_name] = fit(variant.model, variant.data["train"], variant.data.get("val"),
                                            cfg.train, device, generator, log, cfg.train.mixed_precision)
            if tracker is not None:
                _save_training(name, family, cfg, variants, results, tracker)
    finally:
        distributed.shutdown()


def _save_training(name: str, family: ModuleType, cfg: Any, variants: dict[str, Variant],
                   results: dict[str, FitResult], tracker: tracking.Tracker) -> None:
    """Checkpoints, histories and the run summary, each folder replaced whole; the models to MLflow."""
    summary: dict[str, Any] = {"run_id": tracker.run_id, "experiment": family.EXPERIMENT, "variants": {}}
    with atomic_path(MODELS / name) as models_dir, atomic_path(PLOTS / name / "history") as history_dir:
        models_dir.mkdir()
        history_dir.mkdir()
        for variant_name, variant in variants.items():
            result = results[variant_name]
            save_torch(models_dir / f"{variant_name}.pt",
                       {"state_dict": variant.model.state_dict(), "config": cfg.model_dump(mode="json"),
                        "variant": variant_name, "best_epoch": result.best_epoch})
            _write_history(history_dir / f"{variant_name}.csv", result.history)
            summary["variants"][variant_name] = {
                "train_seconds": round(result.train_seconds, 2), "epochs_run": result.epochs_run,
                "best_epoch": result.best_epoch, "samples_per_second": round(result.samples_per_second, 1)}
            tracker.log_model(variant.model, variant_name, variant.model.example_input(variant.data["train"]))
        summary["metric_logging_seconds"] = round(tracker.metric_seconds, 3)
        write_json(models_dir / RUN_FILE, summary)
    tracker.log_artifact(PLOTS / name / "history", "plots/history")


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    columns = sorted({key for row in history for key in row})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", *columns])
        writer.writeheader()
        for epoch, row in enumerate(history, 1):
            writer.writerow({"epoch": epoch, **{k: f"{v:.6g}" for k, v in row.items()}})


def load_trained(name: str) -> tuple[ModuleType, Context, dict[str, Any]]:
    """The family's trained variants, rebuilt from the config saved in each checkpoint."""
    family, cfg, seed, device = _setup(name)
    summary_path = MODELS / name / RUN_FILE
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: run `dvc repro train@{name}` first")
    summary = json.loads(summary_path.read_text())
    checkpoints = {v: torch.load(MODELS / name / f"{v}.pt", map_location="cpu") for v in summary["variants"]}
    trained_cfg = family.Config.model_validate(next(iter(checkpoints.values()))["config"])
    seed_everything(seed)
    variants = family.variants(trained_cfg)
    for variant_name, variant in variants.items():
        variant.model.load_state_dict(checkpoints[variant_name]["state_dict"])
        variant.model.to(device).eval()
    return family, Context(variants, cfg, device, Path(), seed), summary


def evaluate(name: str) -> None:
    family, ctx, summary = load_trained(name)
    with tracking.run(family.EXPERIMENT, name, "evaluate", str(ctx.device), summary["run_id"]) as tracker:
        with atomic_path(PLOTS / name / "evaluation") as out:
            out.mkdir()
            ctx.out = out
            with torch.no_grad():
                metrics = family.evaluate(ctx)
        metrics |= _training_metrics(summary)
        generated = SAMPLES / name / "metrics.json"
        if generated.is_file():  # sequence families measure their generated tunes in `generate`
            metrics |= json.loads(generated.read_text())
        write_json(METRICS / f"{name}.json", metrics)
        tracker.log_metrics({f"test/{k}": v for k, v in metrics.items()})
        tracker.log_artifact(PLOTS / name / "evaluation", "plots/evaluation")


def _training_metrics(summary: dict[str, Any]) -> dict[str, float]:
    variants = summary["variants"]
    if len(variants) == 1:
        only = next(iter(variants.values()))
        return {"train_seconds": only["train_seconds"], "epochs_run": only["epochs_run"]}
    return {"train_seconds": round(sum(v["train_seconds"] for v in variants.values()), 2)}


def generate(name: str) -> None:
    family, ctx, summary = load_trained(name)
    with tracking.run(family.EXPERIMENT, name, "generate", str(ctx.device), summary["run_id"]) as tracker:
        with atomic_path(SAMPLES / name) as out:
            out.mkdir()
            ctx.out = out
            metrics = family.generate(ctx)
            if metrics:
                write_json(out / "metrics.json", metrics)
        if metrics:
            tracker.log_metrics({f"samples/{k}": v for k, v in metrics.items()})
        tracker.log_artifact(SAMPLES / name, "samples")
