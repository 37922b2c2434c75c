"""Fréchet distance between image sets (FID, Heusel et al. 2017) on a fixed feature extractor.

There are no pretrained Inception weights offline, so the features are the penultimate layer (Dense 1024) of
the lecture CNN that the `embed_images` stage trains once, with its own recipe and seed: experiments on the
`cnn` family never move FID, and the numbers compare within deepzoo, not with published FIDs. FID is biased
upwards for small sets, so every FID here compares `n` generated images with the same `n` test images the
reference statistics were computed on (`n` = `embeddings.samples`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from deepzoo.registry import EMBEDDINGS

EXTRACTOR, REFERENCE, FACTS = "extractor.pt2", "reference.pt", "extractor.json"


@dataclass
class Gaussian:
    """Mean [D] and covariance [D, D] of a set's features, in float64."""

    mean: np.ndarray
    cov: np.ndarray


@dataclass
class Reference:
    """What `embed_images` stores: the extractor and the real images' side of every FID."""

    extractor: nn.Module  # images [N, 1, 28, 28] in [0, 1] → features [N, D], on the CPU
    test: Gaussian  # of the first n test images
    floor: float  # FID of the first n real training images vs those test images: the best a generator can do
    train_features: Tensor  # [n, D] of those training images, for nearest-neighbour figures
    lineage: dict[str, str]  # which extractor: the MLflow run of `embed_images` and the exported file's SHA-256

    @property
    def n(self) -> int:
        return len(self.train_features)


class Features(nn.Module):
    """A model's `features(x)` as its `forward`: what `torch.export` exports, so no model code is needed to load it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.features(x)


def export_extractor(model: nn.Module, path: Path) -> nn.Module:
    """Export `model.features` (CPU, any batch size) to `path` and return the exported module."""
    example = torch.rand(2, 1, 28, 28)
    program = torch.export.export(Features(model.cpu().eval()), (example,),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, path)
    return program.module()


def load_reference(root: Path = Path(EMBEDDINGS)) -> Reference:
    paths = root / EXTRACTOR, root / REFERENCE
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: FID needs the feature extractor, run `dvc repro embed_images`")
    stored = torch.load(paths[1])
    test = Gaussian(stored["test_mean"].numpy(), stored["test_cov"].numpy())
    facts = json.loads((root / FACTS).read_text()) if (root / FACTS).is_file() else {}
    lineage = {"fid_extractor_sha256": hashlib.sha256(paths[0].read_bytes()).hexdigest(),
               "fid_extractor_run_id": facts.get("run_id", "unknown")}
    return Reference(torch.export.load(paths[0]).module(), test, stored["floor"], stored["train_features"], lineage)


@torch.no_grad()
def features(extractor: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Features [N, D] (float64, CPU) of `images` [N, 1, 28, 28] in [0, 1], computed on the CPU like the reference."""
    return torch.cat([extractor(chunk.cpu()).double() for chunk in images.split(batch_size)])


def fit_gaussian(features: Tensor) -> Gaussian:
    return Gaussian(features.mean(0).numpy(), np.cov(features.numpy(), rowvar=False))


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½).

    Σa Σb is similar to the symmetric PSD matrix Σa^½ Σb Σa^½, so the trace of its root is the sum of the
    square roots of that matrix's eigenvalues: `eigh` keeps this real and stable where `sqrtm` can return
    complex noise for near-singular covariances (ReLU features have many dead units).
    """
    values, vectors = np.linalg.eigh(a.cov)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ b.cov @ root_a).clip(min=0)).sum()
    distance = np.sum((a.mean - b.mean) ** 2) + np.trace(a.cov) + np.trace(b.cov) - 2 * cross
    return float(max(distance, 0.0))  # rounding can leave -1e-12 for identical sets
