"""The fault catalogue: what a hostile new user does, and what deepzoo answers. Each case checks the exit code,
that the message is one clear line (no traceback), that good outputs are still there, and the MLflow run states.
They work on copies of the smoke-scale pipeline (tests/conftest.py), so they carry its marker."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from configs import merge, smoke_params
from conftest import set_param

from deepzoo.data import fashion_mnist
from deepzoo.engine import stages

VENV_BIN = str(Path(sys.executable).parent)
pytestmark = pytest.mark.pipeline


def deepzoo(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DEEPZOO_"))}
    return subprocess.run([sys.executable, "-m", "deepzoo", *args], cwd=workdir, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=600)


def start(workdir: Path, *args: str) -> subprocess.Popen:
    """`deepzoo ARGS` in the background, returning once it has started training (its MLflow run exists)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DEEPZOO_"))} | {"PYTHONUNBUFFERED": "1"}
    # Ctrl-C's SIGINT as at a terminal: a shell starts background jobs (`make test &`) with SIGINT ignored, and
    # the child would inherit that and never see the test's Ctrl-C.
    process = subprocess.Popen([sys.executable, "-m", "deepzoo", *args], cwd=workdir, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 - one C call
    for line in process.stdout:  # bounded: the process prints this within seconds, or ends and the loop with it
        if line.startswith("training "):
            return process
    pytest.fail(f"deepzoo {' '.join(args)} ended before training: {process.stderr.read()[-2000:]}")


def one_line_error(done: subprocess.CompletedProcess | tuple[int, str], code: int = 1) -> str:
    returncode, stderr = (done.returncode, done.stderr) if isinstance(done, subprocess.CompletedProcess) else done
    assert returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("deepzoo ")]
    assert len(lines) == 1, stderr[-3000:]
    return stderr


def runs(workdir: Path) -> dict[str, tuple[str, str, dict[str, str]]]:
    """run id → (name, status, tags) in the workdir's MLflow store."""
    if not (workdir / "mlflow.db").exists():
        return {}
    db = sqlite3.connect(workdir / "mlflow.db")
    found = {run: (name, status, {}) for run, name, status in db.execute("select run_uuid, name, status from runs")}
    for run, key, value in db.execute("select run_uuid, key, value from tags"):
        found[run][2][key] = value
    return found


