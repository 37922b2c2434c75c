"""`deepzoo prepare DATASET` and `deepzoo train|evaluate|generate FAMILY`: the commands DVC stages run.

It imports the modules of a command by name, through the registry, so that each stage's code is exactly what
the registry says it runs (`deepzoo.wiring` derives the stages' `deps` from that).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deepzoo import DeepzooError, config, registry

RESOURCE_LOG = Path(".deepzoo/stages.jsonl")


def prepare(dataset: str) -> None:
    module = registry.dataset_module(dataset)
    params = config.load_section(dataset, module.Params)
    seed = params.seed if registry.DATASETS[dataset].own_seed else config.load_section("common", config.Common).seed
    counts = module.prepare(params, seed)
    print(f"prepared {dataset}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


@contextmanager
def record_resources(stage: str) -> Iterator[None]:
    """Append the stage's wall time and peak memory to `.deepzoo/stages.jsonl` (read by `make bench`).

    A side log like mlflow.db, not a DVC output: timings differ run to run and must not rerun anything.
    """
    start = time.perf_counter()
    yield
    record = {"stage": stage, "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_kib() / 1024),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    RESOURCE_LOG.parent.mkdir(exist_ok=True)
    with RESOURCE_LOG.open("a") as log:
        log.write(json.dumps(record) + "\n")


def peak_rss_kib() -> int:
    """This process's own peak resident memory. Not `ru_maxrss` on Linux: exec keeps the launching process's
    peak in it (`dvc repro` starts stages with vfork + exec), so a 20 MB stage reported DVC's 1.5 GB."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])  # "VmHWM:   13620 kB"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes


def run_family_stage(command: str, family: str, **options: bool) -> None:
    """Import the orchestrator only here: `prepare` stages then need none of the training engine."""
    stages = importlib.import_module(registry.entry_modules(command, family)[0])
    getattr(stages, command)(family, **options)


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent (`dvc repro`) dies: a killed `dvc repro` must not
    leave a training behind that later writes outputs DVC no longer expects."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1  # noqa: N806 - the name in <sys/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


REDELIVERIES: list[threading.Timer] = []  # stops `redeliver_stops` will signal again, cancelled when the work ends


def redeliver_stops(unraisable: sys.UnraisableHookArgs) -> None:
    """`sys.unraisablehook`: a Ctrl-C or SIGTERM that lands while Python runs a finalizer or a weakref callback
    raises there, where Python reports it as "Exception ignored" and carries on: the training would run to its
    end. Signal this process again, from another thread a moment later: a handler runs as soon as the signal comes,
    and here it would raise inside this hook, ignored again. Should it land in a finalizer once more, this repeats."""
    stops = {KeyboardInterrupt: signal.SIGINT, SystemExit: signal.SIGTERM}
    if (stop := stops.get(type(unraisable.exc_value))) is not None:
        again = threading.Timer(0.01, os.kill, (os.getpid(), stop))
        again.daemon = True
        again.start()
        REDELIVERIES.append(again)
    else:
        sys.__unraisablehook__(unraisable)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepzoo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="raw data -> data/processed/DATASET").add_argument(
        "target", choices=registry.DATASETS)
    for command in registry.FAMILY_COMMANDS:
        commands.add_parser(command, help=f"{command} a family").add_argument("target", choices=registry.FAMILIES)
    commands.choices["train"].add_argument("--restart", action="store_true",
                                           help="start afresh instead of resuming a training that was killed")
    args = parser.parse_args(argv)
    # On SIGTERM (a stopped `dvc repro`, a timeout) unwind normally: temporary outputs are removed
    # and the MLflow run is closed as FAILED instead of left RUNNING.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.unraisablehook = redeliver_stops
    die_with_parent()
    where = f"deepzoo {args.command} {args.target}"
    try:
        with record_resources(f"{args.command} {args.target}"):
            if args.command == "prepare":
                prepare(args.target)
            else:
                options = {"restart": args.restart} if args.command == "train" else {}
                run_family_stage(args.command, args.target, **options)
    # Expected failures (bad params or data, unreachable tracking, divergence) get one clear line, their
    # traceback only with DEEPZOO_DEBUG=1; anything else is a bug and keeps its traceback.
    except KeyboardInterrupt:
        print(f"{where}: interrupted (Ctrl-C); outputs were left as they were", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, FileNotFoundError, DeepzooError) as err:
        if os.environ.get("DEEPZOO_DEBUG") == "1":
            raise
        print(f"{where}: error: {err}", file=sys.stderr)
        return 1
    finally:
        # The work is over, done, failed or stopped: a stop that `redeliver_stops` is still about to signal again
        # would land while Python shuts down, its handlers back to the default, and kill this orderly exit (seen:
        # exit -2 after the Ctrl-C message).
        for pending in REDELIVERIES:
            pending.cancel()
    return 0
