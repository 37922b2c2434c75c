"""2-D toy points from scikit-learn generators: linearly separable blobs and non-linear moons.

Output `data/processed/toy2d/<dataset>.pt`, each `{split: {"points": float32 [N, 2], "labels": float32 [N]}}`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from deepzoo.config import Section
from deepzoo.storage import atomic_path

OUTPUT = Path("data/processed/toy2d")


class Params(Section):
    n_samples: int = Field(ge=20)
    noise: float = Field(ge=0)  # std of the moons' Gaussian noise
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)


def generate(params: Params, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import make_blobs, make_moons  # here: the stages that only load the data skip sklearn

    return {
        "separable": make_blobs(params.n_samples, centers=[(-1.5, -1.5), (1.5, 1.5)], cluster_std=0.8,
                                random_state=seed),
        "moons": make_moons(params.n_samples, noise=params.noise, random_state=seed),
    }


def split(points: np.ndarray, labels: np.ndarray, params: Params, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    from sklearn.model_selection import train_test_split

    rest_x, test_x, rest_y, test_y = train_test_split(points, labels, test_size=params.test_fraction,
                                                      stratify=labels, random_state=seed)
    val_share = params.val_fraction / (1 - params.test_fraction)
    train_x, val_x, train_y, val_y = train_test_split(rest_x, rest_y, test_size=val_share,
                                                      stratify=rest_y, random_state=seed)
    pairs = {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_x, test_y)}
    return {name: {"points": torch.tensor(x, dtype=torch.float32), "labels": torch.tensor(y, dtype=torch.float32)}
            for name, (x, y) in pairs.items()}


def prepare(params: Params, seed: int, output: Path = OUTPUT) -> dict[str, int]:
    datasets = {name: split(x, y, params, seed) for name, (x, y) in generate(params, seed).items()}
    with atomic_path(output) as tmp:
        tmp.mkdir()
        for name, splits in datasets.items():
            torch.save(splits, tmp / f"{name}.pt")
    return {name: sum(len(s["labels"]) for s in splits.values()) for name, splits in datasets.items()}


def load(dataset: str, root: Path = OUTPUT) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    path = root / f"{dataset}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro prepare_toy2d` first")
    return {name: (s["points"], s["labels"]) for name, s in torch.load(path).items()}
