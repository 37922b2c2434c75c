"""The generative families: reparameterisation, KL, β, the GAN step, FID and the IW bound, on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from configs import shipped

from deepzoo.config import ConfigError
from deepzoo.data import embeddings
from deepzoo.engine.stages import Context
from deepzoo.engine.trainer import fit
from deepzoo.families import autoencoder, betavae, cnn, gan, generative, vae
from deepzoo.metrics import fid

TINY = {"latent": 3, "channels": (2, 4)}


def fake_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 28, 28]: one bright rectangle of random size, place and brightness on black, like a garment."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.arange(28).view(1, 28, 1), torch.arange(28).view(1, 1, 28)
    top, left = torch.randint(0, 14, (2, n, 1, 1), generator=g)
    height, width = torch.randint(6, 14, (2, n, 1, 1), generator=g)
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    return (inside * torch.randint(100, 256, (n, 1, 1), generator=g)).to(torch.uint8)


@pytest.fixture
def fake_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Families load Fashion-MNIST from data/processed; these tests run without it."""
    splits = {name: (fake_images(n, seed), torch.randint(0, 10, (n,))) for seed, (name, n)
              in enumerate({"train": 64, "val": 32, "test": 48}.items())}
    monkeypatch.setattr(generative.fashion_mnist, "splits", lambda: splits)


def test_reparameterisation_passes_gradients_to_mu_and_sigma() -> None:
    model = vae.VAE(shipped("vae", vae.Config, model=TINY).model)
    mu, logvar = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    torch.manual_seed(0)
    z = model.reparameterize(mu, logvar)
    torch.manual_seed(0)
    eps = torch.randn(5, 3)
    z.sum().backward()
    # z = μ + exp(½ log σ²) ε: ∂z/∂μ = 1 and ∂z/∂log σ² = ½ σ ε
    torch.testing.assert_close(mu.grad, torch.ones(5, 3))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_closed_form_kl_equals_a_monte_carlo_estimate() -> None:
    mu, logvar = torch.tensor([[0.5, -1.0, 2.0]]).double(), torch.tensor([[0.0, -2.0, 0.7]]).double()
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z = q.sample((200_000,)).squeeze(1)  # [n, 1, 3] → [n, 3]
    log_ratio = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1)  # [n]
    standard_error = log_ratio.std() / math.sqrt(len(log_ratio))
    closed_form = vae.kl_per_dim(mu, logvar).sum()
    assert abs(log_ratio.mean() - closed_form) < 4 * standard_error


def test_betavae_is_the_vae_with_the_kl_weighted_by_beta(fake_splits: None) -> None:
    cfg = shipped("betavae", betavae.Config, model=TINY)
    assert cfg.model.beta == 4.0
    (variant,) = betavae.variants(cfg).values()
    assert type(variant.model) is vae.VAE
    torch.manual_seed(1)
    loss, metrics = variant.model.loss(variant.model.prepare(variant.data["train"]))
    torch.testing.assert_close(loss, metrics["recon"] + 4.0 * metrics["kl"])
    torch.testing.assert_close(metrics["neg_elbo"], metrics["recon"] + metrics["kl"])  # the ELBO itself, β = 1
    with pytest.raises(ConfigError, match=r"betavae\.model\.beta must be > 1"):
        shipped("betavae", betavae.Config, model={"beta": 1.0})  # that is the `vae` family


def test_one_gan_step_through_the_trainer_changes_both_networks() -> None:
    torch.manual_seed(0)
    cfg = shipped("gan", gan.Config, model=TINY, train={"epochs": 1, "batch_size": 8})
    model = gan.GAN(cfg.model)
    before = {name: [p.detach().clone() for p in params] for name, params in model.optimizer_groups().items()}
    data = (fake_images(8), torch.zeros(8, dtype=torch.long))
    result = fit(model, data, None, cfg.train, torch.device("cpu"), torch.Generator().manual_seed(0))
    for name, params in model.optimizer_groups().items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], params, strict=True)), f"{name} did not move"
    assert {"train/discriminator_loss", "train/generator_loss", "train/d_real"} <= set(result.history[0])


def test_gan_scores_the_generator_with_the_updated_discriminator() -> None:
    model = gan.GAN(shipped("gan", gan.Config, model=TINY).model)
    steps = model.training_losses(model.prepare((fake_images(4), torch.zeros(4))))
    group, d_loss, _ = next(steps)
    assert group == "discriminator" and not torch.isclose(d_loss, torch.tensor(2 * math.log(2)))
    with torch.no_grad():  # stands in for the optimizer step: a discriminator with every weight 0 says D = ½
        for p in model.discriminator.parameters():
            p.zero_()
    group, g_loss, _ = next(steps)
    assert group == "generator"
    torch.testing.assert_close(g_loss, torch.tensor(math.log(2)))  # −log ½: the updated D scored it
    g_loss.backward()
    assert all(p.grad is not None for p in model.generator.parameters())


