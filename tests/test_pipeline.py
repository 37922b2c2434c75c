"""The CI pipeline validation: the whole `dvc repro` at smoke scale in a temporary copy of the repository.

One `dvc repro` builds the baseline (tests/conftest.py); a test that changes anything works on its own copy of
it (`workspace`), so every test passes alone and in any order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from configs import smoke_params
from conftest import dvc, set_param, stages_run

from deepzoo import registry
from deepzoo.engine.tracking import mlflow_key

FID_FAMILIES = {name for name, family in registry.FAMILIES.items() if registry.EMBEDDINGS in family.evaluation_reads}
SCENES_FAMILIES = {name for name, family in registry.FAMILIES.items() if registry.PRETRAINED in family.training_reads}

pytestmark = pytest.mark.pipeline


def test_first_repro_runs_every_stage(baseline):
    ran = stages_run(baseline.joinpath("first_repro.log").read_text())
    expected = {f"{stage}@{name}" for name in registry.FAMILIES for stage in ("train", "evaluate")}
    expected |= {f"generate@{name}" for name, family in registry.FAMILIES.items() if family.generates}
    assert expected | {dataset.stage for dataset in registry.DATASETS.values()} <= ran


def test_metrics_files_hold_the_design_keys(baseline):
    keys = {"perceptron": {"test_accuracy_single", "test_accuracy_deep_linear", "test_accuracy_deep_relu"},
            "mlp": {"test_accuracy", "test_loss", "train_seconds", "epochs_run"},
            "cnn": {"test_accuracy", "test_loss", "train_seconds", "epochs_run"},
            "resnet": {"test_accuracy", "test_loss", "train_seconds", "epochs_run", "seconds_to_target"},
            "fcn": {"mean_iou", "foreground_iou", "pixel_accuracy", "train_seconds"},
            **{detector: {"map_50", "map_50_95", "seconds_per_image", "seconds_per_image_batched", "fastest_batch_size",
                          "proposals_per_image", "train_seconds"} for detector in ("rcnn", "faster_rcnn")},
            **{sequence: {"val_bits_per_char", "valid_tune_fraction", "novel_tune_fraction", "metre_correct_fraction",
                          "train_seconds", "reference_valid_tune_fraction", "reference_metre_correct_fraction"}
               for sequence in ("rnn", "lstm")},
            "autoencoder": {"test_recon_mse", "test_recon_bce", "fid", "fid_real_floor"},
            "vae": {"test_neg_elbo", "test_nll_iw", "active_units", "fid", "fid_real_floor"},
            "betavae": {"test_neg_elbo", "test_nll_iw", "active_units", "fid", "fid_real_floor"},
            "gan": {"fid", "fid_real_floor"}}
    assert set(keys) == set(registry.FAMILIES)
    for family in registry.FAMILIES:
        metrics = json.loads((baseline / "reports/metrics" / f"{family}.json").read_text())
        assert keys[family] <= set(metrics), family
        assert all(isinstance(v, int | float) for v in metrics.values()), family
    summary = pd.read_csv(baseline / "reports/summary.csv", index_col="family")
    assert list(summary.index) == list(registry.FAMILIES) and summary["parameters"].gt(0).all()
    assert (baseline / "reports/summary.md").read_text().count("\n") == 2 + len(registry.FAMILIES) + 7  # + the detectors table
    curves = pd.read_csv(baseline / "reports/plots/accuracy_vs_seconds.csv")
    assert set(curves["family"]) == {"mlp", "cnn", "resnet"}
    assert all(curve["seconds"].is_monotonic_increasing for _, curve in curves.groupby("family"))
    floors = {json.loads((baseline / f"reports/metrics/{f}.json").read_text())["fid_real_floor"] for f in FID_FAMILIES}
    assert len(floors) == 1  # one reference for every FID


def test_second_repro_runs_nothing_even_after_python_wrote_bytecode_beside_the_sources(workspace):
    bytecode = workspace / "src/deepzoo/engine/__pycache__"  # what an import writes unless PYTHONDONTWRITEBYTECODE
    bytecode.mkdir(exist_ok=True)
    (bytecode / "trainer.cpython-311.pyc").write_bytes(b"bytecode")
    assert stages_run(dvc(workspace, "repro")) == set()


def test_a_cnn_experiment_reruns_only_the_cnn(workspace):
    set_param(workspace, "cnn", "train", "lr", 0.004)  # not the default
    ran = stages_run(dvc(workspace, "repro"))
    assert ran == {"train@cnn", "evaluate@cnn", "summarize"}  # FID has its own extractor


def test_a_resnet_experiment_reruns_the_scenes_families_that_start_from_it(workspace):
    set_param(workspace, "resnet", "train", "lr", 0.004)
    ran = stages_run(dvc(workspace, "repro"))
    scenes = {f"{stage}@{family}" for stage in ("train", "evaluate") for family in SCENES_FAMILIES}
    assert ran == {"train@resnet", "evaluate@resnet", "summarize"} | scenes


def test_a_new_feature_extractor_reruns_only_the_fid_evaluations(workspace):
    set_param(workspace, "embeddings", "train", "lr", 0.002)
    ran = stages_run(dvc(workspace, "repro"))
    assert ran == {"embed_images", "summarize"} | {f"evaluate@{f}" for f in FID_FAMILIES}


def test_editing_the_vae_code_makes_betavae_stale_too(workspace):
    with (workspace / "src/deepzoo/families/vae.py").open("a") as f:
        f.write("\n# an edit\n")
    stale = set(json.loads(dvc(workspace, "status", "--json")))
    assert {"train@vae", "train@betavae", "evaluate@betavae", "generate@betavae"} <= stale
    assert not any(stage.endswith(("@gan", "@autoencoder", "@cnn")) for stage in stale)


def test_rerunning_a_stage_gives_bit_identical_checkpoints_and_identical_metrics(workspace):
    """On the CPU, for one family of each kind: classifier, sequence, generative; against the baseline's run."""
    families = ("cnn", "lstm", "vae")

    def outputs() -> dict[str, tuple[dict[str, bytes], dict[str, float]]]:
        found = {}
        for family in families:
            metrics = json.loads((workspace / "reports/metrics" / f"{family}.json").read_text())
            found[family] = ({p.name: p.read_bytes() for p in (workspace / "models" / family).glob("*.pt")},
                             {k: v for k, v in metrics.items() if not k.endswith("_seconds")})
        return found

    before = outputs()
    # Generation only where the evaluation measures the samples (the tunes); FID draws its own.
    stages = [f"{stage}@{family}" for family in families for stage in ("train", "generate", "evaluate")
              if stage != "generate" or "reports/samples/" + family in registry.FAMILIES[family].evaluation_reads]
    dvc(workspace, "repro", "--force", "--single-item", *stages)
    for family, (checkpoints, metrics) in outputs().items():
        assert checkpoints and checkpoints == before[family][0], f"{family}: checkpoints differ between two runs"
        assert metrics == before[family][1], f"{family}: metrics differ between two runs"


