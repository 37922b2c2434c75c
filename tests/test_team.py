"""Team setup: an MLflow tracking server on loopback, and what happens when it cannot be reached."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from configs import merge, smoke_params

TINY = merge(smoke_params(), {"common": {"seed": 0}, "toy2d": {"n_samples": 100},
                              "perceptron": {"model": {"activations": ["relu"]}, "evaluate": {"grid": 10}}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepzoo(workdir: Path, *args: str, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "deepzoo", *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    done = deepzoo(tmp_path, "prepare", "toy2d", uri="sqlite:///unused.db")
    assert done.returncode == 0, done.stderr
    return tmp_path


def test_unreachable_tracking_server_fails_before_training_with_a_clear_message(workdir):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = deepzoo(workdir, "train", "perceptron", uri=uri)
    assert done.returncode == 1
    assert f"MLflow tracking server {uri} is not reachable" in done.stderr
    assert "MLFLOW_TRACKING_URI" in done.stderr and "Traceback" not in done.stderr
    assert not (workdir / "models").exists()


@pytest.fixture
def tracking_server(tmp_path: Path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # bounded wait for start-up (database migrations take a while)
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 60 s")
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_training_stage_logs_to_a_tracking_server(workdir, tracking_server):
    done = deepzoo(workdir, "train", "perceptron", uri=tracking_server)
    assert done.returncode == 0, done.stderr[-3000:]
    check = ("import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]);"
             "run = mlflow.search_runs(experiment_names=['toy2d'], output_format='list')[0];"
             "print(run.data.params['train.epochs'], 'deep_relu/val/loss' in run.data.metrics, run.data.tags['family']);"
             "model = mlflow.pytorch.load_model(f'runs:/{run.info.run_id}/deep_relu', map_location='cpu');"
             "print(type(model).__name__)")
    found = subprocess.run([sys.executable, "-c", check, tracking_server], cwd=workdir, capture_output=True, text=True)
    assert found.stdout.split() == ["2", "True", "perceptron", "Perceptron"], found.stderr[-3000:]
