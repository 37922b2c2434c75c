"""`make bench`: deepzoo's speed, measured (never asserted in tests). Results go to reports/benchmarks.json.

- per family: training throughput through the shared trainer vs a bare PyTorch loop of the same model,
  data, batch size and optimizer, in the same process, alternating: the median ratio of the rounds and its
  spread (goal: ratio >= 0.95);
- time to 0.91 test accuracy: the plainest loop of the lecture recipe (`bare_lecture_seconds`), the `cnn`
  family's default recipe and the lecture's recipe through the trainer, and `resnet`'s default recipe;
- what a stage pays before its work (Python, PyTorch and deepzoo imports, MLflow and its store);
- MLflow overhead (share of training time spent logging metrics) and each stage's wall time and peak
  memory, from the last `dvc repro` (`.deepzoo/stages.jsonl`, `models/F/training.json`);
- a no-op `dvc repro`, beside DVC's own floor: a synthetic pipeline of as many trivial stages (also with
  params.yaml read by each, and with deepzoo's dependencies per stage);
- R-CNN against Faster R-CNN: the trained detectors' milliseconds per test scene, alternating, and the speed-up.

Run from the repository root after `dvc repro` (it reads processed data, params and trained models).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepzoo import config, registry
from deepzoo.data import fashion_mnist, scenes
from deepzoo.engine import stages
from deepzoo.engine.device import configure_cpu, resolve
from deepzoo.engine.trainer import (
    Trainable,
    autocast,
    batches,
    fit,
    has_convolutions,
    seconds_to_reach,
    to_device,
)
from deepzoo.families import cnn
from deepzoo.metrics import detection
from deepzoo.storage import write_json

OUTPUT = Path("reports/benchmarks.json")
# An absolute path: the floor runs DVC in a scratch directory, where a relative PATH entry (.venv/bin) finds nothing.
DVC = str(Path(found).absolute()) if (found := shutil.which("dvc")) else "dvc"
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "adadelta": torch.optim.Adadelta, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}


TARGET_ACCURACY = 0.91
LECTURE_RECIPE = {"optimizer": "adam", "lr": 1e-3, "batch_size": 64, "schedule": "none", "ema": None}  # the 6.S191 lab's


def fresh_variant(family_name: str, seed: int = 0, **train: object):
    """The family's model and data as its params say, with `train` overriding keys of its `train:` section."""
    family = registry.family_module(family_name)
    cfg = config.load_section(family_name, family.Config)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})
    torch.manual_seed(seed)
    variant = next(iter(family.variants(cfg).values()))
    return variant, cfg


def bare_loop(model: Trainable, data, cfg, device, n_batches: int) -> float:
    """The plainest PyTorch loop of the same model, optimizer and numerics: samples per second.

    It makes the recipe's choices the trainer makes (gradient clipping, channels_last convolutions, bf16 autocast
    when `mixed_precision` and the device has bf16; on a GPU the dataset resident there), so the ratio measures
    the loop, not the setup.
    """
    model.to(device).train()
    if device.type == "cuda":
        data = tuple(t.to(device) for t in data)
    if has_convolutions(model):
        model.to(memory_format=torch.channels_last)
    groups = model.optimizer_groups()
    optimizers = {name: OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr) for name, params in groups.items()}
    generator, samples = torch.Generator().manual_seed(0), 0
    start = time.perf_counter()
    for batch in batches(data, cfg.batch_size, generator, n_batches):
        samples += len(batch[0])  # before `prepare`, as the trainer counts: rcnn's prepare turns scenes into crops
        batch = model.prepare(to_device(batch, device))
        with autocast(device, cfg.mixed_precision):
            for group, loss, _ in model.training_losses(batch):
                optimizers[group].zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad_norm is not None:  # part of the recipe (rnn, lstm), so the bare loop clips too
                    torch.nn.utils.clip_grad_norm_(groups[group], cfg.clip_grad_norm)
                optimizers[group].step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return samples / (time.perf_counter() - start)


def trainer_loop(model: Trainable, data, cfg, device, n_batches: int) -> float:
    # the loop's own cost only: a recipe's schedule and weight average are work the bare loop does not do
    one_epoch = cfg.model_copy(update={"epochs": 1, "max_batches": n_batches, "patience": None, "schedule": "none",
                                       "ema": None})
    return fit(model, data, None, one_epoch, device, torch.Generator().manual_seed(0)).samples_per_second


