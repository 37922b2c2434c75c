import importlib

import pytest

from deepzoo.config import ConfigError, TrainConfig, load_section, validate
from deepzoo.families import cnn


def test_defaults_validate():
    cfg = validate("cnn", {}, cnn.Config)
    assert cfg.model.filters == (32, 64) and cfg.train.optimizer == "adam"


def test_range_error_names_key_path_rule_and_value():
    with pytest.raises(ConfigError, match=r"cnn\.train\.lr must be > 0, got -1"):
        validate("cnn", {"train": {"lr": -1}}, cnn.Config)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"cnn\.train\.epoch is not a known key; did you mean 'epochs'"):
        validate("cnn", {"train": {"epoch": 3}}, cnn.Config)


def test_unknown_section_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"cnn\.modle is not a known key; did you mean 'model'"):
        validate("cnn", {"modle": {}}, cnn.Config)


def test_wrong_choice_and_type_are_reported_together():
    with pytest.raises(ConfigError) as err:
        validate("cnn", {"train": {"optimizer": "adamm", "epochs": "many"}}, cnn.Config)
    message = str(err.value)
    assert "cnn.train.optimizer must be one of 'sgd'" in message and "'adamm'" in message
    assert "cnn.train.epochs" in message and "'many'" in message


def test_missing_section_and_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("cnnn: {}\n")
    with pytest.raises(ConfigError, match="no section 'cnn' .did you mean 'cnnn'"):
        load_section("cnn", cnn.Config, params)
    with pytest.raises(ConfigError, match="not found"):
        load_section("cnn", cnn.Config, tmp_path / "missing.yaml")


def test_invalid_yaml(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("cnn: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_section("cnn", cnn.Config, params)


def test_repository_params_validate_for_every_section():
    from deepzoo.cli import DATASETS
    from deepzoo.config import Common, read_params
    from deepzoo.engine.stages import FAMILIES, family_module

    sections = set(read_params())
    load_section("common", Common)
    for dataset in DATASETS:
        if dataset in sections:
            load_section(dataset, importlib.import_module(f"deepzoo.data.{dataset}").Params)
    for family in FAMILIES:
        if family in sections:
            assert isinstance(load_section(family, family_module(family).Config).train, TrainConfig)
