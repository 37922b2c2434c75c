"""`deepzoo prepare DATASET` and `deepzoo train|evaluate|generate FAMILY`: the commands DVC stages run."""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deepzoo import config

DATASETS = ("fashion_mnist", "tunes", "toy2d")
RESOURCE_LOG = Path(".deepzoo/stages.jsonl")


def prepare(dataset: str) -> None:
    module = importlib.import_module(f"deepzoo.data.{dataset}")
    params = config.load_section(dataset, module.Params)
    seed = config.load_section("common", config.Common).seed
    counts = module.prepare(params, seed)
    print(f"prepared {dataset}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


@contextmanager
def record_resources(stage: str) -> Iterator[None]:
    """Append the stage's wall time and peak memory to `.deepzoo/stages.jsonl` (read by `make bench`).

    A side log like mlflow.db, not a DVC output: timings differ run to run and must not rerun anything.
    """
    start = time.perf_counter()
    yield
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    record = {"stage": stage, "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_kib / 1024),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    RESOURCE_LOG.parent.mkdir(exist_ok=True)
    with RESOURCE_LOG.open("a") as log:
        log.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    from deepzoo.engine import stages
    from deepzoo.engine.tracking import TrackingError
    from deepzoo.engine.trainer import TrainingDiverged

    parser = argparse.ArgumentParser(prog="deepzoo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="raw data -> data/processed/DATASET").add_argument("target", choices=DATASETS)
    for command in ("train", "evaluate", "generate"):
        commands.add_parser(command, help=f"{command} a family").add_argument("target", choices=stages.FAMILIES)
    args = parser.parse_args(argv)
    # On SIGTERM (a stopped `dvc repro`, a timeout) unwind normally: temporary outputs are removed
    # and the MLflow run is closed as FAILED instead of left RUNNING.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        with record_resources(f"{args.command} {args.target}"):
            if args.command == "prepare":
                prepare(args.target)
            else:
                getattr(stages, args.command)(args.target)
    # Expected failures (bad params or data, unreachable tracking, divergence) get one clear line;
    # anything else is a bug and keeps its traceback.
    except (ValueError, FileNotFoundError, TrackingError, TrainingDiverged) as err:
        print(f"deepzoo {args.command} {args.target}: error: {err}", file=sys.stderr)
        return 1
    return 0
