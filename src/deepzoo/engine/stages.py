"""The DVC stages `train@F`, `evaluate@F` and `generate@F`: orchestration only, the same for every family.

A family module (see `deepzoo.registry`) supplies `EXPERIMENT`, `Config` (its params section) and
`variants(cfg)` (its model or models with their data); `evaluate(ctx)` and, for families that generate,
`generate(ctx)`. Metrics flow one way: `generate` writes artefacts (figures, tunes), never metrics;
`evaluate` writes the family's metrics file, measuring its generated artefacts where the family says so.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import pickle
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import deepzoo
from deepzoo import DeepzooError, config, registry
from deepzoo.engine import distributed, tracking
from deepzoo.engine.device import configure_cpu, precision, resolve, seed_everything
from deepzoo.engine.trainer import Batch, FitResult, Trainable, fit
from deepzoo.storage import atomic_path, save_figure, save_torch, write_json

MODELS, METRICS, PLOTS, SAMPLES = Path("models"), Path("reports/metrics"), Path("reports/plots"), Path("reports/samples")
RUN_FILE = "training.json"
RESUME = Path(".deepzoo/resume")


class CheckpointError(DeepzooError):
    """A trained model's checkpoint is missing or unreadable; the message says how to restore it."""


@dataclass
class Variant:
    """One model a family trains, with its data splits (`train`, `val`, `test`) as tuples of tensors."""

    model: Trainable
    data: dict[str, Batch]
    # What sets the model's starting weights before training (pretrained ones), returning tags that name them.
    warm_start: Callable[[], dict[str, str]] | None = None
    # A new training set of as many examples, drawn with the given generator for every epoch after the first.
    redraw: Callable[[torch.Generator], Batch] | None = None


@dataclass
class Context:
    """What a family's evaluate/generate step gets: its trained variants, config, device, output folder,
    and the folder its generate stage writes (which its evaluation may measure). A step adds to `tags` what
    else its results came from (FID's extractor): tags of its MLflow run."""

    variants: dict[str, Variant]
    cfg: Any
    device: torch.device
    out: Path
    seed: int
    samples: Path
    tags: dict[str, str] = dataclasses.field(default_factory=dict)


def _setup(name: str) -> tuple[ModuleType, Any, int, torch.device]:
    family = registry.family_module(name)
    cfg = config.load_section(name, family.Config)
    seed = config.load_section("common", config.Common).seed
    configure_cpu()
    return family, cfg, seed, resolve()


def train(name: str, restart: bool = False) -> None:
    """Train the family's variants; after a kill, a rerun with the same params, data and code resumes after the
    last complete epoch, into the same MLflow run (`restart` starts afresh instead)."""
    family, cfg, seed, device = _setup(name)
    if cfg.train.processes > 1 and "WORLD_SIZE" not in os.environ:
        if distributed.relaunch(cfg.train.processes, ["train", name]) != 0:
            raise RuntimeError(f"torchrun with {cfg.train.processes} processes failed (see the ranks' errors above)")
        return
    distributed.init(device)
    device = distributed.local_device(device)
    try:
        generator = seed_everything(seed)
        variants = family.variants(cfg)  # loads the data: missing data fails here, before any MLflow run exists
        # Resume points are single-process: torchrun ranks would each need their own.
        point = ResumePoint.load(name, fingerprint(name, cfg, seed), restart) if distributed.world_size() == 1 \
            else ResumePoint(name, "", enabled=False)
        # Only rank 0 tracks and writes; the other ranks just train their shards.
        with tracking.run(family.EXPERIMENT, name, "train", str(device), reopen_run_id=point.run_id) \
                if distributed.is_main() else nullcontext() as tracker:
            if tracker is not None and point.run_id is None:
                tracker.log_params(cfg.model_dump())
            if tracker is not None:
                tracker.set_tags({"precision": precision(device, cfg.train.mixed_precision)})
            point.run_id = tracker.run_id if tracker is not None else None
            results = {}
            for variant_name, variant in variants.items():
                prefix = f"{variant_name}/" if len(variants) > 1 else ""
                log = (lambda epoch, row, p=prefix: tracker.log_metrics({p + k: v for k, v in row.items()}, epoch)
                       ) if tracker is not None else (lambda *_: None)
                if variant_name in point.finished:
                    results[variant_name] = point.restore(variant_name, variant.model, generator)
                    continue
                resume = point.state_of(variant_name)
                if resume is not None and tracker is not None:
                    _log_missing_epochs(tracker, prefix, resume["history"])
                if variant.warm_start is not None:  # before a resume too: the tags describe the run either way
                    tags = variant.warm_start()
                    if tracker is not None:
                        tracker.set_tags({prefix + key: value for key, value in tags.items()})
                distributed.print_once(f"training {name}/{variant_name} on {device} x {distributed.world_size()}")
                results[variant_name] = fit(variant.model, variant.data["train"], variant.data.get("val"),
                                            cfg.train, device, generator, log, resume,
                                            (lambda state, v=variant_name: point.save(v, state)) if point.enabled
                                            else None, variant.data.get("test"), variant.redraw)
                point.finish(variant_name, variant.model, results[variant_name], generator)
            if tracker is not None:
                _save_training(name, family, cfg, variants, results, tracker)
        point.clear()
    finally:
        distributed.shutdown()


