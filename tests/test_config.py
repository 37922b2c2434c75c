import pytest
from pydantic import BaseModel, TypeAdapter

from deepzoo import registry
from deepzoo.config import (
    Common,
    ConfigError,
    TrainConfig,
    load_section,
    read_params,
    validate,
)
from deepzoo.families import cnn


def test_shipped_params_validate():
    cfg = load_section("cnn", cnn.Config)
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
    load_section("common", Common)
    for dataset in registry.DATASETS:
        load_section(dataset, registry.dataset_module(dataset).Params)
    for family in registry.FAMILIES:
        assert isinstance(load_section(family, registry.family_module(family).Config).train, TrainConfig)


def defaults_that_disagree(schema: type[BaseModel], values: dict, path: str) -> list[str]:
    """The keys `values` sets whose code default (where the schema has one) is another value."""
    found = []
    for key, value in values.items():
        field = schema.model_fields[key]
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += defaults_that_disagree(field.annotation, value or {}, f"{path}.{key}")
        elif not field.is_required():
            default = field.get_default(call_default_factory=True)
            if TypeAdapter(field.annotation).validate_python(value) != default:
                found.append(f"{path}.{key}: params.yaml {value!r}, code default {default!r}")
    return found


def test_code_defaults_never_disagree_with_params_yaml():
    """The values a run uses come from params.yaml: a code default may only repeat what it says."""
    params = read_params()
    sections = {"common": Common} | {d: registry.dataset_module(d).Params for d in registry.DATASETS} | {
        f: registry.family_module(f).Config for f in registry.FAMILIES}
    assert set(sections) == set(params), "params.yaml has a section for every dataset and family, and no other"
    problems = [p for name, schema in sections.items() for p in defaults_that_disagree(schema, params[name], name)]
    assert not problems, "\n".join(problems)


def test_no_family_config_can_be_built_from_code_defaults_alone():
    for family in registry.FAMILIES:
        with pytest.raises(ConfigError, match=rf"{family}\.model is required"):
            validate(family, {}, registry.family_module(family).Config)
