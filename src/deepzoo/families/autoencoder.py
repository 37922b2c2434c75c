"""`autoencoder`: lecture 4's deterministic encoder → bottleneck z → decoder, trained on ‖x − x̂‖².

Nothing shapes its latent space, so decoding z ~ N(0, I) is the baseline the VAE's FID should beat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deepzoo.config import Section, TrainConfig
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, evaluate as mean_loss
from deepzoo.families import generative

EXPERIMENT = generative.EXPERIMENT


class Config(Section):
    model: generative.ModelConfig
    train: TrainConfig
    evaluate: generative.EvaluateConfig
    generate: generative.GenerateConfig


class Autoencoder(generative.Autoencoding):
    def __init__(self, cfg: generative.ModelConfig):
        super().__init__(cfg.latent)
        self.encoder = generative.encoder(cfg.channels, cfg.latent)
        self.decoder = generative.decoder(cfg.latent, cfg.channels)

    def code(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        x, _ = batch
        logits = self.decode(self.code(x))
        mse = F.mse_loss(torch.sigmoid(logits), x)  # per pixel
        return mse, {"mse": mse, "bce": generative.bernoulli_nll(logits, x).mean()}


def variants(cfg: Config) -> dict[str, Variant]:
    return generative.single_variant("autoencoder", Autoencoder(cfg.model))


def evaluate(ctx: Context) -> dict[str, float]:
    """Test reconstruction error (MSE per pixel; BCE in nats per image, as the VAE's) and FID of N(0, I) decodes."""
    (variant,) = ctx.variants.values()
    scores = mean_loss(variant.model, variant.data["test"], ctx.cfg.evaluate.batch_size, ctx.device)
    fid = generative.fid_metrics(ctx, variant.model, variant.data)
    return {"test_recon_mse": round(scores["mse"], 5), "test_recon_bce": round(scores["bce"], 3), **fid}


def generate(ctx: Context) -> None:
    (variant,) = ctx.variants.values()
    generative.generate_autoencoding(ctx, variant.model, variant.data["test"], "autoencoder")