def test_mlflow_holds_one_run_per_family_with_params_metrics_and_a_loadable_model(baseline):
    db = sqlite3.connect(baseline / "mlflow.db")
    experiments = dict(db.execute("select experiment_id, name from experiments"))
    assert {"toy2d", "fashion-mnist-classification", "folk-tunes", "fashion-mnist-generation",
            "fashion-mnist-scenes"} <= set(
        experiments.values())
    runs = db.execute("select run_uuid, name, status from runs").fetchall()
    tags = {run: dict(db.execute("select key, value from tags where run_uuid = ?", (run,))) for run, *_ in runs}
    stages = {tags[run]["dvc_stage"]: run for run, *_ in runs}
    assert len(stages) == len(runs)  # one run per stage
    ran = stages_run((baseline / "first_repro.log").read_text())
    assert set(stages) == {s for s in ran if not s.startswith("prepare_")} - {"summarize"}  # they train nothing
    assert all(status == "FINISHED" for *_, status in runs)
    for stage, run in stages.items():  # evaluations and generations nest under the training they measure
        if stage.startswith(("evaluate@", "generate@")):
            assert tags[run]["mlflow.parentRunId"] == stages[f"train@{stage.partition('@')[2]}"], stage
    for family in FID_FAMILIES:  # each FID names the extractor it was measured with
        assert tags[stages[f"evaluate@{family}"]]["fid_extractor_run_id"] == stages["embed_images"], family
        assert len(tags[stages[f"evaluate@{family}"]]["fid_extractor_sha256"]) == 64
    resnet = baseline / "models/resnet"
    for family in SCENES_FAMILIES:  # each names the resnet it started from
        assert tags[stages[f"train@{family}"]]["pretrained_sha256"] == \
            hashlib.sha256((resnet / "resnet.pt").read_bytes()).hexdigest(), family
        assert tags[stages[f"train@{family}"]]["pretrained_run_id"] == stages["train@resnet"], family
    cnn_run = stages["train@cnn"]
    assert dict(db.execute("select name, status from runs where run_uuid = ?", (cnn_run,))) == {"cnn": "FINISHED"}
    params = dict(db.execute("select key, value from params where run_uuid = ?", (cnn_run,)))
    smoke = smoke_params()["cnn"]
    assert params["train.lr"] == str(smoke["train"]["lr"]) and params["model.dense"] == str(smoke["model"]["dense"])
    metric_steps = db.execute("select key, step from metrics where run_uuid = ?", (cnn_run,)).fetchall()
    assert {("train/loss", 1), ("train/loss", 2), ("val/accuracy", 2)} <= set(metric_steps)
    keys = {key for key, _ in metric_steps}  # its first evaluation's, copied, under names without doubled prefixes
    assert {"test/accuracy", "test/loss", "time/train_seconds", "model/parameters"} <= keys
    assert not any(key.startswith("test/test_") for key in keys)
    assert not any("accuracy_" in key for key in keys)  # per-class numbers are a table, not 10 more charts
    evaluation = stages["evaluate@cnn"]
    artifacts = db.execute("select artifact_uri from runs where run_uuid = ?", (evaluation,)).fetchone()[0]
    assert Path(artifacts.removeprefix("file://"), "plots/evaluation/per_class_accuracy.csv").is_file()
    assert {"family", "git_commit", "device", "torch_version", "dvc_stage", "precision"} <= set(tags[cnn_run])

    loader = ("import mlflow, sys, torch; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
              "m = mlflow.pytorch.load_model(f'runs:/{sys.argv[1]}/cnn', map_location='cpu');"
              "print(tuple(m(torch.rand(3, 1, 28, 28)).shape))")
    done = subprocess.run([sys.executable, "-c", loader, cnn_run], cwd=baseline, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.stdout.strip().endswith("(3, 10)"), done.stderr[-2000:]


def test_every_model_is_registered_with_its_metrics_and_the_cnn_champion_serves_over_http(baseline, tmp_path):
    db = sqlite3.connect(baseline / "mlflow.db")
    champions = dict(db.execute("select name, version from registered_model_aliases where alias = 'champion'"))
    for family in registry.FAMILIES:
        trained = json.loads((baseline / "models" / family / "training.json").read_text())["variants"]
        for name, variant in trained.items():  # the baseline trained outside experiments: each is its champion
            assert champions[variant["registered_model"]] == int(variant["model_version"]), family
            linked = {key for (key,) in db.execute(  # the model's page shows the metrics that measured it
                "select metric_name from logged_model_metrics where model_id = ?", (variant["model_id"],))}
            if len(trained) == 1:
                assert mlflow_key(registry.FAMILIES[family].headline) in linked, (family, linked)
            else:  # one of several variants: only its own metrics
                assert linked and all(key.endswith(f"_{name}") for key in linked), (family, name, linked)

    test = torch.load(baseline / "data/processed/fashion_mnist/test.pt")
    images = (test["images"][:8].unsqueeze(1).float() / 255).numpy()  # the model's input: [N, 1, 28, 28] in [0, 1]
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    local = subprocess.run(  # what the registered model predicts when loaded in a Python process
        [sys.executable, "-c", "import json, sys, mlflow, numpy as np; m = mlflow.pyfunc.load_model("
         "'models:/deepzoo-cnn@champion'); print(json.dumps(m.predict(np.load(sys.argv[1])).tolist()))",
         str(tmp_path / "images.npy")], cwd=baseline, env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    expected = np.array(json.loads(local.stdout.splitlines()[-1]))

    port = free_port()
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/deepzoo-cnn@champion", "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port)], cwd=baseline, env=env,
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("w"),
                              start_new_session=True)
    try:
        for _ in range(240):  # bounded: at most 120 s for the server to start
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow models serve did not answer /ping within 120 s")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.array(json.loads(response.read())["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert served.shape == (8, 10)  # logits in the order of fashion_mnist.CLASSES
    assert np.allclose(served, expected, atol=1e-4) and (served.argmax(1) == expected.argmax(1)).all()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def git_commit_all(repo: Path, message: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", message, "--allow-empty"], cwd=repo, check=True, env=env)


def test_dvc_remote_restores_models_and_data_on_a_fresh_clone(workspace, tmp_path):
    dvc(workspace, "remote", "add", "-d", "team", str(tmp_path / "remote"))
    git_commit_all(workspace, "pipeline at smoke scale, with a remote")
    dvc(workspace, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(workspace), str(clone)], check=True)
    assert not (clone / "models").exists()
    dvc(clone, "pull")
    assert (clone / "models/cnn/cnn.pt").is_file() and (clone / "data/processed/fashion_mnist/train.pt").is_file()
    assert stages_run(dvc(clone, "repro")) == set()  # everything restored: nothing to rerun


