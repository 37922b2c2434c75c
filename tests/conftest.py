"""Fixtures of the tests that run the pipeline: one smoke-scale `dvc repro` per session, and private copies of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock
from configs import ROOT, smoke_params


def dvc(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the venv's `deepzoo` console script
    done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_param(repo: Path, section: str, group: str, key: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][group][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


if "PYTEST_XDIST_WORKER" in os.environ:
    # Two workers on two cores: thread pools that together exceed the cores slow each other ~10× (see
    # `device.configure_cpu`), so each worker and every stage it starts takes one thread.
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, worker_id: str) -> Path:
    """A copy of the repository's files (as git sees them) on smoke params, after one `dvc repro`. Read only.

    Built once per test session: pytest-xdist's workers share it (the first builds it, the others wait on a lock).
    """
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    repo = shared / "baseline"
    with FileLock(shared / "baseline.lock"):
        if not (repo / "first_repro.log").is_file():
            shutil.rmtree(repo, ignore_errors=True)  # a build that failed part-way
            build_baseline(repo)
    return repo


def build_baseline(repo: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and name != "dvc.lock" and not name.startswith("reports/"):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    log = dvc(repo, "repro")
    repo.joinpath("first_repro.log").write_text(log)  # last: it marks the baseline complete


@pytest.fixture
def workspace(baseline: Path, tmp_path: Path) -> Path:
    """A private copy of the baseline (git, DVC cache, MLflow store and all) for a test that changes things."""
    copy = tmp_path / "repo"
    shutil.copytree(baseline, copy, symlinks=True)
    return copy
