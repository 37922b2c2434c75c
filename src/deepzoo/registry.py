"""The one list of deepzoo's datasets and families, and the one place that imports their modules.

A dataset is a module `deepzoo.data.<name>` (`Params`, `prepare(params, seed)`, loaders) run by one
`prepare_*`-style stage. A family is a module `deepzoo.families.<name>` with `EXPERIMENT`, `Config` (its
params section), `variants(cfg)` (its model or models with their data), `evaluate(ctx)` and, when it
generates, `generate(ctx)`. The CLI's choices, the stage orchestration and `dvc.yaml`'s `vars` follow from
this file: `python -m deepzoo.wiring` prints the `vars` block, and the tests hold `dvc.yaml` to it.

Adding a family is a module in `families/`, an entry in `FAMILIES` and a section in `params.yaml`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Dataset:
    stage: str  # the DVC stage that writes data/processed/<name>
    own_seed: bool = False  # its params section has its own `seed` instead of reading `common.seed`


@dataclass(frozen=True)
class Family:
    data: str  # the dataset it trains on (a key of DATASETS)
    headline: str  # the metric that sums it up in the results table
    goal: str = ""  # what the headline should reach, as the table shows it
    higher_is_better: bool = True  # of the headline: which model of the family is its champion
    generates: bool = False  # has a generate@<family> stage
    # What its training and its evaluation read besides its own data and model: outputs of other stages.
    training_reads: tuple[str, ...] = ()
    evaluation_reads: tuple[str, ...] = ()


EMBEDDINGS = "data/processed/embeddings"  # the FID feature extractor and the real images' statistics
PRETRAINED = "models/resnet"  # the classifier whose trunk the scenes families fine-tune

DATASETS = {
    "fashion_mnist": Dataset("prepare_images"),
    "tunes": Dataset("prepare_tunes"),
    "toy2d": Dataset("prepare_toy2d"),
    "scenes": Dataset("prepare_scenes"),  # Fashion-MNIST items composed into scenes: detection and segmentation
    "embeddings": Dataset("embed_images", own_seed=True),
}

FAMILIES = {
    "perceptron": Family("toy2d", "test_accuracy_deep_relu", "> deep_linear's"),
    "mlp": Family("fashion_mnist", "test_accuracy", "≥ 0.89"),
    "cnn": Family("fashion_mnist", "test_accuracy", "≥ 0.915"),
    "resnet": Family("fashion_mnist", "test_accuracy", "≥ 0.94"),
    # The scenes families start from the trained resnet's trunk.
    # fcn composes new training scenes every epoch, of Fashion-MNIST's training images.
    "fcn": Family("scenes", "mean_iou", "≥ 0.80", training_reads=(PRETRAINED, "data/processed/fashion_mnist")),
    "rcnn": Family("scenes", "map_50", "< faster_rcnn's", training_reads=(PRETRAINED,)),
    "faster_rcnn": Family("scenes", "map_50", "≥ 0.90", training_reads=(PRETRAINED,)),
    # The sequence families measure the tunes their generate stage wrote.
    "rnn": Family("tunes", "val_bits_per_char", "> lstm's", higher_is_better=False, generates=True,
                  evaluation_reads=("reports/samples/rnn",)),
    "lstm": Family("tunes", "val_bits_per_char", "≤ 1.6", higher_is_better=False, generates=True,
                   evaluation_reads=("reports/samples/lstm",)),
    # The generative families measure FID on the fixed extractor of `embed_images`.
    **{name: Family("fashion_mnist", "fid", goal, higher_is_better=False, generates=True, evaluation_reads=(EMBEDDINGS,))
       for name, goal in [("autoencoder", "> vae's"), ("vae", "> gan's"), ("betavae", ""), ("gan", "lowest")]},
}

FAMILY_COMMANDS = ("train", "evaluate", "generate")


def registered_model(family: str, variant: str, variants: int) -> str:
    """The MLflow model registry's name of a family's model: `deepzoo-cnn`, or `deepzoo-perceptron-deep_relu`
    for a family of several variants."""
    return f"deepzoo-{family}" if variants == 1 else f"deepzoo-{family}-{variant}"


def entry_modules(command: str, target: str) -> list[str]:
    """The deepzoo modules `deepzoo COMMAND TARGET` imports by name (the rest it imports from these)."""
    if command == "prepare":
        return [f"deepzoo.data.{target}"]
    return ["deepzoo.engine.stages", f"deepzoo.families.{target}"]


def dataset_module(name: str) -> ModuleType:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    return importlib.import_module(entry_modules("prepare", name)[0])


def family_module(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown family '{name}'; choose one of {', '.join(FAMILIES)}")
    return importlib.import_module(entry_modules("train", name)[-1])
