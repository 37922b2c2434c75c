"""The registry's `@champion` alias: the best model trained outside DVC experiments, by the family's headline."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from deepzoo.engine import tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module (creating one costs seconds of schema migrations); each test its own model name."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}")
    yield MlflowClient()
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def name(request, monkeypatch) -> str:
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return f"deepzoo-{request.node.name}".replace("[", "-").replace("]", "")


def new_version(client: MlflowClient, name: str) -> str:
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return str(client.create_model_version(name, source="file:///nonexistent/model").version)


def champion(client: MlflowClient, name: str) -> str:
    return str(client.get_model_version_by_alias(name, tracking.CHAMPION).version)


@pytest.mark.parametrize(("higher_is_better", "values", "champions"), [
    (True, [0.80, 0.70, 0.90], ["1", "1", "3"]),  # accuracy
    (False, [40.0, 45.0, 35.0], ["1", "1", "3"]),  # FID
])
def test_the_alias_goes_to_the_best_headline_so_far(store, name, higher_is_better, values, champions):
    tracker = tracking.Tracker(mlflow, run_id="unused")
    for value, expected in zip(values, champions, strict=True):
        version = new_version(store, name)
        tracker.crown_if_best(name, version, "test_accuracy", value, higher_is_better)
        assert champion(store, name) == expected
        assert store.get_model_version(name, version).tags["test_accuracy"] == str(value)


def test_a_dvc_experiment_never_takes_the_alias_however_good(store, name, monkeypatch):
    tracker = tracking.Tracker(mlflow, run_id="unused")
    tracker.crown_if_best(name, new_version(store, name), "test_accuracy", 0.8, True)
    monkeypatch.setenv("DVC_EXP_NAME", "larky-teat")
    crowned = tracker.crown_if_best(name, new_version(store, name), "test_accuracy", 0.99, True)
    assert not crowned and champion(store, name) == "1"


def test_the_champion_keeps_its_alias_when_re_measured_lower(store, name):
    """A new FID extractor re-measures the same model: it stays the champion, with its new value."""
    tracker = tracking.Tracker(mlflow, run_id="unused")
    version = new_version(store, name)
    tracker.crown_if_best(name, version, "fid", 30.0, False)
    assert tracker.crown_if_best(name, version, "fid", 50.0, False)
    assert store.get_model_version(name, version).tags["fid"] == "50.0"
