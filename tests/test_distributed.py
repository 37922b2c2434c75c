"""`train.processes: 2` launches torchrun (gloo on CPU) and matches a 1-process run with the same effective batch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from configs import merge, smoke_params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def deepzoo(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "deepzoo", *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("ddp")
    params = merge(smoke_params(), {"common": {"seed": 0}, "cnn": {"train": {"epochs": 2, "patience": None}}})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    done = deepzoo(workdir, "prepare", "fashion_mnist")
    assert done.returncode == 0, done.stderr
    return workdir


def train(workdir: Path, processes: int) -> list[dict[str, float]]:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["cnn"]["train"]["processes"] = processes
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    done = deepzoo(workdir, "train", "cnn")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (workdir / "reports/plots/cnn/history/cnn.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_two_processes_match_one_process(workdir):
    single = train(workdir, 1)
    double = train(workdir, 2)
    # Rank r trains on every 2nd item of the shared shuffled order with half the batch, and gradients
    # are averaged: the same updates as one process, up to floating-point summation order.
    for one, two in zip(single, double, strict=True):
        assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-3)
        assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-3)
    summary = json.loads((workdir / "models/cnn/training.json").read_text())
    runs = subprocess.run([sys.executable, "-c", "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
                           "print(len(mlflow.search_runs(experiment_names=['fashion-mnist-classification'])))"],
                          cwd=workdir, capture_output=True, text=True)
    assert runs.stdout.strip() == "2", runs.stderr[-2000:]  # one run per training: only rank 0 logs
    assert summary["variants"]["cnn"]["epochs_run"] == 2