def throughput(family_name: str, device: torch.device, n_batches: int, rounds: int) -> dict[str, float]:
    """Trainer and bare loop alternating for `rounds` rounds, so both see the same machine conditions: the
    best rate of each, and the median and range of the rounds' ratios (one round's ratio varies by ±10 %)."""
    rates: dict[str, list[float]] = {"trainer": [], "bare": []}
    variant, cfg = fresh_variant(family_name)
    bare_loop(variant.model, variant.data["train"], cfg.train, device, 3)  # warm-up: the first batches pay allocations
    for _ in range(rounds):
        for loop, run in (("trainer", trainer_loop), ("bare", bare_loop)):
            variant, cfg = fresh_variant(family_name)
            rates[loop].append(run(variant.model, variant.data["train"], cfg.train, device, n_batches))
    ratios = [trainer / bare for trainer, bare in zip(rates["trainer"], rates["bare"], strict=True)]
    unit = "chars" if family_name in ("rnn", "lstm") else "samples"
    scale = variant.data["train"][0].shape[1] - 1 if unit == "chars" else 1  # a window predicts seq_length chars
    return {f"trainer_{unit}_per_s": round(max(rates["trainer"]) * scale, 1),
            f"bare_{unit}_per_s": round(max(rates["bare"]) * scale, 1),
            "ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3), "rounds": rounds}


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


def trainer_time_to_target(name: str, family_name: str, device: torch.device, **train: object) -> dict[str, float | None]:
    """`name`_seconds: training seconds of the family's recipe (`train` overrides) until test accuracy first
    reaches the target, as the trainer measures it for `seconds_to_target` (it stops there); `name`_epochs."""
    variant, cfg = fresh_variant(family_name, target_accuracy=TARGET_ACCURACY, **train)
    history: list[dict[str, float]] = []

    def stop_at_target(_epoch: int, row: dict[str, float]) -> None:
        history.append(row)
        if row["monitor/accuracy"] >= TARGET_ACCURACY:
            raise TargetReached

    with contextlib.suppress(TargetReached):
        fit(variant.model, variant.data["train"], variant.data["val"], cfg.train, device,
            torch.Generator().manual_seed(0), on_epoch=stop_at_target, test=variant.data["test"])
    seconds = seconds_to_reach(history, "monitor/accuracy", TARGET_ACCURACY)
    return {f"{name}_seconds": seconds, f"{name}_epochs": len(history) if seconds is not None else None}


def bare_lecture_time_to_target(device: torch.device, max_epochs: int = 12) -> dict[str, float | None]:
    """The plainest loop of the lecture recipe: the lecture CNN, Adam 1e-3, batches of 64 from all 60k training
    images as float tensors prepared once, `randperm` slices, no validation; test passes are not timed.
    Its seconds and epochs to the target, and its images per second."""
    torch.manual_seed(0)
    model = cnn.CNN(cnn.ModelConfig(filters=(32, 64), dense=1024, batch_norm=False, dropout=0.0, augment=False))
    model.to(device)
    parts = [fashion_mnist.load(split) for split in ("train", "val")]
    images = fashion_mnist.to_unit(torch.cat([p["images"] for p in parts])).to(device)
    labels = torch.cat([p["labels"] for p in parts]).to(device)
    test = fashion_mnist.load("test")
    test_images, test_labels = fashion_mnist.to_unit(test["images"]).to(device), test["labels"].to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LECTURE_RECIPE["lr"])
    trained = 0.0
    for epoch in range(1, max_epochs + 1):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(images), device=device)
        for first in range(0, len(images), LECTURE_RECIPE["batch_size"]):
            index = order[first : first + LECTURE_RECIPE["batch_size"]]
            loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        trained += time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            correct = sum((model(test_images[i : i + 1000]).argmax(1) == test_labels[i : i + 1000]).sum().item()
                          for i in range(0, len(test_images), 1000))
        if correct / len(test_images) >= TARGET_ACCURACY:
            break
    reached = correct / len(test_images) >= TARGET_ACCURACY
    return {"bare_lecture_seconds": round(trained, 1) if reached else None, "bare_lecture_epochs": epoch if reached else None,
            "bare_lecture_samples_per_s": round(epoch * len(images) / trained, 1)}


