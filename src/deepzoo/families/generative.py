"""What the generative families (`autoencoder`, `vae`, `betavae`, `gan`) share: image batches, the
convolutional encoder/decoder, the Bernoulli reconstruction loss, FID, and the figures of `generate`.

A model maps latent codes z [B, latent] to decoder logits [B, 1, 28, 28] (`decode`); its images are the
Bernoulli means sigmoid(logits) in [0, 1]. Models with an encoder also give each image one code (`code`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from deepzoo.config import Section, Width
from deepzoo.data import fashion_mnist
from deepzoo.data.fashion_mnist import to_unit
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, Trainable
from deepzoo.metrics import fid
from deepzoo.storage import save_figure

EXPERIMENT = "fashion-mnist-generation"


class ModelConfig(Section):
    latent: int = Field(ge=1)  # size of the code z
    channels: tuple[Width, Width]  # feature maps of the two stride-2 convolutions (28 → 14 → 7)


class EvaluateConfig(Section):
    batch_size: int = Field(ge=1)  # images per forward pass (FID compares as many samples as `embeddings.samples`)


class GenerateConfig(Section):
    steps: int = Field(ge=2)  # images per row of interpolations and traversals


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """−log p(x | z) per image in nats [B]: each pixel intensity is a Bernoulli probability, summed over pixels."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def encoder(channels: tuple[int, int], outputs: int, batch_norm: bool = False) -> nn.Sequential:
    """[B, 1, 28, 28] → [B, outputs]: two stride-2 convolutions (28 → 14 → 7), then one dense layer."""
    first, second = channels
    norm = [nn.BatchNorm2d(second)] if batch_norm else []  # DCGAN: no batch norm on the input layer
    return nn.Sequential(
        nn.Conv2d(1, first, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(first, second, 4, stride=2, padding=1), *norm, nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(second * 7 * 7, outputs),  # [B, second, 7, 7] → [B, second·49] → [B, outputs]
    )


def decoder(latent: int, channels: tuple[int, int], batch_norm: bool = False) -> nn.Sequential:
    """[B, latent] → logits [B, 1, 28, 28]: the encoder mirrored, with transposed convolutions (7 → 14 → 28)."""
    first, second = channels
    norm = lambda n, layer=nn.BatchNorm2d: [layer(n)] if batch_norm else []  # noqa: E731
    return nn.Sequential(
        nn.Linear(latent, second * 7 * 7), *norm(second * 7 * 7, nn.BatchNorm1d), nn.ReLU(),
        nn.Unflatten(1, (second, 7, 7)),  # [B, second·49] → [B, second, 7, 7]
        nn.ConvTranspose2d(second, first, 4, stride=2, padding=1), *norm(first), nn.ReLU(),
        nn.ConvTranspose2d(first, 1, 4, stride=2, padding=1),
    )


class Generative(Trainable):
    """Decodes latent codes z ~ N(0, I) into images; subclasses define `decode` and the loss."""

    def __init__(self, latent: int):
        super().__init__()
        self.latent = latent

    def prepare(self, batch: Batch) -> Batch:
        images, labels = batch
        return to_unit(images), labels

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def images(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decode(z))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, batch_size: int = 1000) -> Tensor:
        """n images [n, 1, 28, 28] decoded from z ~ N(0, I), on the CPU."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent, generator=generator)
        return torch.cat([self.images(chunk.to(device)).cpu() for chunk in z.split(batch_size)])


class Autoencoding(Generative):
    """A generative model with an encoder: `code(x)` is an image's point in latent space (z, or the VAE's μ)."""

    def code(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of x, in [0, 1]: what the MLflow-logged model serves."""
        return self.images(self.code(x))


def single_variant(name: str, model: Generative) -> dict[str, Variant]:
    return {name: Variant(model, fashion_mnist.splits())}


def fid_metrics(ctx: Context, model: Generative, data: dict[str, Batch]) -> dict[str, float]:
    """FID of n samples decoded from N(0, I) vs the reference's n test images, beside the real-vs-real floor.

    Only the samples are embedded here; the real images' side comes from `embed_images`. Also draws samples
    beside their nearest training images in the same features: a memorisation check.
    """
    reference = fid.load_reference()
    ctx.tags |= reference.lineage
    samples = model.sample(reference.n, torch.Generator().manual_seed(ctx.seed), ctx.cfg.evaluate.batch_size)
    sample_features = fid.features(reference.extractor, samples, ctx.cfg.evaluate.batch_size)
    distances = torch.cdist(sample_features[:8], reference.train_features.double())
    save_nearest_neighbours(ctx.out / "nearest_neighbours.png", samples[:8], to_unit(data["train"][0][: reference.n]),
                            distances)
    return {"fid": round(fid.frechet_distance(fid.fit_gaussian(sample_features), reference.test), 3),
            "fid_real_floor": round(reference.floor, 3)}


