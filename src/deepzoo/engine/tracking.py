"""All MLflow calls live here: one run per training stage, reopened by its evaluation and generation.

Default store: `sqlite:///mlflow.db` in the repository root; `MLFLOW_TRACKING_URI` points elsewhere.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deepzoo
from deepzoo.storage import repository_root

DEFAULT_URI = "sqlite:///mlflow.db"
REACH_TIMEOUT_S = 5


class TrackingError(RuntimeError):
    """The tracking server cannot be reached or refused a request."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else `mlflow.db` in the repository root (also for `dvc exp` temporary
    copies: each experiment's run must outlive its copy)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = repository_root()
    return DEFAULT_URI if root == Path.cwd() else f"sqlite:///{root / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """Fail in seconds, before any training, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S) as response:
            response.read()
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({err}). Start it, fix MLFLOW_TRACKING_URI, "
            f"or unset it to use the local {DEFAULT_URI}."
        ) from None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


class Tracker:
    """The open run of one stage."""

    def __init__(self, mlflow: Any, run_id: str) -> None:
        self._mlflow, self.run_id = mlflow, run_id
        self.metric_seconds = 0.0  # time spent logging metrics: the overhead tracking adds to training

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: json.dumps(v) if isinstance(v, list | tuple) else v for k, v in flatten(params).items()}
        self._mlflow.log_params(flat)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """One batched request per call: per-epoch logging stays far below 1 % of training time."""
        from mlflow.entities import Metric

        start = time.perf_counter()
        now = int(time.time() * 1000)
        rows = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        self._mlflow.tracking.MlflowClient().log_batch(self.run_id, metrics=rows, synchronous=False)
        self.metric_seconds += time.perf_counter() - start

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), folder)
        else:
            self._mlflow.log_artifact(str(path), folder)

    def log_model(self, model: nn.Module, name: str, example: torch.Tensor) -> None:
        """Log a CPU copy of `model` with its signature, so it loads on machines without a GPU.

        Pickled with deepzoo's own code beside it (`code_paths`): torch.export ("pt2") would fix the
        batch size to the example's, and loading needs no deepzoo install either way.
        """
        from mlflow.models import infer_signature

        cpu_model = copy.deepcopy(model).cpu().eval()
        example = example.cpu()
        with torch.no_grad():
            output = cpu_model(example)
        signature = infer_signature(example.numpy(), output.numpy())
        self._mlflow.pytorch.log_model(
            cpu_model, name=name, signature=signature, input_example=example.numpy(),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pickle", code_paths=[str(Path(deepzoo.__file__).parent)],
        )


@contextmanager
def run(experiment: str, family: str, stage: str, device: str, resume_run_id: str | None = None
        ) -> Iterator[Tracker]:
    """Open the stage's MLflow run and always close it, as FAILED when the stage raises.

    A training stage starts a new run; its evaluation and generation stages pass the run id the
    training stage recorded, to add to that same run.
    """
    uri = tracking_uri()
    check_reachable(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    import mlflow

    mlflow.set_tracking_uri(uri)
    tags = {"family": family, "git_commit": git_commit(), "device": device, "torch_version": torch.__version__}
    if resume_run_id is not None and not _exists(mlflow, resume_run_id):
        print(f"MLflow run {resume_run_id} is not in {uri} (tracking store changed?): starting a new run")
        resume_run_id = None
    if resume_run_id is None:
        active = mlflow.start_run(experiment_id=_experiment_id(mlflow, experiment, uri), run_name=family,
                                  tags={**tags, "dvc_stage": f"{stage}@{family}"})
    else:
        active = mlflow.start_run(run_id=resume_run_id)
        mlflow.set_tags({f"dvc_stage.{stage}": f"{stage}@{family}", f"device.{stage}": device})
    try:
        yield Tracker(mlflow, active.info.run_id)
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.flush_async_logging()
    mlflow.end_run()


def _experiment_id(mlflow: Any, name: str, uri: str) -> str:
    """The experiment's id, creating it if needed; with a local SQLite store its artifacts go to
    `mlruns/` beside the database (not beside wherever the first run happened to start)."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def _exists(mlflow: Any, run_id: str) -> bool:
    try:
        mlflow.tracking.MlflowClient().get_run(run_id)
    except Exception:  # noqa: BLE001 - any failed lookup means the run is not in this store
        return False
    return True
