"""`betavae`: the `vae` code with the KL weighted by β > 1 (Higgins et al. 2017).

A heavier KL pushes q(z|x) towards the factorised prior: fewer latents stay active and each one that
does tends to capture one factor of variation, which the latent traversals show. The price is blurrier
reconstructions and a worse ELBO (evaluated with β = 1, so that it stays a bound on −log p(x)).
"""

from __future__ import annotations

from pydantic import Field

from deepzoo.engine.stages import Variant
from deepzoo.families import vae
from deepzoo.families.vae import EXPERIMENT, evaluate, generate  # noqa: F401 - the same stages as the VAE


class ModelConfig(vae.ModelConfig):
    beta: float = Field(gt=1)  # β = 1 is the `vae` family


class Config(vae.Config):
    model: ModelConfig


def variants(cfg: Config) -> dict[str, Variant]:
    return vae.variants(cfg, "betavae")