def save_nearest_neighbours(path: Path, samples: Tensor, train: Tensor, distances: Tensor, k: int = 5) -> None:
    """Each sample [S, 1, 28, 28] then its k nearest training images by `distances` [S, N]: new, or copied?"""
    nearest = distances.topk(k, dim=1, largest=False).indices  # [S, k]
    rows = torch.cat([samples.unsqueeze(1), train[nearest]], dim=1)  # [S, 1 + k, 1, 28, 28]
    save_grid(path, rows.flatten(0, 1), k + 1, f"sample, then its {k} nearest\ntraining images (cnn features)")


def tile(images: Tensor, columns: int, pad: int = 2) -> Tensor:
    """[N, 1, 28, 28] → one image [rows·(28 + pad), columns·(28 + pad)] with `pad`-pixel white gaps."""
    rows = math.ceil(len(images) / columns)
    size = images.shape[-1] + pad
    cells = F.pad(images[:, 0].cpu(), (0, pad, 0, pad), value=1.0)  # [N, size, size]
    cells = torch.cat([cells, torch.ones(rows * columns - len(images), size, size)])  # fill the last row
    return cells.view(rows, columns, size, size).permute(0, 2, 1, 3).reshape(rows * size, columns * size)


def save_grid(path: Path, images: Tensor, columns: int, title: str, row_labels: Sequence[str] = ()) -> None:
    canvas = tile(images, columns).numpy()
    rows = canvas.shape[0] / (canvas.shape[1] / columns)
    # 0.3 inch per 30-pixel cell at the figures' 110 dpi: about one screen pixel per image pixel
    fig, ax = plt.subplots(figsize=(0.3 * columns + (1.6 if row_labels else 0.2), 0.3 * rows + 0.5))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([canvas.shape[0] / rows * (i + 0.5) for i in range(len(row_labels))], row_labels, fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9)
    save_figure(path, fig)


def interpolate(start: Tensor, end: Tensor, steps: int) -> Tensor:
    """Points evenly spaced on the segments start → end: [P, L], [P, L] → [P·steps, L], row by row."""
    weights = torch.linspace(0, 1, steps, device=start.device).view(1, steps, 1)
    return (start.unsqueeze(1) * (1 - weights) + end.unsqueeze(1) * weights).flatten(0, 1)


def save_latent_view(path: Path, codes: Tensor, labels: Tensor, title: str) -> None:
    """Test images' codes [N, L] as points coloured by class; the first two principal components if L > 2."""
    codes, labels = codes.cpu().double(), labels.cpu()
    axis_names = ["z₁", "z₂"]
    if codes.shape[1] > 2:
        centred = codes - codes.mean(0)
        _, singular, right = torch.linalg.svd(centred, full_matrices=False)
        explained = singular.square() / singular.square().sum()
        codes = centred @ right[:2].T  # [N, L] → [N, 2]
        axis_names = [f"PC{i + 1} ({explained[i]:.0%} of variance)" for i in range(2)]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for k, name in enumerate(fashion_mnist.CLASSES):
        points = codes[labels == k].numpy()
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.5, label=name, linewidths=0)
    ax.set(xlabel=axis_names[0], ylabel=axis_names[1], title=title)
    ax.legend(markerscale=6, fontsize=7, loc="best")
    save_figure(path, fig)


@torch.no_grad()
def generate_samples(ctx: Context, model: Generative, name: str) -> None:
    """A grid of 64 samples from z ~ N(0, I)."""
    samples = model.sample(64, torch.Generator().manual_seed(ctx.seed))
    save_grid(ctx.out / "samples.png", samples, 8, f"{name}: 64 samples, z ~ N(0, I)")


@torch.no_grad()
def generate_autoencoding(ctx: Context, model: Autoencoding, test: Batch, name: str) -> None:
    """Samples, reconstructions beside their inputs, interpolations between test images, the latent view."""
    generate_samples(ctx, model, name)
    images, labels = test
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(ctx.seed))[:24]
    x, y = to_unit(images[pick]).to(ctx.device), labels[pick]
    pairs = torch.stack([x[:16], model(x[:16])]).view(2, 2, 8, 1, 28, 28)  # [input/recon, half, 8, 1, 28, 28]
    save_grid(ctx.out / "reconstructions.png", pairs.transpose(0, 1).reshape(32, 1, 28, 28), 8,
              f"{name}: test images and their reconstructions", ["input", "reconstruction"] * 2)
    steps, start, end = ctx.cfg.generate.steps, x[16:20], x[20:24]
    path = model.images(interpolate(model.code(start), model.code(end), steps)).view(4, steps, 1, 28, 28)
    rows = torch.cat([start.unsqueeze(1), path, end.unsqueeze(1)], dim=1)  # [4, steps + 2, 1, 28, 28]
    names = [fashion_mnist.CLASSES[k] for k in y.tolist()]
    classes = [f"{a} → {b}" for a, b in zip(names[16:20], names[20:24], strict=True)]
    save_grid(ctx.out / "interpolation.png", rows.flatten(0, 1), steps + 2,
              f"{name}: decoded along the line between two test images' codes", classes)
    codes = torch.cat([model.code(to_unit(chunk).to(ctx.device)) for chunk in images.split(1000)])
    save_latent_view(ctx.out / "latent_2d.png", codes, labels, f"{name}: test images in latent space")
