"""Fréchet distance between image sets (FID, Heusel et al. 2017) on the trained `cnn`'s penultimate features.

There are no pretrained Inception weights here, so the embedding is our own Fashion-MNIST classifier's
Dense-1024 layer: numbers are comparable within deepzoo (same `models/cnn/cnn.pt`), not with published FIDs.
FID is biased upwards for small sets, so compare only values computed with the same number of images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from deepzoo.families import cnn

CNN_CHECKPOINT = Path("models/cnn/cnn.pt")


@dataclass
class Gaussian:
    """Mean [D] and covariance [D, D] of a set's features, in float64."""

    mean: np.ndarray
    cov: np.ndarray


def load_extractor(device: torch.device, path: Path = CNN_CHECKPOINT) -> cnn.CNN:
    """The trained `cnn`, rebuilt from the config saved in its checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: FID needs the trained cnn, run `dvc repro train@cnn` first")
    checkpoint = torch.load(path, map_location="cpu")
    model = cnn.CNN(cnn.Config.model_validate(checkpoint["config"]).model)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()


@torch.no_grad()
def features(extractor: cnn.CNN, images: Tensor, batch_size: int = 1000) -> Tensor:
    """The penultimate-layer features [N, 1024] (float64, CPU) of `images` [N, 1, 28, 28] in [0, 1]."""
    device = next(extractor.parameters()).device
    return torch.cat([extractor.features(chunk.to(device)).double().cpu() for chunk in images.split(batch_size)])


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
