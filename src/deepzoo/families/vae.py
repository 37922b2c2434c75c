"""`vae`: the variational autoencoder (Kingma & Welling 2014), lecture 4's encoder → μ, σ → z → decoder.

q(z|x) = N(μ, σ²) with z = μ + σ ⊙ ε; p(x|z) = Bernoulli(sigmoid(decoder(z))) per pixel; p(z) = N(0, I).
The loss is the negative ELBO with the KL weighted by β (β = 1 here; `betavae` is this module with β > 1).
Pixel intensities in [0, 1] are used as Bernoulli targets, as in pytorch/examples: the likelihoods are in
nats per image but not comparable with published numbers on binarised MNIST.
"""

from __future__ import annotations

import csv
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from pydantic import Field
from torch import Tensor

from deepzoo.config import Section, TrainConfig
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, evaluate as mean_loss
from deepzoo.families import generative
from deepzoo.storage import save_figure

EXPERIMENT = generative.EXPERIMENT
ACTIVE_UNIT_VARIANCE = 0.01  # a latent is active when Var_x(E_q[z_u]) > 0.01 (Burda et al. 2016)


class ModelConfig(generative.ModelConfig):
    beta: float = Field(gt=0)  # weight of the KL term; 1 gives the true ELBO


class EvaluateConfig(generative.EvaluateConfig):
    iw_samples: int = Field(ge=1)  # k in the importance-weighted bound
    iw_images: int = Field(ge=1)  # the first test images, where it is computed (k decodes each)


class GenerateConfig(generative.GenerateConfig):
    traversal_range: float = Field(gt=0)  # each latent sweeps [-r, r] prior standard deviations


class Config(Section):
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    generate: GenerateConfig


def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²), per latent dimension [B, L], in nats."""
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar)


def vae_loss(logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, beta: float = 1.0
             ) -> tuple[Tensor, Tensor, Tensor]:
    """−ELBO = −E_q[log p(x|z)] + KL(q(z|x) ‖ p(z)) (Kingma & Welling 2014, eq. 10), with the KL weighted
    by β (Higgins et al. 2017). Returns the loss, reconstruction and KL: batch means of nats per image."""
    reconstruction = generative.bernoulli_nll(logits, x).mean()
    kl = kl_per_dim(mu, logvar).sum(1).mean()
    return reconstruction + beta * kl, reconstruction, kl


class VAE(generative.Autoencoding):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.latent)
        self.beta = cfg.beta
        self.encoder = generative.encoder(cfg.channels, 2 * cfg.latent)
        self.decoder = generative.decoder(cfg.latent, cfg.channels)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # [B, 2L] → μ [B, L], log σ² [B, L]
        return mu, logvar

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        # The noise ε is an input, not a node: gradients reach μ and σ through z = μ + σ ⊙ ε.
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def code(self, x: Tensor) -> Tensor:
        return self.encode(x)[0]

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        x, _ = batch
        mu, logvar = self.encode(x)
        loss, reconstruction, kl = vae_loss(self.decode(self.reparameterize(mu, logvar)), x, mu, logvar, self.beta)
        return loss, {"recon": reconstruction, "kl": kl, "neg_elbo": reconstruction + kl}


def importance_weighted_nll(model: VAE, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """−log p(x) ≈ −log (1/k) Σᵢ p(x|zᵢ) p(zᵢ) / q(zᵢ|x) with zᵢ ~ q(z|x) (Burda et al. 2016), per image [B].

    Also returns −(1/k) Σᵢ log wᵢ, the negative ELBO from the same samples: by Jensen the first is never larger.
    """
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(k, *mu.shape, device=x.device)  # [k, B, L]
    logits = model.decode(z.flatten(0, 1))  # [k·B, L] → [k·B, 1, 28, 28]
    log_px_z = -generative.bernoulli_nll(logits, x.expand(k, *x.shape).flatten(0, 1)).view(k, -1)  # [k, B]
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
    log_w = log_px_z + log_pz - log_qz  # [k, B]
    return -(torch.logsumexp(log_w, 0) - math.log(k)), -log_w.mean(0)


def latent_statistics(model: VAE, images: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Mean KL per latent dimension [L] and the variance of μ across images [L], for uint8 `images`."""
    encoded = [model.encode(generative.to_unit(chunk).to(device)) for chunk in images.split(1000)]
    mu, logvar = (torch.cat(part).cpu() for part in zip(*encoded, strict=True))
    return kl_per_dim(mu, logvar).mean(0), mu.var(0)