def diagonal(mean: list[float], std: list[float]) -> fid.Gaussian:
    return fid.Gaussian(np.array(mean), np.diag(np.square(std)))


def test_frechet_distance_closed_forms() -> None:
    # Diagonal covariances: ‖μa − μb‖² + Σ (σa − σb)²
    a, b = diagonal([0.0, 1.0], [1.0, 2.0]), diagonal([3.0, 1.0], [0.5, 2.0])
    assert fid.frechet_distance(a, b) == pytest.approx(9 + 0.25)
    # Full covariances: the eigen-based trace equals scipy's matrix square root
    rng = np.random.default_rng(0)
    m, n = rng.normal(size=(2, 20, 20))
    cov_a, cov_b = m @ m.T, n @ n.T
    reference = np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert fid.frechet_distance(fid.Gaussian(np.zeros(20), cov_a), fid.Gaussian(np.zeros(20), cov_b)) == pytest.approx(
        reference, rel=1e-6)


def test_fid_is_zero_for_a_set_with_itself_and_grows_with_noise() -> None:
    torch.manual_seed(0)
    extractor = fid.Features(cnn.CNN(shipped("cnn", cnn.Config, model={"filters": [8, 16], "dense": 64}).model))
    images = generative.to_unit(fake_images(800))  # random weights still embed images
    fit = lambda x: fid.fit_gaussian(fid.features(extractor, x))  # noqa: E731
    reference = fit(images)
    assert fid.frechet_distance(reference, fit(images)) < 1e-6
    g = torch.Generator().manual_seed(1)
    noisy = [fid.frechet_distance(fit((images + s * torch.randn(images.shape, generator=g)).clamp(0, 1)), reference)
             for s in (0.05, 0.1, 0.2, 0.4)]
    assert noisy == sorted(noisy) and noisy[0] > 0


def test_importance_weighted_nll_is_at_most_the_negative_elbo() -> None:
    torch.manual_seed(0)
    model = vae.VAE(shipped("vae", vae.Config, model=TINY).model).eval()
    x = generative.to_unit(fake_images(6))
    with torch.no_grad():
        nll, neg_elbo_same_samples = vae.importance_weighted_nll(model, x, k=200)
        neg_elbo = torch.stack([model.loss((x, None))[1]["neg_elbo"] for _ in range(20)]).mean()
        single, same = vae.importance_weighted_nll(model, x, k=1)
    assert (nll <= neg_elbo_same_samples).all()  # Jensen, sample by sample
    assert nll.mean() < neg_elbo  # against the closed-form-KL ELBO the loss reports
    torch.testing.assert_close(single, same)  # k = 1 is the ELBO itself


@pytest.mark.parametrize("family", [autoencoder, vae, betavae, gan])
def test_evaluate_and_generate_write_their_metrics_and_figures(family, fake_splits: None, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # FID reads its reference from data/processed/embeddings
    torch.manual_seed(0)
    extractor = cnn.CNN(shipped("embeddings", embeddings.Params).model)  # random weights still embed images
    embeddings.write_reference(extractor, generative.fashion_mnist.splits(), samples=40)
    cfg = shipped(family.__name__.rpartition(".")[2], family.Config, model=TINY, generate={"steps": 3})
    variants = family.variants(cfg)
    ctx = Context(variants, cfg, torch.device("cpu"), tmp_path / "plots", seed=0, samples=tmp_path / "samples")
    ctx.out.mkdir()
    with torch.no_grad():
        metrics = family.evaluate(ctx)
    assert {"fid", "fid_real_floor"} <= set(metrics) and all(math.isfinite(v) for v in metrics.values())
    ctx.out = ctx.samples
    ctx.out.mkdir()
    family.generate(ctx)
    written = {p.name for p in ctx.out.iterdir()}
    assert {"samples.png", "interpolation.png"} <= written and (tmp_path / "plots/nearest_neighbours.png").is_file()
    if family is not gan:
        assert {"reconstructions.png", "latent_2d.png"} <= written
    if family in (vae, betavae):
        assert "traversals.png" in written and {"test_nll_iw", "active_units"} <= set(metrics)
