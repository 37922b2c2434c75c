"""`perceptron`: lecture 1 from a single neuron to deep nets, built from the hand-written `Dense` layer.

Variants: `single`, one sigmoid neuron ŷ = g(w₀ + Σ xᵢwᵢ) on linearly separable points; and
`deep_<g>`, the same deep net with activation g on the non-linear moons, to show that linear
activations produce linear decisions no matter the network size.
"""

from __future__ import annotations

from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from deepzoo.config import Section, TrainConfig, Width
from deepzoo.data import toy2d
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, Trainable
from deepzoo.layers import Dense
from deepzoo.storage import save_figure

EXPERIMENT = "toy2d"
Name = Literal["linear", "relu", "tanh", "sigmoid"]


class ModelConfig(Section):
    hidden: list[Width] = Field(min_length=1)  # the deep variants' layers
    activations: list[Name] = Field(min_length=1)


class EvaluateConfig(Section):
    grid: int = Field(ge=10)  # resolution of the decision-boundary figures


class Config(Section):
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig


class Perceptron(Trainable):
    """Dense layers with activation g, then one output neuron; its logit z gives ŷ = sigmoid(z)."""

    def __init__(self, hidden: list[int], activation: str):
        super().__init__()
        sizes = [2, *hidden]
        self.hidden = nn.Sequential(*(Dense(i, o, activation) for i, o in zip(sizes, sizes[1:], strict=False)))
        self.output = Dense(sizes[-1], 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.hidden(x)).squeeze(-1)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        points, labels = batch
        logits = self(points)
        accuracy = ((logits > 0).float() == labels).float().mean()
        return F.binary_cross_entropy_with_logits(logits, labels), {"accuracy": accuracy}


def variants(cfg: Config) -> dict[str, Variant]:
    separable, moons = toy2d.load("separable"), toy2d.load("moons")
    single = {"single": Variant(Perceptron([], "linear"), separable)}  # no hidden layer: output neuron only
    deep = {f"deep_{g}": Variant(Perceptron(cfg.model.hidden, g), moons) for g in cfg.model.activations}
    return single | deep


def evaluate(ctx: Context) -> dict[str, float]:
    metrics = {}
    for name, variant in ctx.variants.items():
        points, labels = variant.data["test"]
        logits = variant.model(points.to(ctx.device))
        accuracy = ((logits > 0).float().cpu() == labels).float().mean().item()
        metrics[f"test_accuracy_{name}"] = round(accuracy, 4)
        save_figure(ctx.out / f"decision_boundary_{name}.png",
                    boundary_figure(variant.model, points, labels, ctx.cfg.evaluate.grid, f"{name}: {accuracy:.3f}"))
    return metrics


def boundary_figure(model: Perceptron, points: Tensor, labels: Tensor, grid: int, title: str) -> plt.Figure:
    low, high = points.min(0).values - 0.5, points.max(0).values + 0.5
    xs, ys = (torch.linspace(low[i].item(), high[i].item(), grid) for i in range(2))
    mesh = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # [grid², 2]
    device = next(model.parameters()).device
    probability = torch.sigmoid(model(mesh.to(device))).cpu().reshape(grid, grid)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.contourf(xs, ys, probability, levels=20, cmap="RdBu_r", alpha=0.6)
    ax.contour(xs, ys, probability, levels=[0.5], colors="k")
    ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="RdBu_r", s=6, edgecolors="none")
    ax.set_title(title)
    return fig
