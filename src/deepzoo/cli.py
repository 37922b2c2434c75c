"""`deepzoo prepare DATASET` and `deepzoo train|evaluate|generate FAMILY`: the commands DVC stages run."""

from __future__ import annotations

import argparse
import importlib
import sys

from deepzoo import config

DATASETS = ("fashion_mnist", "tunes", "toy2d")


def prepare(dataset: str) -> None:
    module = importlib.import_module(f"deepzoo.data.{dataset}")
    params = config.load_section(dataset, module.Params)
    seed = config.load_section("common", config.Common).seed
    counts = module.prepare(params, seed)
    print(f"prepared {dataset}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


def main(argv: list[str] | None = None) -> int:
    from deepzoo.engine import stages

    parser = argparse.ArgumentParser(prog="deepzoo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="raw data -> data/processed/DATASET").add_argument("target", choices=DATASETS)
    for command in ("train", "evaluate", "generate"):
        commands.add_parser(command, help=f"{command} a family").add_argument("target", choices=stages.FAMILIES)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.target)
        else:
            getattr(stages, args.command)(args.target)
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as err:
        print(f"deepzoo {args.command} {args.target}: error: {err}", file=sys.stderr)
        return 1
    return 0