def fingerprint(name: str, cfg: Any, seed: int) -> str:
    """What a training's result depends on: its params, seed, data files and what else it reads (a pretrained
    model), and deepzoo's code (all of it: a resume point is worth less than the certainty that no code changed
    under it)."""
    digest = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), seed], sort_keys=True).encode())
    family = registry.FAMILIES[name]
    read = [Path("data/processed") / family.data, *map(Path, family.training_reads)]
    for path in [*sorted(Path(deepzoo.__file__).parent.rglob("*.py")), *sorted(p for r in read for p in r.rglob("*"))]:
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


class ResumePoint:
    """A training's state after its last complete epoch, in `.deepzoo/resume/<family>.pt`: outside DVC's outputs,
    written atomically after every epoch, removed when the stage completes. It resumes only the same training
    (same fingerprint: params, data and code); anything else starts afresh."""

    def __init__(self, name: str, fingerprint: str, enabled: bool = True) -> None:
        self.path, self.fingerprint, self.enabled = RESUME / f"{name}.pt", fingerprint, enabled
        self.run_id: str | None = None
        self.finished: dict[str, dict[str, Any]] = {}  # variant → its trained weights and FitResult
        self.current: dict[str, Any] | None = None  # {"variant", "state"}: the variant in training

    @classmethod
    def load(cls, name: str, fingerprint: str, restart: bool) -> ResumePoint:
        """The resume point of the same training, if one was left; else (or with `restart`) an empty one."""
        point = cls(name, fingerprint)
        if restart or not point.path.is_file():
            return point
        try:
            saved = torch.load(point.path, map_location="cpu")
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            print(f"{point.path} is unreadable: training {name} from the start")
            return point
        if saved["fingerprint"] != fingerprint:
            print(f"{point.path} is of other params, data or code: training {name} from the start")
            return point
        point.run_id, point.finished, point.current = saved["run_id"], saved["finished"], saved["current"]
        return point

    def state_of(self, variant: str) -> dict[str, Any] | None:
        return self.current["state"] if self.current and self.current["variant"] == variant else None

    def save(self, variant: str, state: dict[str, Any]) -> None:
        self.current = {"variant": variant, "state": state}
        save_torch(self.path, {"fingerprint": self.fingerprint, "run_id": self.run_id, "finished": self.finished,
                               "current": self.current})

    def finish(self, variant: str, model: Trainable, result: FitResult, generator: torch.Generator) -> None:
        """Keep a trained variant, with the random state the next variant starts from."""
        self.finished[variant] = {"model": {k: v.cpu() for k, v in model.state_dict().items()},
                                  "result": dataclasses.asdict(result),
                                  "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state()}}
        self.current = None

    def restore(self, variant: str, model: Trainable, generator: torch.Generator) -> FitResult:
        """A finished variant's weights and result, and the random state after it, as if it had just trained."""
        finished = self.finished[variant]
        model.load_state_dict(finished["model"])
        torch.set_rng_state(finished["rng"]["torch"])
        generator.set_state(finished["rng"]["generator"])
        return FitResult(**finished["result"])

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _log_missing_epochs(tracker: tracking.Tracker, prefix: str, history: list[dict[str, float]]) -> None:
    """Log the resumed epochs that the killed process had not: each epoch is in the run exactly once."""
    logged = tracker.logged_steps(prefix + next(iter(history[-1]))) if history else set()
    for epoch, row in enumerate(history, 1):
        if epoch not in logged:
            tracker.log_metrics({prefix + k: v for k, v in row.items()}, epoch)


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
            registered = registry.registered_model(name, variant_name, len(variants))
            logged = tracker.log_model(variant.model, variant_name, variant.model.example_input(variant.data["train"]),
                                       registered)
            summary["variants"][variant_name] = {
                "train_seconds": round(result.train_seconds, 2), "epochs_run": result.epochs_run,
                "best_epoch": result.best_epoch, "samples_per_second": round(result.samples_per_second, 1),
                **({"seconds_to_target": result.seconds_to_target} if result.seconds_to_target is not None else {}),
                "model_id": logged["model_id"], "registered_model": registered, "model_version": logged["version"]}
        save_figure(history_dir / "curves.png", _history_figure(name, {v: r.history for v, r in results.items()}))
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


def _history_figure(name: str, histories: dict[str, list[dict[str, float]]]) -> Any:
    """One panel per measure (`loss`, `accuracy`, …), its train and val curves by epoch for every variant: the
    learning curves as an image, which `dvc plots show` also renders offline (its charts load vega from a CDN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = sorted({key.partition("/")[2] for rows in histories.values() for row in rows for key in row if "/" in key})
    columns = min(3, len(measures))
    rows = -(-len(measures) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, measure in zip(axes.flat, measures, strict=False):
        for color, (variant, history) in enumerate(histories.items()):
            epochs = range(1, len(history) + 1)
            for split in ("train", "val"):
                if history and f"{split}/{measure}" in history[0]:
                    label = split if len(histories) == 1 else f"{variant} {split}"
                    ax.plot(epochs, [row[f"{split}/{measure}"] for row in history], label=label, color=f"C{color}",
                            linestyle="-" if split == "train" else "--")
        ax.set(title=measure, xlabel="epoch")
        ax.legend(fontsize=7)
    for ax in axes.flat[len(measures):]:
        ax.axis("off")
    fig.suptitle(f"{name}: learning curves")
    fig.tight_layout()
    return fig


def load_trained(name: str) -> tuple[ModuleType, Context, dict[str, Any]]:
    """The family's trained variants, rebuilt from the config saved in each checkpoint."""
    family, cfg, seed, device = _setup(name)
    summary_path = MODELS / name / RUN_FILE
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: run `dvc repro train@{name}` first")
    summary = json.loads(summary_path.read_text())
    checkpoints = {v: _load_checkpoint(MODELS / name / f"{v}.pt", name) for v in summary["variants"]}
    trained_cfg = family.Config.model_validate(next(iter(checkpoints.values()))["config"])
    seed_everything(seed)
    variants = family.variants(trained_cfg)
    for variant_name, variant in variants.items():
        variant.model.load_state_dict(checkpoints[variant_name]["state_dict"])
        variant.model.to(device).eval()
    return family, Context(variants, cfg, device, Path(), seed, SAMPLES / name), summary


def _load_checkpoint(path: Path, name: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path} cannot be read ({str(err).splitlines()[0][:160]}): restore it with "
                              f"`dvc checkout models/{name}` or retrain with `dvc repro -f train@{name}`") from None


