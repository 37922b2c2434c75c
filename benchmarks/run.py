"""`make bench`: deepzoo's speed, measured (never asserted in tests). Results go to reports/benchmarks.json.

- per family: training throughput through the shared trainer vs a bare PyTorch loop of the same model,
  data, batch size and optimizer, in the same process (goal: ratio >= 0.95);
- cnn: wall-clock seconds of the default recipe until test accuracy first reaches 0.91;
- MLflow overhead (share of training time spent logging metrics) and each stage's wall time and peak
  memory, from the last `dvc repro` (`.deepzoo/stages.jsonl`, `models/F/training.json`);
- a no-op `dvc repro` (goal <= 1 s).

Run from the repository root after `dvc repro` (it reads processed data, params and trained models).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from deepzoo import config, registry
from deepzoo.engine import stages
from deepzoo.engine.device import configure_threads, resolve
from deepzoo.engine.trainer import Trainable, batches, evaluate, fit, to_device
from deepzoo.storage import write_json

OUTPUT = Path("reports/benchmarks.json")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "adadelta": torch.optim.Adadelta, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}


def fresh_variant(family_name: str, seed: int = 0):
    family = registry.family_module(family_name)
    cfg = config.load_section(family_name, family.Config)
    torch.manual_seed(seed)
    variant = next(iter(family.variants(cfg).values()))
    return variant, cfg


def bare_loop(model: Trainable, data, cfg, device, n_batches: int) -> float:
    """The plainest PyTorch loop of the same model, optimizer and numerics: samples per second.

    It makes the recipe's choices the trainer makes (gradient clipping; on a GPU the dataset resident on
    the GPU, channels_last convolutions, bf16 autocast when `mixed_precision`), so the ratio measures the
    loop, not the setup.
    """
    model.to(device).train()
    bf16 = cfg.mixed_precision and device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        data = tuple(t.to(device) for t in data)
        if any(isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) for m in model.modules()):
            model.to(memory_format=torch.channels_last)
    groups = model.optimizer_groups()
    optimizers = {name: OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr) for name, params in groups.items()}
    generator, samples = torch.Generator().manual_seed(0), 0
    start = time.perf_counter()
    for batch in batches(data, cfg.batch_size, generator, n_batches):
        batch = model.prepare(to_device(batch, device))
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            for group, loss, _ in model.training_losses(batch):
                optimizers[group].zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad_norm is not None:  # part of the recipe (rnn, lstm), so the bare loop clips too
                    torch.nn.utils.clip_grad_norm_(groups[group], cfg.clip_grad_norm)
                optimizers[group].step()
        samples += len(batch[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return samples / (time.perf_counter() - start)


def trainer_loop(model: Trainable, data, cfg, device, n_batches: int) -> float:
    one_epoch = cfg.model_copy(update={"epochs": 1, "max_batches": n_batches, "patience": None, "schedule": "none"})
    return fit(model, data, None, one_epoch, device, torch.Generator().manual_seed(0)).samples_per_second


def throughput(family_name: str, device: torch.device, n_batches: int, rounds: int) -> dict[str, float]:
    """Best of `rounds` alternating runs each, so both loops see the same machine conditions."""
    best = {"trainer": 0.0, "bare": 0.0}
    for _ in range(rounds):
        for loop, run in (("trainer", trainer_loop), ("bare", bare_loop)):
            variant, cfg = fresh_variant(family_name)
            best[loop] = max(best[loop], run(variant.model, variant.data["train"], cfg.train, device, n_batches))
    unit = "chars" if family_name in ("rnn", "lstm") else "samples"
    scale = variant.data["train"][0].shape[1] - 1 if unit == "chars" else 1  # a window predicts seq_length chars
    return {f"trainer_{unit}_per_s": round(best["trainer"] * scale, 1), f"bare_{unit}_per_s": round(best["bare"] * scale, 1),
            "ratio": round(best["trainer"] / best["bare"], 3)}


class TargetReached(Exception):
    pass


def compiled_throughput(family_name: str, device: torch.device, n_batches: int) -> dict[str, float]:
    """Trainer throughput with and without `train.compile` (after a compiling warm-up)."""
    rates = {}
    for compiled in (False, True):
        variant, cfg = fresh_variant(family_name)
        train_cfg = cfg.train.model_copy(update={"compile": compiled})
        trainer_loop(variant.model, variant.data["train"], train_cfg, device, 5)  # warm-up: compiles
        rates["compiled" if compiled else "eager"] = round(
            trainer_loop(variant.model, variant.data["train"], train_cfg, device, n_batches), 1)
    return {**rates, "speedup": round(rates["compiled"] / rates["eager"], 3)}


def cnn_time_to_accuracy(device: torch.device, target: float = 0.91) -> dict[str, float | None]:
    """Seconds of the default cnn recipe (its own validation included, our extra test passes not)
    until test accuracy first reaches `target`."""
    variant, cfg = fresh_variant("cnn")
    test, start, excluded = variant.data["test"], time.perf_counter(), 0.0
    reached: dict[str, float | None] = {"seconds": None, "epoch": None, "accuracy": None}

    def on_epoch(epoch: int, _row: dict[str, float]) -> None:
        nonlocal excluded
        elapsed, tic = time.perf_counter() - start - excluded, time.perf_counter()
        accuracy = evaluate(variant.model, test, 1000, device)["accuracy"]
        variant.model.train()
        excluded += time.perf_counter() - tic
        if accuracy >= target:
            reached.update(seconds=round(elapsed, 1), epoch=epoch, accuracy=round(accuracy, 4))
            raise TargetReached

    try:
        fit(variant.model, variant.data["train"], variant.data["val"], cfg.train, device,
            torch.Generator().manual_seed(0), on_epoch=on_epoch)
    except TargetReached:
        pass
    return {"target_accuracy": target, **reached}


def noop_repro_seconds(repeats: int = 3) -> float | None:
    """Median seconds of `dvc repro` on an up-to-date pipeline; None when it is not up to date."""
    if subprocess.run(["dvc", "status", "--quiet"], capture_output=True).returncode != 0:
        print("pipeline not up to date: run `make run` first to time a no-op `dvc repro`")
        return None
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(["dvc", "repro"], capture_output=True, check=True)
        timings.append(time.perf_counter() - start)
    return round(statistics.median(timings), 2)


def last_run_resources() -> dict[str, dict[str, float]]:
    """Each stage's latest wall time and peak memory, as the stages recorded them."""
    log = Path(".deepzoo/stages.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return {r["stage"]: {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"]} for r in records}