def snapshot(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(workspace: Path) -> Path:
    """A private copy of the smoke-scale pipeline's repository: data, trained models, samples, MLflow store."""
    return workspace


def write_params(workdir: Path, override: dict) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    (workdir / "params.yaml").write_text(yaml.safe_dump(merge(params, override)))


@pytest.mark.parametrize("family, model, key", [("cnn", {"filters": [0, 8]}, "cnn.model.filters.0 must be >= 1"),
                                                ("mlp", {"hidden": [-5]}, "mlp.model.hidden.0 must be >= 1")])
def test_layer_sizes_below_one_fail_in_params_names_before_any_run(workdir, family, model, key):
    write_params(workdir, {family: {"model": model}})
    before = runs(workdir)
    assert key in one_line_error(deepzoo(workdir, "train", family))
    assert runs(workdir) == before


def test_a_validation_split_that_does_not_fit_is_named_in_params_terms(workdir):
    write_params(workdir, {"fashion_mnist": {"val_size": 5000}})
    before = snapshot(workdir / "data/processed/fashion_mnist")
    message = one_line_error(deepzoo(workdir, "prepare", "fashion_mnist"))
    assert "fashion_mnist.val_size = 5000 does not fit the 1000 training images kept" in message
    assert snapshot(workdir / "data/processed/fashion_mnist") == before


def test_missing_processed_data_fails_before_an_mlflow_run_exists(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(smoke_params()))
    message = one_line_error(deepzoo(tmp_path, "train", "cnn"))
    assert "run `dvc repro prepare_images` first" in message
    assert runs(tmp_path) == {}


def test_a_truncated_checkpoint_is_named_with_the_command_that_restores_it(workdir):
    checkpoint = workdir / "models/cnn/cnn.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    message = one_line_error(deepzoo(workdir, "evaluate", "cnn"))
    assert "models/cnn/cnn.pt cannot be read" in message and "dvc checkout models/cnn" in message


@pytest.fixture
def not_mlflow() -> Iterator[str]:
    """A loopback server that answers 200 to everything, /health included: up, but not an MLflow server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_url_that_answers_but_is_not_mlflow_fails_in_one_line(workdir, not_mlflow):
    message = one_line_error(deepzoo(workdir, "train", "cnn", env={"MLFLOW_TRACKING_URI": not_mlflow}))
    assert f"{not_mlflow} did not answer as an MLflow tracking server" in message


def test_a_failed_download_without_a_local_copy_says_what_to_install(tmp_path, monkeypatch):
    with socket.socket() as s:  # a loopback port nothing listens on: the download is refused at once
        s.bind(("127.0.0.1", 0))
        monkeypatch.setattr(fashion_mnist, "URL", f"http://127.0.0.1:{s.getsockname()[1]}/")
    with pytest.raises(fashion_mnist.DataError, match=r"train-labels-idx1-ubyte.gz is in none of .* its download "
                                                       r"from .* failed .*install Debian's dataset-fashion-mnist"):
        fashion_mnist.locate("train-labels-idx1-ubyte.gz", (tmp_path,), download_to=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_ctrl_c_exits_130_in_one_line_and_marks_the_run_killed(workdir):
    write_params(workdir, {"cnn": {"train": {"epochs": 500, "patience": None}}})
    before = snapshot(workdir / "models/cnn")
    process = start(workdir, "train", "cnn")
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert "interrupted (Ctrl-C)" in one_line_error((process.returncode, stderr), code=130)
    assert snapshot(workdir / "models/cnn") == before
    (status,) = [status for name, status, tags in runs(workdir).values() if name == "cnn" and status != "FINISHED"]
    assert status == "KILLED"


@pytest.mark.parametrize("stop, code", [("KeyboardInterrupt", 130), ("SystemExit(143)", 143)])
def test_a_stop_that_lands_in_a_weakref_callback_still_stops_the_process(stop, code):
    """Python ignores an exception raised in a finalizer or weakref callback, a signal handler's included: that
    once let a training run on after Ctrl-C. `redeliver_stops` signals again, so the code that runs next stops."""
    script = f"""
import signal, sys, time, weakref
from deepzoo import cli
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
sys.unraisablehook = cli.redeliver_stops
class Thing: pass
def callback(_): raise {stop}
thing = Thing(); ref = weakref.ref(thing, callback); del thing  # the stop is raised, and ignored, here
try:
    time.sleep(30)
except KeyboardInterrupt:
    sys.exit(130)
sys.exit(0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 - one C call
    assert done.returncode == code, done.stderr


def test_a_run_left_running_by_sigkill_is_marked_killed_by_the_next_start(workdir):
    write_params(workdir, {"cnn": {"train": {"epochs": 500, "patience": None}}})
    process = start(workdir, "train", "cnn")
    process.kill()
    process.wait(timeout=60)
    (killed,) = [run for run, (name, status, _) in runs(workdir).items() if name == "cnn" and status == "RUNNING"]
    write_params(workdir, {"cnn": {"train": {"epochs": 1}}})
    done = deepzoo(workdir, "train", "cnn")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"MLflow run {killed} of train@cnn was left RUNNING by a process that is gone: marked KILLED" in done.stdout
    assert runs(workdir)[killed][1] == "KILLED"
    assert not [run for run, (_, status, _) in runs(workdir).items() if status == "RUNNING"]


SLOW_CNN = {"cnn": {"model": {"filters": [32, 64], "dense": 1024},  # the lecture's sizes on the smoke data:
                      "train": {"epochs": 3, "batch_size": 20, "patience": None}}}  # about a second per epoch


def kill_after_epoch_one(workdir: Path) -> None:
    process = start(workdir, "train", "cnn")
    for line in process.stdout:  # bounded by the training's epochs
        if line.startswith("epoch 1/"):
            process.kill()
            break
    process.wait(timeout=60)
    assert (workdir / ".deepzoo/resume/cnn.pt").is_file()


def test_a_killed_training_resumes_after_its_last_epoch_bit_for_bit_in_the_same_run(workdir, tmp_path):
    write_params(workdir, SLOW_CNN)
    reference = tmp_path / "uninterrupted"
    shutil.copytree(workdir, reference)
    assert deepzoo(reference, "train", "cnn").returncode == 0
    before = set(runs(workdir))
    kill_after_epoch_one(workdir)
    done = deepzoo(workdir, "train", "cnn")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after epoch" in done.stdout
    assert (workdir / "models/cnn/cnn.pt").read_bytes() == (reference / "models/cnn/cnn.pt").read_bytes()
    (run,) = set(runs(workdir)) - before  # the resumed training went on in the killed one's run
    assert runs(workdir)[run][1] == "FINISHED"
    steps = [step for (step,) in sqlite3.connect(workdir / "mlflow.db").execute(
        "select step from metrics where run_uuid = ? and key = 'train/loss'", (run,))]
    assert sorted(steps) == [1, 2, 3]  # each epoch logged once
    assert not (workdir / ".deepzoo/resume/cnn.pt").exists()  # a completed stage leaves no resume point


def test_changed_params_train_from_the_start(workdir):
    write_params(workdir, SLOW_CNN)
    kill_after_epoch_one(workdir)
    write_params(workdir, {"cnn": {"train": {"lr": 0.004}}})  # not the default
    done = deepzoo(workdir, "train", "cnn")
    assert done.returncode == 0 and "resuming" not in done.stdout, done.stderr[-3000:]
    assert "is of other params, data or code: training cnn from the start" in done.stdout


def test_restart_ignores_a_resume_point_of_the_same_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    point = stages.ResumePoint("cnn", "fingerprint")
    point.run_id = "a-run"
    point.save("cnn", {"epoch": 1})
    assert stages.ResumePoint.load("cnn", "fingerprint", restart=False).run_id == "a-run"
    assert stages.ResumePoint.load("cnn", "fingerprint", restart=True).run_id is None
    assert stages.ResumePoint.load("cnn", "another", restart=False).state_of("cnn") is None


def test_a_failed_evaluation_leaves_the_training_run_finished(workdir):
    """abc2midi missing: the lstm's evaluation fails on its own nested run, the training run stays FINISHED."""
    message = one_line_error(deepzoo(workdir, "evaluate", "lstm", env={"PATH": VENV_BIN}))
    assert "abc2midi not found" in message
    found = runs(workdir)
    (training,) = [run for run, (name, _, _) in found.items() if name == "lstm"]
    (failed,) = [run for run, (name, status, _) in found.items() if name == "evaluate@lstm" and status != "FINISHED"]
    assert found[training][1] == "FINISHED" and found[failed][1] == "FAILED"
    assert found[failed][2]["mlflow.parentRunId"] == training


def test_a_diverging_rerun_under_dvc_keeps_the_good_model_and_history(workspace):
    outputs = workspace / "models/cnn", workspace / "reports/plots/cnn/history"
    before = snapshot(*outputs)
    set_param(workspace, "cnn", "train", "lr", 1e6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    done = subprocess.run(["dvc", "repro", "train@cnn"], cwd=workspace, capture_output=True, text=True, timeout=600,
                          env=env | {"PATH": f"{VENV_BIN}:{env['PATH']}"})
    assert done.returncode != 0
    assert "training diverged" in done.stderr or "training failed" in done.stderr, done.stderr[-3000:]
    assert snapshot(*outputs) == before


def stage_processes(command: str) -> list[int]:
    """Pids of the processes whose command line holds `command`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and command in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(proc.name))
        except OSError:  # it ended while we looked
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killing_dvc_repro_kills_its_stage_which_writes_nothing(workspace):
    set_param(workspace, "cnn", "train", "epochs", 500)
    set_param(workspace, "cnn", "train", "patience", None)
    before = snapshot(workspace / "models/cnn")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    repro = subprocess.Popen(["dvc", "repro", "train@cnn"], cwd=workspace, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             # DVC runs a stage through $SHELL: dash (CI's /bin/sh) keeps itself between DVC and
                             # the stage unless the command execs, where bash would exec on its own
                             env=env | {"PATH": f"{VENV_BIN}:{env['PATH']}", "SHELL": "/bin/sh"})
    command = "deepzoo train cnn"
    for _ in range(600):  # bounded: at most 60 s for DVC to start the stage
        if [pid for pid in stage_processes(command) if pid != repro.pid]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("dvc repro did not start the stage within 60 s")
    time.sleep(2)  # the stage is importing or training
    repro.kill()
    repro.wait(timeout=30)
    for _ in range(300):  # bounded: the stage must be gone within 30 s
        if not stage_processes(command):
            break
        time.sleep(0.1)
    assert not stage_processes(command), "the stage outlived its dvc repro"
    assert snapshot(workspace / "models/cnn") == before
