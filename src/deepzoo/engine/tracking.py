"""All MLflow calls live here: one run per training stage; its evaluation and generation each open a run nested
under it, so that their failures or reruns never change the training run's state or history.

Default store: `sqlite:///mlflow.db` in the repository root; `MLFLOW_TRACKING_URI` points elsewhere.
"""

from __future__ import annotations

import copy
import json
import os
import socket
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
PID_TAG, HOST_TAG = "deepzoo.pid", "deepzoo.host"  # which process owns a RUNNING run
CHAMPION = "champion"  # the registry alias of each family's best model trained outside DVC experiments


class TrackingError(deepzoo.DeepzooError):
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


def git(*args: str) -> str | None:
    """git's answer, or None where there is no git or no repository."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict[str, str]:
    """Tags that say what produced a run: the commit, whether the work tree had uncommitted changes, and the
    DVC experiment (`dvc exp run` exports its name and baseline to the stages it runs)."""
    status = git("status", "--porcelain", "--untracked-files=no")
    tags = {"git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": "unknown" if status is None else str(bool(status)).lower()}
    if os.environ.get("DVC_EXP_NAME"):
        tags |= {"dvc_exp_name": os.environ["DVC_EXP_NAME"],
                 "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "unknown")}
    return tags


def mlflow_key(key: str) -> str:
    """A metrics-file key as MLflow shows it, grouped without doubled prefixes: `test_accuracy` → `test/accuracy`,
    `train_seconds` → `time/train_seconds`, `fid` → `test/fid`, `parameters` → `model/parameters`."""
    if key.endswith("_seconds"):
        return f"time/{key}"
    if key in ("parameters", "epochs_run"):
        return f"model/{key}"
    return f"test/{key.removeprefix('test_')}"


class Tracker:
    """The open run of one stage."""

    def __init__(self, mlflow: Any, run_id: str, parent_run_id: str | None = None) -> None:
        self._mlflow, self.run_id, self.parent_run_id = mlflow, run_id, parent_run_id
        self.metric_seconds = 0.0  # time spent logging metrics: the overhead tracking adds to training

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: json.dumps(v) if isinstance(v, list | tuple) else v for k, v in flatten(params).items()}
        self._mlflow.log_params(flat)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None,
                    models: Mapping[str, str] | None = None) -> None:
        """One batched, synchronous request per call: per-epoch logging stays far below 1 % of training time, and
        MLflow's asynchronous queue would cost every stage about 2 s to drain and could lose epochs to a SIGKILL.

        `models` (variant → logged model id) links the metrics to the models they measure, so each model's page
        shows them: all of them for a single model, else those whose key ends with `_<variant>`."""
        from mlflow.entities import Metric

        start = time.perf_counter()
        now = int(time.time() * 1000)
        models = models or {}
        rows = [Metric(key, float(value), now, step or 0, model_id=model_id)
                for key, value in metrics.items()
                for model_id in [m for v, m in models.items() if len(models) == 1 or key.endswith(f"_{v}")] or [None]]
        self._mlflow.tracking.MlflowClient().log_batch(run_id or self.run_id, metrics=rows)
        self.metric_seconds += time.perf_counter() - start

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric `key` of this run has been logged."""
        return {m.step for m in self._mlflow.tracking.MlflowClient().get_metric_history(self.run_id, key)}

    def log_to_parent_once(self, metrics: Mapping[str, float]) -> None:
        """Give the training run these metrics too, the first time its model is measured: the runs table then
        compares trainings by their results, while a re-measurement (say, by a new FID extractor) stays in its
        own nested run instead of appending a second value to the training's history."""
        if self.parent_run_id is None:
            return
        logged = self._mlflow.tracking.MlflowClient().get_run(self.parent_run_id).data.metrics
        if not set(metrics) & set(logged):
            self.log_metrics(metrics, run_id=self.parent_run_id)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._mlflow.set_tags(dict(tags))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), folder)
        else:
            self._mlflow.log_artifact(str(path), folder)

    def log_model(self, model: nn.Module, name: str, example: torch.Tensor, registered_name: str) -> dict[str, str]:
        """Log a CPU copy of `model` with its signature, so it loads on machines without a GPU, and register it as
        a new version of `registered_name`. Returns its `model_id` and `version`.

        Pickled with deepzoo's own code beside it (`code_paths`): torch.export ("pt2") would fix the
        batch size to the example's, and loading needs no deepzoo install either way.
        """
        from mlflow.models import infer_signature

        cpu_model = copy.deepcopy(model).cpu().eval()
        example = example.cpu()
        with torch.no_grad():
            output = cpu_model(example)
        signature = infer_signature(example.numpy(), output.numpy())
        info = self._mlflow.pytorch.log_model(
            cpu_model, name=name, signature=signature, input_example=example.numpy(),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pickle", code_paths=[str(Path(deepzoo.__file__).parent)],
            registered_model_name=registered_name,
        )
        return {"model_id": info.model_id, "version": str(info.registered_model_version)}

    def crown_if_best(self, registered_name: str, version: str, metric: str, value: float,
                      higher_is_better: bool) -> bool:
        """Record `metric` on the model version and give it the alias `@champion` when it beats the current
        champion's (or there is none). Runs of a DVC experiment never take the alias: the champion is the best
        model trained on the branch itself, what `models:/<name>@champion` should serve."""
        from mlflow.exceptions import MlflowException

        client = self._mlflow.tracking.MlflowClient()
        client.set_model_version_tag(registered_name, version, metric, str(value))
        if "DVC_EXP_NAME" in os.environ:
            return False
        try:
            champion = client.get_model_version_by_alias(registered_name, CHAMPION)
        except MlflowException:  # no champion yet
            champion = None
        if champion is not None and str(champion.version) != version and metric in champion.tags:
            held = float(champion.tags[metric])
            if (value <= held) if higher_is_better else (value >= held):
                return False
        client.set_registered_model_alias(registered_name, CHAMPION, version)
        return True


