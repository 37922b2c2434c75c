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


@pytest.fixture(scope="session")
def baseline(tmp_path_factory) -> Path:
    """A copy of the repository's files (as git sees them) on smoke params, after one `dvc repro`. Read only."""
    repo = tmp_path_factory.mktemp("deepzoo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and name != "dvc.lock" and not name.startswith("reports/"):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    repo.joinpath("first_repro.log").write_text(dvc(repo, "repro"))
    return repo


@pytest.fixture
def workspace(baseline: Path, tmp_path: Path) -> Path:
    """A private copy of the baseline (git, DVC cache, MLflow store and all) for a test that changes things."""
    copy = tmp_path / "repo"
    shutil.copytree(baseline, copy, symlinks=True)
    return copy