def time_to_target(device: torch.device) -> dict[str, float | None]:
    """Seconds to `TARGET_ACCURACY` test accuracy, every figure from this run on this machine."""
    return {"target_accuracy": TARGET_ACCURACY, **bare_lecture_time_to_target(device),
            **trainer_time_to_target("cnn", "cnn", device),
            **trainer_time_to_target("cnn_lecture_recipe", "cnn", device, **LECTURE_RECIPE, epochs=12),
            **trainer_time_to_target("resnet", "resnet", device)}


STARTUP_PROBES = {  # what a stage loads before its work, one cold process per measure
    "python": "pass",
    "torch": "import torch",
    "deepzoo_stage": "import deepzoo.engine.stages, deepzoo.families.{family}",
    # torch.optim's first optimizer imports torch._dynamo (its @_disable_dynamo decorators)
    "first_optimizer": "import torch; torch.optim.Adam(torch.nn.Linear(1, 1).parameters())",
    "mlflow_and_store": "import mlflow; mlflow.set_tracking_uri('sqlite:///{scratch}/m.db'); mlflow.search_experiments()",
    "plotting": "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot",
}


def startup_seconds(family: str = "cnn", repeats: int = 3) -> dict[str, float]:
    """Median seconds of a fresh interpreter doing each of `STARTUP_PROBES`: what every stage pays before it starts
    its own work (each probe includes Python's own start-up, `python`)."""
    timings = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, code in STARTUP_PROBES.items():
            command = [sys.executable, "-c", code.format(family=family, scratch=scratch)]
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, env={"PYTHONPATH": "src", "PATH": ""})
                runs.append(time.perf_counter() - start)
            timings[name] = round(statistics.median(runs), 2)
    return timings


