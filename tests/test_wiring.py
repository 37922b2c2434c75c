"""`dvc.yaml` against the code: every stage depends on every file its command imports, and on what the
registry says it reads, so that `dvc repro` can never leave a result that a code change made stale."""

from __future__ import annotations

import pytest
import yaml
from configs import ROOT
from dvc.repo import Repo

from deepzoo import registry, wiring

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())


@pytest.fixture(scope="module")
def stages() -> dict[str, tuple[str, list[str]]]:
    """Each stage of dvc.yaml as DVC resolves it (foreach included): name → (command, deps)."""
    with Repo(str(ROOT)) as repo:
        return {stage.addressing: (stage.cmd, [str(dep.def_path) for dep in stage.deps]) for stage in repo.index.stages}


def test_the_import_graph_follows_imports_inside_functions_and_through_shared_modules():
    assert {"deepzoo.families.vae", "deepzoo.families.generative", "deepzoo.metrics.fid", "deepzoo.data.fashion_mnist",
            "deepzoo.engine.trainer", "deepzoo.families", "deepzoo"} <= wiring.closure(["deepzoo.families.betavae"])
    assert "deepzoo.metrics.tunes" in wiring.closure(["deepzoo.data.tunes"])  # imported inside prepare()
    assert "deepzoo.engine.stages" not in wiring.closure(["deepzoo.cli"])  # the CLI imports it by name, see below
    assert "src/deepzoo/engine/stages.py" in wiring.stage_files("train", "gan")
    assert "src/deepzoo/families/cnn.py" not in wiring.stage_files("evaluate", "gan")  # FID loads an exported program


def test_dvc_yaml_has_the_stages_of_every_dataset_and_family(stages):
    expected = {dataset.stage for dataset in registry.DATASETS.values()} | {"summarize"}
    for name, family in registry.FAMILIES.items():
        expected |= {f"train@{name}", f"evaluate@{name}"} | ({f"generate@{name}"} if family.generates else set())
    assert set(stages) == expected


def test_every_stage_depends_on_every_file_its_command_imports(stages):
    missing = []
    for name, (cmd, deps) in stages.items():
        missing += [f"{name}: {path}" for path in wiring.command_files(cmd) if not wiring.covered(path, deps)]
    assert not missing, "stages that do not depend on files they run (add them to dvc.yaml):\n" + "\n".join(missing)


def test_family_vars_are_what_the_registry_and_the_import_graph_call_for():
    text = (ROOT / "dvc.yaml").read_text()
    assert wiring.render(text) == text, (
        "dvc.yaml's vars are out of date: run `make wiring`")


def test_stages_read_the_data_the_registry_names(stages):
    for name, family in registry.FAMILIES.items():
        data = f"data/processed/{family.data}"
        assert data in stages[f"train@{name}"][1] and f"models/{name}" in stages[f"evaluate@{name}"][1]
        assert set(family.evaluation_reads) <= set(stages[f"evaluate@{name}"][1])
    assert "data/processed/fashion_mnist" in stages["embed_images"][1]
    assert {f"reports/metrics/{name}.json" for name in registry.FAMILIES} <= set(stages["summarize"][1])