def test_queued_experiments_run_in_parallel_each_with_its_own_mlflow_run(workspace):
    git_commit_all(workspace, "baseline for experiments")
    for lr in ("0.004", "0.005"):  # neither is the default
        dvc(workspace, "exp", "run", "--queue", "-S", f"cnn.train.lr={lr}")
    dvc(workspace, "queue", "start", "-j", "2")
    try:
        for _ in range(240):  # bounded wait: at most 20 minutes
            status = dvc(workspace, "queue", "status")
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            time.sleep(5)
        assert "Failed" not in status, status
    finally:
        dvc(workspace, "queue", "stop")
    table = dvc(workspace, "exp", "show", "--csv")
    assert re.search(r"0\.003", table) and re.search(r"0\.004", table)
    header = table.splitlines()[0]
    assert "test_accuracy" in header
    db = sqlite3.connect(workspace / "mlflow.db")
    experiments = dict(db.execute(  # run name → the experiment's learning rate, for the cnn's training runs
        "select r.name, p.value from params p join runs r on p.run_uuid = r.run_uuid "
        "where r.name like 'cnn · %' and p.key = 'train.lr'"))
    assert sorted(experiments.values()) == ["0.004", "0.005"]  # logged to the repository's store, not a temp copy
    for name in experiments:  # names that tell the runs apart, and tags that name their experiments
        (run,) = db.execute("select run_uuid from runs where name = ?", (name,)).fetchone()
        tags = dict(db.execute("select key, value from tags where run_uuid = ?", (run,)))
        assert name == f"cnn · {tags['dvc_exp_name']}" and tags["dvc_exp_baseline_rev"] != "unknown"