def variants(cfg: Config, name: str = "vae") -> dict[str, Variant]:
    return generative.single_variant(name, VAE(cfg.model))


def evaluate(ctx: Context) -> dict[str, float]:
    """Negative ELBO (β = 1, whatever β trained), importance-weighted NLL, KL per dimension and FID."""
    (variant,) = ctx.variants.values()
    model, test, cfg = variant.model, variant.data["test"], ctx.cfg.evaluate
    scores = mean_loss(model, test, cfg.batch_size, ctx.device)
    subset = generative.to_unit(test[0][: cfg.iw_images])
    per_chunk = max(1, 1000 // cfg.iw_samples)  # k decodes per image: batches of about 1000 decodes
    bounds = [importance_weighted_nll(model, chunk.to(ctx.device), cfg.iw_samples) for chunk in subset.split(per_chunk)]
    nll, neg_elbo = (torch.cat(part) for part in zip(*bounds, strict=True))
    kl, variance = latent_statistics(model, test[0], ctx.device)
    with (ctx.out / "kl_per_dim.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("dim", "kl", "mu_variance"),
                                 *((u, f"{k:.5f}", f"{v:.5f}") for u, (k, v) in enumerate(zip(kl, variance)))])
    save_figure(ctx.out / "kl_per_dim.png", kl_figure(kl, variance, f"β = {model.beta:g}"))
    return {"test_neg_elbo": round(scores["neg_elbo"], 3), "test_recon_bce": round(scores["recon"], 3),
            "test_kl": round(scores["kl"], 3), "test_nll_iw": round(nll.mean().item(), 3),
            "test_neg_elbo_iw_subset": round(neg_elbo.mean().item(), 3),  # same images and samples as test_nll_iw
            "active_units": int((variance > ACTIVE_UNIT_VARIANCE).sum()),
            **generative.fid_metrics(ctx, model, variant.data)}


def kl_figure(kl: Tensor, variance: Tensor, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3))
    active = variance > ACTIVE_UNIT_VARIANCE
    ax.bar(range(len(kl)), kl.numpy(), color=["tab:blue" if a else "tab:gray" for a in active])
    ax.set(xlabel="latent dimension", ylabel="mean KL (nats)",
           title=f"KL per latent dimension, {title}: {int(active.sum())} active (blue)")
    return fig


@torch.no_grad()
def generate(ctx: Context) -> None:
    """The shared figures, plus latent traversals: one row per latent, sorted by KL, the others fixed."""
    ((name, variant),) = ctx.variants.items()
    model, test, cfg = variant.model, variant.data["test"], ctx.cfg.generate
    generative.generate_autoencoding(ctx, model, test, name)
    kl, _ = latent_statistics(model, test[0], ctx.device)
    order = kl.argsort(descending=True)
    base = model.code(generative.to_unit(test[0][:1]).to(ctx.device))  # [1, L]: the first test image's μ
    z = base.repeat(len(order), cfg.steps, 1)  # [L, steps, L]
    values = torch.linspace(-cfg.traversal_range, cfg.traversal_range, cfg.steps, device=ctx.device)
    z[torch.arange(len(order)), :, order] = values  # row r sweeps latent order[r]
    generative.save_grid(ctx.out / "traversals.png", model.images(z.flatten(0, 1)), cfg.steps,
                         f"{name}: traversals, z_u from {-cfg.traversal_range:g} to {cfg.traversal_range:g}",
                         [f"z{u} (KL {kl[u]:.2f})" for u in order.tolist()])
