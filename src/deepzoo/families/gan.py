"""`gan`: a DCGAN-style generator and discriminator for 28×28 images (Radford et al. 2016), in lecture 4's
min-max game (Goodfellow et al. 2014): D learns to tell real from generated images, G learns to fool D.

Each batch takes one discriminator step, then one generator step scored by the updated discriminator;
the trainer steps each network's own optimizer (`optimizer_groups`, `training_losses`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepzoo.config import Section, TrainConfig
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, Metrics
from deepzoo.families import generative

EXPERIMENT = generative.EXPERIMENT


class GANTrainConfig(TrainConfig):
    # DCGAN's Adam: lr 2e-4 and β₁ = 0.5, where PyTorch's default 0.9 oscillates: a GAN recipe must say.
    betas: tuple[float, float]


class Config(Section):
    model: generative.ModelConfig
    train: GANTrainConfig
    evaluate: generative.EvaluateConfig
    generate: generative.GenerateConfig


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """−log D(x) − log(1 − D(G(z))) (Goodfellow et al. 2014, eq. 1), on logits l: −log σ(l) = softplus(−l)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating −log D(G(z)) (Goodfellow et al. 2014, §3): same fixed point as minimising
    log(1 − D(G(z))), but strong gradients early on, when D rejects every generated image."""
    return F.softplus(-fake_logits).mean()


def dcgan_init(module: nn.Module) -> None:
    """Weights ~ N(0, 0.02), batch-norm scales ~ N(1, 0.02), as in DCGAN (Radford et al. 2016)."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class GAN(generative.Generative):
    def __init__(self, cfg: generative.ModelConfig):
        super().__init__(cfg.latent)
        self.generator = generative.decoder(cfg.latent, cfg.channels, batch_norm=True)
        self.discriminator = generative.encoder(cfg.channels, 1, batch_norm=True)  # [B, 1, 28, 28] → logit [B, 1]
        self.apply(dcgan_init)

    def decode(self, z: Tensor) -> Tensor:
        return self.generator(z)

    def forward(self, z: Tensor) -> Tensor:
        """Images [B, 1, 28, 28] in [0, 1] from noise [B, latent]: what the MLflow-logged model serves."""
        return self.images(z)

    def example_input(self, data: Batch) -> Tensor:
        return torch.randn(1, self.latent)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"discriminator": list(self.discriminator.parameters()), "generator": list(self.generator.parameters())}

    def fakes(self, real: Tensor) -> Tensor:
        return self.images(torch.randn(len(real), self.latent, device=real.device))

    def training_losses(self, batch: Batch) -> Iterator[tuple[str, Tensor, Metrics]]:
        real, _ = batch
        fake = self.fakes(real)
        # detach: the discriminator's step must not move the generator
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake.detach())
        yield "discriminator", discriminator_loss(real_logits, fake_logits), scores(real_logits, fake_logits)
        # Resumed after the discriminator's step: G is scored by the updated D, through the same samples.
        yield "generator", generator_loss(self.discriminator(fake)), {}

    def loss(self, batch: Batch) -> tuple[Tensor, Metrics]:
        """For validation: the discriminator loss is −V(D, G), the value of the game; plus G's loss."""
        real, _ = batch
        real_logits, fake_logits = self.discriminator(real), self.discriminator(self.fakes(real))
        d_loss = discriminator_loss(real_logits, fake_logits)
        return d_loss, {"discriminator_loss": d_loss, "generator_loss": generator_loss(fake_logits),
                        **scores(real_logits, fake_logits)}


def scores(real_logits: Tensor, fake_logits: Tensor) -> Metrics:
    """Mean D(x) and D(G(z)): both drift to ½ when neither network wins."""
    return {"d_real": torch.sigmoid(real_logits).mean(), "d_fake": torch.sigmoid(fake_logits).mean()}


def variants(cfg: Config) -> dict[str, Variant]:
    return generative.single_variant("gan", GAN(cfg.model))


def evaluate(ctx: Context) -> dict[str, float]:
    (variant,) = ctx.variants.values()
    return generative.fid_metrics(ctx, variant.model, variant.data)


@torch.no_grad()
def generate(ctx: Context) -> None:
    """Samples, and interpolations between random codes (a GAN has no encoder to place test images)."""
    (variant,) = ctx.variants.values()
    model, steps = variant.model, ctx.cfg.generate.steps
    generative.generate_samples(ctx, model, "gan")
    ends = torch.randn(2, 8, model.latent, generator=torch.Generator().manual_seed(ctx.seed + 1)).to(ctx.device)
    images = model.images(generative.interpolate(ends[0], ends[1], steps))  # [8·steps, 1, 28, 28]
    generative.save_grid(ctx.out / "interpolation.png", images, steps, "gan: decoded along lines between random codes")