@contextmanager
def run(experiment: str, family: str, stage: str, device: str, parent_run_id: str | None = None,
        reopen_run_id: str | None = None) -> Iterator[Tracker]:
    """Open the stage's MLflow run and always close it: FINISHED, FAILED when the stage raises, KILLED when it
    is stopped (Ctrl-C, SIGTERM).

    A training stage starts a run named after its family. Its evaluation and generation pass the training
    run's id: their runs are nested under it (`mlflow.parentRunId`), so a failed evaluation never marks a
    good training FAILED. Runs of the same stage left RUNNING by a process that no longer exists on this
    machine (a SIGKILL, a power cut) are marked KILLED first; a training that resumes after one reopens its
    run (`reopen_run_id`).
    """
    uri = tracking_uri()
    check_reachable(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    dvc_stage = f"{stage}@{family}" if stage in ("train", "evaluate", "generate") else stage
    tags = {"family": family, **provenance(), "device": device, "torch_version": torch.__version__,
            "dvc_stage": dvc_stage, PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    # Runs you can tell apart: an experiment's runs carry its name (`cnn · larky-teat`) and say where they came from.
    run_name = family if stage == "train" else dvc_stage
    if "dvc_exp_name" in tags:
        run_name = f"{run_name} · {tags['dvc_exp_name']}"
        tags["mlflow.note.content"] = (f"DVC experiment `{tags['dvc_exp_name']}` on baseline "
                                       f"`{tags['dvc_exp_baseline_rev'][:7]}`: `dvc exp show` lists its params.")
    try:
        experiment_id = _experiment_id(mlflow, experiment, uri)
        mark_killed(mlflow.tracking.MlflowClient(), experiment_id, dvc_stage)
        for wanted in (parent_run_id, reopen_run_id):
            if wanted is not None and not _exists(mlflow, wanted):
                print(f"MLflow run {wanted} is not in {uri} (tracking store changed?): starting a run of its own")
        if parent_run_id is not None and _exists(mlflow, parent_run_id):
            tags["mlflow.parentRunId"] = parent_run_id
        if reopen_run_id is not None and _exists(mlflow, reopen_run_id):
            active = mlflow.start_run(run_id=reopen_run_id)
            mlflow.set_tags({PID_TAG: tags[PID_TAG], HOST_TAG: tags[HOST_TAG]})
        else:
            active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    except MlflowException as err:
        raise TrackingError(f"{uri} did not answer as an MLflow tracking server ({str(err).splitlines()[0][:200]}); "
                            f"fix MLFLOW_TRACKING_URI or unset it to use the local {DEFAULT_URI}.") from None
    try:
        yield Tracker(mlflow, active.info.run_id, tags.get("mlflow.parentRunId"))
    except (KeyboardInterrupt, SystemExit):
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()


def mark_killed(client: Any, experiment_id: str, dvc_stage: str) -> None:
    """Mark KILLED the runs of `dvc_stage` still RUNNING whose process on this machine no longer exists."""
    stale = client.search_runs([experiment_id], f"tags.dvc_stage = '{dvc_stage}' and attributes.status = 'RUNNING'")
    for found in stale:
        tags = found.data.tags
        if tags.get(HOST_TAG) == socket.gethostname() and not _alive(int(tags.get(PID_TAG, "0"))):
            client.set_terminated(found.info.run_id, status="KILLED")
            print(f"MLflow run {found.info.run_id} of {dvc_stage} was left RUNNING by a process that is gone: "
                  "marked KILLED")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


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