def timed_noop_repro(repo: Path, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([DVC, "repro"], cwd=repo, capture_output=True, check=True)
        timings.append(time.perf_counter() - start)
    return round(statistics.median(timings), 2)


def noop_repro_seconds(repeats: int = 3) -> float | None:
    """Median seconds of `dvc repro` on an up-to-date pipeline; None when it is not up to date."""
    if subprocess.run([DVC, "status", "--quiet"], check=False, capture_output=True).returncode != 0:
        print("pipeline not up to date: run `make run` first to time a no-op `dvc repro`")
        return None
    return timed_noop_repro(Path(), repeats)


def noop_repro_floor_seconds(stages_count: int, deps_per_stage: int = 1, params: Path | None = None,
                             repeats: int = 3) -> float:
    """DVC's own floor: a no-op `dvc repro` of a synthetic pipeline of `stages_count` trivial stages, each with
    `deps_per_stage` small dependencies (and, with `params`, a copy of that file as its params dependency) and
    one output, in a scratch repository."""
    with tempfile.TemporaryDirectory() as scratch:
        repo = Path(scratch)
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        subprocess.run([DVC, "init", "-q"], cwd=repo, check=True)
        if params is not None:
            shutil.copy(params, repo / "params.yaml")
        stages_yaml = {}
        for i in range(stages_count):
            deps = [f"in_{i}_{j}.txt" for j in range(deps_per_stage)]
            for j, dep in enumerate(deps):
                (repo / dep).write_text(f"{i} {j}\n")
            stages_yaml[f"s{i}"] = {"cmd": f"cp {deps[0]} out_{i}.txt", "deps": deps, "outs": [f"out_{i}.txt"],
                                    **({"params": ["common"]} if params is not None else {})}
        (repo / "dvc.yaml").write_text(json.dumps({"stages": stages_yaml}))  # JSON is YAML
        subprocess.run([DVC, "repro", "-q"], cwd=repo, capture_output=True, check=True)
        return timed_noop_repro(repo, repeats)


def detection_speed(rounds: int, scenes_count: int = 200) -> dict[str, float | int]:
    """Milliseconds per image of the trained R-CNN and Faster R-CNN on the same test scenes, alternating for
    `rounds` rounds so both see the same machine conditions (their `evaluate` stages run minutes apart): one image
    at a time as their evaluation times it (latency), and in batches, each detector at the fastest of
    `detection.THROUGHPUT_BATCHES` (throughput). Each detector's median and the median speed-up of the rounds,
    its spread."""
    images = scenes.load("test")["images"][:scenes_count]
    detectors = {name: registry.family_module(name).detector(stages.load_trained(name)[1])
                 for name in ("rcnn", "faster_rcnn")}
    milliseconds: dict[str, list[float]] = {f"{name}{kind}": [] for name in detectors for kind in ("", "_batched")}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, detect in detectors.items():
                seconds = detection.throughput(detect, images)  # its batches of 1: one image at a time
                milliseconds[name].append(seconds[1] * 1000)
                milliseconds[f"{name}_batched"].append(min(seconds.values()) * 1000)
    results: dict[str, float | int] = {"rounds": rounds, "scenes": len(images)}
    for kind in ("", "_batched"):
        slow, fast = milliseconds[f"rcnn{kind}"], milliseconds[f"faster_rcnn{kind}"]
        speedups = [r / f for r, f in zip(slow, fast, strict=True)]
        results |= {f"rcnn{kind}_ms_per_image": round(statistics.median(slow), 3),
                    f"faster_rcnn{kind}_ms_per_image": round(statistics.median(fast), 3),
                    f"speedup{kind}": round(statistics.median(speedups), 2),
                    f"speedup{kind}_min": round(min(speedups), 2), f"speedup{kind}_max": round(max(speedups), 2)}
    return results


def pipeline_shape() -> tuple[int, int]:
    """Stages of deepzoo's pipeline (foreach expanded) and their dependencies per stage (rounded), as `dvc.lock`
    lists them."""
    import yaml

    stages = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
    return len(stages), round(sum(len(stage.get("deps", [])) for stage in stages.values()) / len(stages))


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


PARTS = ["throughput", "time_to_target", "startup", "detection", "repro"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=[f for f in registry.FAMILIES if f != "perceptron"])
    parser.add_argument("--batches", type=int, default=60, help="batches per throughput measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS,
                        help="what to measure (the no-op repro needs an up-to-date pipeline: after `make run`)")
    parser.add_argument("--compile", nargs="*", default=[], metavar="FAMILY",
                        help="also measure these families with torch.compile")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    configure_cpu()
    device = resolve()
    results = json.loads(args.output.read_text()) if args.output.is_file() else {}
    results["machine"] = {"device": str(device), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "platform": platform.platform(), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    results.setdefault("throughput", {})
    for name in args.families if "throughput" in args.parts else []:
        results["throughput"][name] = throughput(name, device, args.batches, args.rounds)
        print(f"{name}: {results['throughput'][name]}", flush=True)
        write_json(args.output, results)
    for name in args.compile:
        results.setdefault("compile", {})[name] = compiled_throughput(name, device, args.batches)
        print(f"{name} torch.compile: {results['compile'][name]}", flush=True)
    if "time_to_target" in args.parts:
        results["time_to_target"] = time_to_target(device)
        print(f"time to {TARGET_ACCURACY}: {results['time_to_target']}", flush=True)
        write_json(args.output, results)  # each part as it ends: a later part's failure loses nothing
    if "startup" in args.parts:
        results["startup_seconds"] = startup_seconds()
        print(f"stage start-up: {results['startup_seconds']}", flush=True)
        write_json(args.output, results)
    if "detection" in args.parts:  # needs the trained detectors (models/rcnn, models/faster_rcnn)
        results["detection_speed"] = detection_speed(args.rounds)
        print(f"R-CNN vs Faster R-CNN: {results['detection_speed']}", flush=True)
        write_json(args.output, results)
    if "repro" in args.parts:  # needs dvc (not on a bare GPU box) and the last `dvc repro`'s outputs
        results["mlflow_overhead_percent"] = tracking_overhead()
        results["stages"] = last_run_resources()
        results["noop_repro_seconds"] = noop_repro_seconds()
        stages, deps = pipeline_shape()
        results["noop_repro_floor_seconds"] = noop_repro_floor_seconds(stages)
        # DVC parses a stage's params file once per stage: the floor with deepzoo's params.yaml read by each stage,
        # and with deepzoo's shape (as many dependencies per stage too)
        results["noop_repro_params_floor_seconds"] = noop_repro_floor_seconds(stages, 1, Path("params.yaml"))
        results["noop_repro_same_shape_floor_seconds"] = noop_repro_floor_seconds(stages, deps, Path("params.yaml"))
        print(f"no-op dvc repro: {results['noop_repro_seconds']} s (DVC's floor: {results['noop_repro_floor_seconds']} s, "
              f"{results['noop_repro_params_floor_seconds']} s with params.yaml per stage, "
              f"{results['noop_repro_same_shape_floor_seconds']} s with {deps} deps too); "
              f"MLflow overhead %: {results['mlflow_overhead_percent']}")
    write_json(args.output, results)


if __name__ == "__main__":
    main()
