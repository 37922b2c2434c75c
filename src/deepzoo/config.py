"""The one config loader: reads `params.yaml`, validates one section into a typed object.

Every stage validates only the section it uses, so DVC tracks exactly the params a stage reads.
Errors name the full key path, the rule and the value, e.g. `cnn.train.lr must be > 0, got -1`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PARAMS_FILE = Path("params.yaml")
Width = Annotated[int, Field(ge=1)]  # a layer's size: units, channels or feature maps, at least one


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or has invalid values; the message says which and how to fix it."""


class Section(BaseModel):
    """Base of every params section: typed, immutable, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainConfig(Section):
    """What the shared trainer needs; every family's `train:` section is (or extends) this.

    A recipe's choices have no default here: their values come from params.yaml only. The knobs with a
    default are off, or PyTorch's own default, unless a section sets them.
    """

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    optimizer: Literal["sgd", "adam", "adamw", "adadelta", "adagrad", "rmsprop"]
    lr: float = Field(gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD and RMSprop only
    betas: tuple[float, float] = (0.9, 0.999)  # Adam and AdamW only
    weight_decay: float = Field(0.0, ge=0)
    # "plateau" divides the learning rate by 10 when validation loss stalls; "cosine" anneals to 0 over the
    # epochs; "onecycle" rises from lr/25 to lr over the first `warmup` of the steps, then anneals to ~0, per step.
    schedule: Literal["none", "plateau", "cosine", "onecycle"]
    warmup: float = Field(0.25, gt=0, lt=1)  # "onecycle" only: the share of all steps spent rising
    patience: int | None = Field(ge=1)  # early-stopping patience in epochs; null disables it
    min_delta: float = Field(0.0, ge=0)
    clip_grad_norm: float | None = Field(None, gt=0)
    # An exponential moving average of the weights, updated after every step with this decay (e.g. 0.998): what
    # every evaluation sees and what training returns. null: no average, the last step's weights.
    ema: float | None = Field(None, gt=0, lt=1)
    # A classifier's test accuracy after every epoch (never used to choose anything; its time is not training
    # time), and the training seconds until it first reaches this: how fast a recipe gets to a result.
    target_accuracy: float | None = Field(None, gt=0, le=1)
    max_batches: int | None = Field(None, ge=1)  # per epoch; caps smoke and benchmark runs
    # Training steps under bf16 autocast where the device computes bf16 natively (device.bf16_autocast: CUDA GPUs,
    # CPUs with AVX512-BF16 or AMX); evaluations are float32 either way.
    mixed_precision: bool = True
    compile: bool = False  # torch.compile the model (see benchmarks: it does not pay on 2 CPU cores)
    processes: int = Field(1, ge=1)  # data-parallel ranks launched with torchrun (gloo on CPU, NCCL on GPUs)


class Common(Section):
    """The shared section: what every stage reads."""

    seed: int


S = TypeVar("S", bound=BaseModel)


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the repository root (where dvc.yaml is)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(params).__name__}")
    return params


def load_section(name: str, schema: type[S], path: Path = PARAMS_FILE) -> S:
    """Validate `params.yaml`'s top-level section `name` against `schema`."""
    params = read_params(path)
    if name not in params:
        close = difflib.get_close_matches(name, list(params), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{path} has no section '{name}'{hint}")
    return validate(name, params[name] or {}, schema)


def validate(name: str, values: Any, schema: type[S]) -> S:
    try:
        return schema.model_validate(values)
    except ValidationError as err:
        problems = [_describe(name, e, schema) for e in err.errors()]
        raise ConfigError("invalid params:\n  " + "\n  ".join(problems)) from None


def _describe(section: str, error: dict[str, Any], schema: type[BaseModel]) -> str:
    path = ".".join([section, *(str(p) for p in error["loc"])])
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        valid = _keys_at(schema, error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), valid, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return f"{path} is not a known key; {hint}"
    bound = {key: f"{v:g}" if isinstance(v, float) else v for key, v in ctx.items()}
    rules = {
        "greater_than": f"must be > {bound.get('gt')}",
        "greater_than_equal": f"must be >= {bound.get('ge')}",
        "less_than": f"must be < {bound.get('lt')}",
        "less_than_equal": f"must be <= {bound.get('le')}",
        "literal_error": f"must be one of {ctx.get('expected')}",
        "missing": "is required",
    }
    rule = rules.get(kind, error["msg"].lower())
    return f"{path} {rule}" + ("" if kind == "missing" else f", got {value!r}")


def _keys_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the (nested) section at `loc`, for 'did you mean' hints."""
    model: Any = schema
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))
