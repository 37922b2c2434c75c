"""The CI pipeline validation: the whole `dvc repro` at smoke scale in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deepzoo.engine.stages import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SMOKE = Path(__file__).with_name("smoke_params.yaml")
# The families whose evaluation reads the trained cnn's features (FID), per dvc.yaml.
FID_FAMILIES = {name for name, item in yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"][1]["families"].items()
                if item["evaluates_with"] == "models/cnn"}

pytestmark = pytest.mark.pipeline


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def dvc(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the venv's `deepzoo` console script
    done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy of the repository's files (as git sees them) on smoke params, after one `dvc repro`."""
    repo = tmp_path_factory.mktemp("deepzoo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and name != "dvc.lock" and not name.startswith("reports/"):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), yaml.safe_load(SMOKE.read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    repo.joinpath("first_repro.log").write_text(dvc(repo, "repro"))
    return repo


def test_first_repro_runs_every_stage(repo):
    ran = stages_run(repo.joinpath("first_repro.log").read_text())
    expected = {f"{stage}@{family}" for family in FAMILIES for stage in ("train", "evaluate")}
    generators = yaml.safe_load((repo / "dvc.yaml").read_text())["vars"][2]["generators"]
    expected |= {f"generate@{family}" for family in generators}
    assert expected | {"prepare_images", "prepare_toy2d"} <= ran


def test_metrics_files_hold_the_design_keys(repo):
    keys = {"perceptron": {"test_accuracy_single", "test_accuracy_deep_linear", "test_accuracy_deep_relu"},
            "mlp": {"test_accuracy", "test_loss", "train_seconds", "epochs_run"},
            "cnn": {"test_accuracy", "test_loss", "train_seconds", "epochs_run"},
            "rnn": {"val_bits_per_char", "valid_tune_fraction", "novel_tune_fraction", "train_seconds"},
            "lstm": {"val_bits_per_char", "valid_tune_fraction", "novel_tune_fraction", "train_seconds"},
            "autoencoder": {"test_recon_mse", "test_recon_bce", "fid", "fid_real_floor"},
            "vae": {"test_neg_elbo", "test_nll_iw", "active_units", "fid", "fid_real_floor"},
            "betavae": {"test_neg_elbo", "test_nll_iw", "active_units", "fid", "fid_real_floor"},
            "gan": {"fid", "fid_real_floor"}}
    for family in FAMILIES:
        metrics = json.loads((repo / "reports/metrics" / f"{family}.json").read_text())
        assert keys[family] <= set(metrics), family
        assert all(isinstance(v, int | float) for v in metrics.values()), family


def test_second_repro_runs_nothing(repo):
    assert stages_run(dvc(repo, "repro")) == set()


def test_changing_a_cnn_param_reruns_only_what_depends_on_cnn(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["cnn"]["train"]["lr"] = 0.002
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = stages_run(dvc(repo, "repro"))
    assert ran == {"train@cnn", "evaluate@cnn"} | {f"evaluate@{f}" for f in FID_FAMILIES}


def test_mlflow_holds_one_run_per_family_with_params_metrics_and_a_loadable_model(repo):
    db = sqlite3.connect(repo / "mlflow.db")
    experiments = dict(db.execute("select experiment_id, name from experiments"))
    assert {"toy2d", "fashion-mnist-classification", "folk-tunes", "fashion-mnist-generation"} <= set(experiments.values())
    runs = db.execute("select run_uuid, name, status from runs").fetchall()
    families = {name for _, name, _ in runs}
    assert set(FAMILIES) <= families
    assert all(status == "FINISHED" for *_, status in runs)
    (cnn_run,) = [run for run, name, _ in runs if name == "cnn"][-1:]
    params = dict(db.execute("select key, value from params where run_uuid = ?", (cnn_run,)))
    assert params["train.lr"] == "0.002" and params["model.dense"] == "32"
    metric_steps = db.execute("select key, step from metrics where run_uuid = ?", (cnn_run,)).fetchall()
    assert {("train/loss", 1), ("train/loss", 2), ("val/accuracy", 2)} <= set(metric_steps)
    assert any(key == "test/test_accuracy" for key, _ in metric_steps)
    tags = dict(db.execute("select key, value from tags where run_uuid = ?", (cnn_run,)))
    assert {"family", "git_commit", "device", "torch_version", "dvc_stage"} <= set(tags)

    loader = ("import mlflow, sys, torch; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
              "m = mlflow.pytorch.load_model(f'runs:/{sys.argv[1]}/cnn', map_location='cpu');"
              "print(tuple(m(torch.rand(3, 1, 28, 28)).shape))")
    done = subprocess.run([sys.executable, "-c", loader, cnn_run], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.stdout.strip().endswith("(3, 10)"), done.stderr[-2000:]


def git_commit_all(repo: Path, message: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", message, "--allow-empty"], cwd=repo, check=True, env=env)


def test_dvc_remote_restores_models_and_data_on_a_fresh_clone(repo, tmp_path):
    dvc(repo, "remote", "add", "-d", "team", str(tmp_path / "remote"))
    git_commit_all(repo, "pipeline at smoke scale, with a remote")
    dvc(repo, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / "models").exists()
    dvc(clone, "pull")
    assert (clone / "models/cnn/cnn.pt").is_file() and (clone / "data/processed/fashion_mnist/train.pt").is_file()
    assert stages_run(dvc(clone, "repro")) == set()  # everything restored: nothing to rerun


def test_queued_experiments_run_in_parallel_each_with_its_own_mlflow_run(repo):
    git_commit_all(repo, "baseline for experiments")
    for lr in ("0.003", "0.004"):
        dvc(repo, "exp", "run", "--queue", "-S", f"cnn.train.lr={lr}")
    dvc(repo, "queue", "start", "-j", "2")
    try:
        for _ in range(240):  # bounded wait: at most 20 minutes
            status = dvc(repo, "queue", "status")
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            time.sleep(5)
        assert "Failed" not in status, status
    finally:
        dvc(repo, "queue", "stop")
    table = dvc(repo, "exp", "show", "--csv")
    assert re.search(r"0\.003", table) and re.search(r"0\.004", table)
    header = table.splitlines()[0]
    assert "test_accuracy" in header
    lrs = {row[0] for row in sqlite3.connect(repo / "mlflow.db").execute(
        "select p.value from params p join runs r on p.run_uuid = r.run_uuid where r.name = 'cnn' and p.key = 'train.lr'")}
    assert {"0.003", "0.004"} <= lrs  # each experiment logged to the repository's store, not its temp copy