def evaluate(name: str) -> None:
    family, ctx, summary = load_trained(name)
    with tracking.run(family.EXPERIMENT, name, "evaluate", str(ctx.device), summary["run_id"]) as tracker:
        with atomic_path(PLOTS / name / "evaluation") as out:
            out.mkdir()
            ctx.out = out
            with torch.no_grad():
                metrics = family.evaluate(ctx)
        metrics |= _training_metrics(summary) | {
            "parameters": sum(p.numel() for v in ctx.variants.values() for p in v.model.parameters())}
        write_json(METRICS / f"{name}.json", metrics)
        logged = {tracking.mlflow_key(k): v for k, v in metrics.items()}
        trained = summary["variants"]
        tracker.log_metrics(logged, models={v: trained[v]["model_id"] for v in trained if "model_id" in trained[v]})
        tracker.log_to_parent_once(logged)
        tracker.set_tags(ctx.tags)
        tracker.log_artifact(PLOTS / name / "evaluation", "plots/evaluation")
        _crown_if_best(name, metrics, trained, tracker)


def _crown_if_best(name: str, metrics: dict[str, float], trained: dict[str, Any], tracker: tracking.Tracker) -> None:
    """Alias the evaluated models `@champion` in the registry when the family's headline metric is its best yet."""
    family = registry.FAMILIES[name]
    for variant in trained.values():
        if "registered_model" in variant and tracker.crown_if_best(
                variant["registered_model"], variant["model_version"], family.headline, metrics[family.headline],
                family.higher_is_better):
            print(f"models:/{variant['registered_model']}@{tracking.CHAMPION} is now version {variant['model_version']}")


def _training_metrics(summary: dict[str, Any]) -> dict[str, float]:
    variants = summary["variants"]
    if len(variants) == 1:
        only = next(iter(variants.values()))
        return {key: only[key] for key in ("train_seconds", "epochs_run", "seconds_to_target") if key in only}
    return {"train_seconds": round(sum(v["train_seconds"] for v in variants.values()), 2)}


def generate(name: str) -> None:
    family, ctx, summary = load_trained(name)
    with tracking.run(family.EXPERIMENT, name, "generate", str(ctx.device), summary["run_id"]) as tracker:
        with atomic_path(SAMPLES / name) as out:
            out.mkdir()
            ctx.out = out
            family.generate(ctx)
        tracker.log_artifact(SAMPLES / name, "samples")
