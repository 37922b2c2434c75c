"""What the tests share: configurations built from the shipped params.yaml, so the tested one is the one that ships."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

from deepzoo.config import validate

ROOT = Path(__file__).resolve().parents[1]
SMOKE = Path(__file__).with_name("smoke_params.yaml")
S = TypeVar("S", bound=BaseModel)


def merge(base: dict, override: dict) -> dict:
    """`base` with `override` merged in, section by section and key by key."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def smoke_params() -> dict[str, Any]:
    """The shipped params.yaml with the smoke-scale overrides of tests/smoke_params.yaml."""
    return merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(SMOKE.read_text()))


def shipped(section: str, schema: type[S], **overrides: Any) -> S:
    """Section `section` of the smoke-scale params, with `overrides` merged in, validated by `schema`."""
    return validate(section, merge(smoke_params()[section], overrides), schema)