def tracking_overhead() -> dict[str, float]:
    shares = {}
    for path in sorted(stages.MODELS.glob(f"*/{stages.RUN_FILE}")):
        summary = json.loads(path.read_text())
        train = sum(v["train_seconds"] for v in summary["variants"].values())
        if "metric_logging_seconds" in summary and train > 0:
            shares[path.parent.name] = round(100 * summary["metric_logging_seconds"] / train, 3)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=[f for f in registry.FAMILIES if f != "perceptron"])
    parser.add_argument("--batches", type=int, default=60, help="batches per throughput measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-time-to-accuracy", action="store_true")
    parser.add_argument("--compile", nargs="*", default=[], metavar="FAMILY",
                        help="also measure these families with torch.compile")
    parser.add_argument("--skip-repro", action="store_true", help="no `dvc repro` timing (e.g. on a GPU box without dvc)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    configure_threads()
    device = resolve()
    results = json.loads(args.output.read_text()) if args.output.is_file() else {}
    results["machine"] = {"device": str(device), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "platform": platform.platform(), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    results.setdefault("throughput", {})
    for name in args.families:
        results["throughput"][name] = throughput(name, device, args.batches, args.rounds)
        print(f"{name}: {results['throughput'][name]}", flush=True)
    for name in args.compile:
        results.setdefault("compile", {})[name] = compiled_throughput(name, device, args.batches)
        print(f"{name} torch.compile: {results['compile'][name]}", flush=True)
    if not args.skip_time_to_accuracy:
        results["cnn_time_to_accuracy"] = cnn_time_to_accuracy(device)
        print(f"cnn time to accuracy: {results['cnn_time_to_accuracy']}", flush=True)
    if not args.skip_repro:
        results["mlflow_overhead_percent"] = tracking_overhead()
        results["stages"] = last_run_resources()
        results["noop_repro_seconds"] = noop_repro_seconds()
        print(f"no-op dvc repro: {results['noop_repro_seconds']} s; MLflow overhead %: {results['mlflow_overhead_percent']}")
    write_json(args.output, results)


if __name__ == "__main__":
    main()
