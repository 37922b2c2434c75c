"""Screenshots of the MLflow UI for the README's "Compare runs in the MLflow UI" walkthrough.

    python docs/screenshots.py [--db mlflow.db]

Writes docs/images/{runs-table,compare-runs,chart-view,model-page}.png of the experiment
fashion-mnist-classification (its runs cnn and mlp, their metric and param names). Needs the Debian browser and
Playwright's Python package only as its driver (no `playwright install`):

    apt-get install -y chromium && .venv/bin/pip install playwright

The server runs on a copy of the store (it may migrate the schema) and stops however the script ends.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images"
EXPERIMENT = "fashion-mnist-classification"
PLOT_PARAMS = ["train.epochs", "train.batch_size", "model.dropout", "train.schedule"]
PLOT_METRICS = ["time/train_seconds", "test/accuracy"]
ML = "workflowType=machine_learning"  # MLflow 3 opens an experiment in its GenAI view without it
COLUMNS = ["test/accuracy", "time/train_seconds", "model/parameters", "train.epochs", "train.lr"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db, port, log_path):
    # Runs keep absolute artifact URIs (file:///…/mlruns), so artifacts are read in place, never written.
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
           "--default-artifact-root", str(ROOT / "mlruns"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner processes
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    for _ in range(120):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read() == b"OK":
                return server
        except OSError:
            time.sleep(1)
        if server.poll() is not None:
            break
    stop_server(server)
    sys.exit(f"mlflow server did not come up:\n{Path(log_path).read_text()[-3000:]}")


def stop_server(server):
    server.terminate()  # the server passes SIGTERM on to its uvicorn worker
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, 9)


def settle(page, ms=3000):
    """Let the UI finish fetching and drawing (it polls, so "networkidle" never comes)."""
    page.mouse.move(5, 845)  # no hover highlight or tooltip
    page.wait_for_timeout(ms)


def shoot(page, name, clip=None):
    settle(page)
    page.screenshot(path=OUT / name, scale="css", clip=clip)
    print(f"{OUT / name} ({(OUT / name).stat().st_size // 1024} KB)")


def screenshots(base, exp_id):
    runs = f"{base}/#/experiments/{exp_id}/runs?{ML}"
    main = {"x": 198, "y": 0, "width": 1202, "height": 850}  # the page without the left sidebar
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 850})

        # a. Training runs only (their evaluate@ children repeat the test metrics), best first.
        page.goto(f"{runs}&searchFilter=tags.mlflow.parentRunId IS NULL"
                  "&orderByKey=metrics.`test/accuracy`&orderByAsc=false")
        page.locator(".ag-row").first.wait_for()
        page.get_by_role("button", name="Close").click()  # the MLflow Assistant panel; stays closed
        page.get_by_role("button", name="Columns").click()
        search = page.get_by_placeholder("Search columns")
        for column in ["Dataset", "Source", "Models"] + COLUMNS:  # the first three are on by default: off
            search.fill(column)
            page.get_by_text(column, exact=True).last.click()
        page.keyboard.press("Escape")
        for column in COLUMNS[1:3]:  # fit the long headers instead of truncating them
            page.locator(f'.ag-header-cell[col-id="metrics.`{column}`"] .ag-header-cell-resize').dblclick()
        shoot(page, "runs-table.png", {"x": 0, "y": 0, "width": 1400, "height": 400})

        # b. Tick the runs, press Compare. The page's parameter and metric tables are short scroll boxes
        # (and their name column doesn't follow the values when scrolled), so the picture is the parallel
        # coordinates plot of what differs, over the run names.
        for box in page.locator(".ag-pinned-left-cols-container .ag-row input.ag-checkbox-input").all():
            box.check()
        page.get_by_role("button", name="Compare").click()
        page.get_by_text("Run details").wait_for()
        page.get_by_role("button", name="Clear All").click()
        pickers = page.locator("input[role=combobox]")  # Parameters, then Metrics
        for picker, names in zip([pickers.nth(0), pickers.nth(1)], [PLOT_PARAMS, PLOT_METRICS]):
            for name in names:
                picker.click()
                picker.fill(name)
                page.keyboard.press("Enter")
            page.keyboard.press("Escape")
        page.set_viewport_size({"width": 1400, "height": 950})
        shoot(page, "compare-runs.png", dict(main, height=950))

        # c. Chart view, narrowed by the chart search (a regular expression) to the learning curves.
        page.set_viewport_size({"width": 1400, "height": 1110})
        page.goto(f"{runs}&compareRunsMode=CHART")
        page.get_by_placeholder("Search metric charts").fill("^(train|val)/")
        shoot(page, "chart-view.png")

        # d. The run's logged model (MLflow 3 logged models): its params, source run and git commit.
        page.set_viewport_size({"width": 1400, "height": 850})
        page.goto(runs)
        page.get_by_role("link", name="Models", exact=True).click()
        page.get_by_role("link", name="cnn").first.click()
        page.get_by_text("About this logged model").wait_for()
        shoot(page, "model-page.png", main)
        browser.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=str(ROOT / "mlflow.db"))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "mlflow.db"
        shutil.copy(args.db, db)
        client = mlflow.MlflowClient(f"sqlite:///{db}")
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if len(client.search_runs([experiment.experiment_id], "tags.mlflow.parentRunId IS NULL")) < 2:
            sys.exit(f"{EXPERIMENT}: fewer than two training runs to compare")
        port = free_port()
        server = start_server(db, port, Path(tmp) / "server.log")
        try:
            screenshots(f"http://127.0.0.1:{port}", experiment.experiment_id)
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
