"""The one trainer: mini-batches sliced from in-memory tensors, any optimizer by name, early stopping.

It knows nothing about families. A model it trains is a `Trainable`: `loss(batch)` returns the loss of
a batch and named metrics, and `training_losses(batch)` yields one loss per optimizer group, so a GAN's
discriminator-then-generator step runs through the same loop as a classifier's single step.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from deepzoo import DeepzooError
from deepzoo.config import TrainConfig
from deepzoo.engine import distributed
from deepzoo.engine.device import uses_bf16

Batch = tuple[Tensor, ...]
Metrics = dict[str, Tensor]
NAN_CHECK_EVERY = 50  # batches; checking every batch would force a GPU sync per step
GROWTH_LIMIT = 100  # an epoch's mean loss at this many times the first batch's: diverged, even while finite


class TrainingDiverged(DeepzooError):
    """The loss became NaN or infinite, grew far past where it started, or a classifier learned nothing."""


class Trainable(nn.Module):
    """The contract between a model and the trainer."""

    def prepare(self, batch: Batch) -> Batch:
        """Turn stored tensors (e.g. uint8 images) into model inputs, on the model's device."""
        return batch

    def loss(self, batch: Batch) -> tuple[Tensor, Metrics]:
        raise NotImplementedError

    def example_input(self, data: Batch) -> Tensor:
        """One input for `forward`, from stored data: the logged model's signature and example."""
        return self.prepare(tuple(t[:1] for t in data))[0]

    chance_accuracy: float | None = None  # a classifier's accuracy by guessing: training that ends there failed

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimizer; models with several optimizers (GAN) override this."""
        return {"model": list(self.parameters())}

    def training_losses(self, batch: Batch) -> Iterator[tuple[str, Tensor, Metrics]]:
        """Yield (group, loss, metrics); the trainer steps that group's optimizer before resuming."""
        loss, metrics = self.loss(batch)
        yield "model", loss, metrics


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    epochs_run: int = 0
    train_seconds: float = 0.0
    samples_per_second: float = 0.0
    seconds_to_target: float | None = None  # until test accuracy first reached `target_accuracy`, when measured


def make_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    match cfg.optimizer:
        case "sgd":
            return torch.optim.SGD(params, momentum=cfg.momentum, **common)
        case "adam":
            return torch.optim.Adam(params, betas=cfg.betas, **common)
        case "adamw":
            return torch.optim.AdamW(params, betas=cfg.betas, **common)
        case "adadelta":
            return torch.optim.Adadelta(params, **common)
        case "adagrad":
            return torch.optim.Adagrad(params, **common)
        case "rmsprop":
            return torch.optim.RMSprop(params, momentum=cfg.momentum, **common)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    match cfg.schedule:
        case "plateau":
            return ReduceLROnPlateau(optimizer, factor=0.1, patience=1)
        case "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
        case "onecycle":  # warm-up lets a large batch take a large learning rate (Smith & Topin 2017; Goyal et al. 2017)
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                       pct_start=cfg.warmup, cycle_momentum=False)
    return None


def has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in model.modules())


def rank_batch_size(cfg: TrainConfig) -> int:
    """Each data-parallel rank's share of a batch: together they make one batch of `cfg.batch_size`."""
    return max(cfg.batch_size // distributed.world_size(), 1)


def steps_per_epoch(n: int, cfg: TrainConfig) -> int:
    """Optimizer steps in an epoch of `n` samples (on each rank: its shard of them)."""
    shard = math.ceil(n / distributed.world_size())
    return min(math.ceil(shard / rank_batch_size(cfg)), cfg.max_batches or math.inf)


def batches(tensors: Batch, batch_size: int, generator: torch.Generator | None = None,
            max_batches: int | None = None, shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
    """Slices of in-memory tensors, in a fresh random order per call when a generator is given.

    With `shard=(rank, world)`, rank r takes every world-th item of the (shared) order, so the
    ranks' batches k together form batch k of a single process with `world` times the batch size.
    """
    n = len(tensors[0])
    rank, world = shard
    if generator is None and world == 1:  # plain slices: views, no copy
        for start in range(0, n, batch_size)[:max_batches]:
            yield tuple(t[start : start + batch_size] for t in tensors)
        return
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order[rank::world].to(tensors[0].device)  # index on the data's device: no sync per batch
    for start in range(0, len(order), batch_size)[:max_batches]:
        index = order[start : start + batch_size]
        yield tuple(t[index] for t in tensors)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device, non_blocking=True) for t in batch)


def resident(data: Batch, device: torch.device) -> Batch:
    """The whole dataset on the GPU, once (Fashion-MNIST as uint8 is 47 MB): batches are then sliced
    there, with no host-to-device copy per step, which beats pinned memory and non-blocking copies."""
    return tuple(t.to(device) for t in data)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast where the device computes it natively (`device.uses_bf16`); a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, enabled))


class Averager:
    """Sample-weighted means of per-batch metrics, summed as they come into one tensor on the device: no GPU sync
    and one small kernel per step, the means are taken when the epoch is read.

    A sum rather than a list of every batch's metrics: hundreds of small tensors kept alive between each step's
    freed activations pin the C heap around them, which can then be neither reused nor returned. On the CPU that
    grew `embed_images` by ~1 GB per epoch (mallinfo2: 180 MB in use, the rest free heap) until the list was freed.
    """

    def __init__(self) -> None:
        self.keys: tuple[str, ...] = ()
        self.total: Tensor | None = None  # [metrics]: Σ batch size × batch mean
        self.count = 0
        self.first_row: Tensor | None = None

    def add(self, metrics: Metrics, n: int) -> None:
        row = torch.stack([value.detach().float() for value in metrics.values()])
        if self.total is None:
            self.keys, self.first_row, self.total = tuple(metrics), row, row * n
        else:
            self.total.add_(row, alpha=n)
        self.count += n

    def nonfinite_loss(self) -> str | None:
        """The first loss that was NaN or infinite in some batch so far, if any: the sum keeps it so."""
        if self.total is None:
            return None
        finite = torch.isfinite(self.total).tolist()
        return next((k for k, ok in zip(self.keys, finite, strict=True) if k.endswith("loss") and not ok), None)

    def first(self) -> dict[str, float]:
        """The first batch's metrics: before any update, where the losses start."""
        return dict(zip(self.keys, self.first_row.tolist(), strict=True)) if self.first_row is not None else {}

    def means(self) -> dict[str, float]:
        """Means over all ranks: every rank sees the same numbers, so takes the same decisions."""
        if self.total is None:
            return {}
        sums = distributed.all_sum(torch.cat([self.total, self.total.new_tensor([self.count])]))
        return {key: (total / sums[-1]).item() for key, total in zip(self.keys, sums, strict=False)}


@torch.no_grad()
def evaluate(model: Trainable, data: Batch, batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean loss and metrics of `model` over `data`, in eval mode and float32: every measurement is of the
    weights themselves, whatever precision trained them."""
    model.eval()
    averager = Averager()
    for batch in batches(data, batch_size, shard=(distributed.rank(), distributed.world_size())):
        loss, metrics = model.loss(model.prepare(to_device(batch, device)))
        averager.add({"loss": loss, **metrics}, len(batch[0]))
    return averager.means()


class WeightAverage:
    """An exponential moving average of a model's weights and batch-norm statistics (Polyak averaging, as in
    timm's ModelEmaV2): a smoother model than any single step's, for the price of one copy of the weights.

    Its decay warms up as (1 + t) / (10 + t) over the first steps t, so that early averages do not hold on to the
    random initial weights. Build it after the model has its final device and memory format: it pairs up tensors.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.steps = decay, 0
        self.model = copy.deepcopy(model).requires_grad_(False)
        self._pairs = list(zip(self.model.state_dict().values(), model.state_dict().values(), strict=True))

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        weight = 1 - min(self.decay, (1 + self.steps) / (10 + self.steps))
        for averaged, current in self._pairs:
            if averaged.is_floating_point():
                averaged.lerp_(current, weight)
            else:  # batch norm's step counter
                averaged.copy_(current)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.steps = saved["steps"]


class EarlyStopping:
    """Stop when validation loss has not improved by `min_delta` for `patience` epochs; keep the best weights."""

    def __init__(self, patience: int | None, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_epoch, self.stalled = math.inf, 0, 0
        self.best_state: dict[str, Tensor] | None = None

    def should_stop(self, epoch: int, loss: float | None, model: nn.Module) -> bool:
        if loss is None or self.patience is None:
            return False
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.stalled = loss, epoch, 0
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            return False
        self.stalled += 1
        return self.stalled >= self.patience


def fit(model: Trainable, train: Batch, val: Batch | None, cfg: TrainConfig, device: torch.device,
        generator: torch.Generator, on_epoch: Callable[[int, dict[str, float]], None] = lambda *_: None,
        resume: dict[str, Any] | None = None,
        on_checkpoint: Callable[[dict[str, Any]], None] | None = None, test: Batch | None = None,
        redraw: Callable[[torch.Generator], Batch] | None = None) -> FitResult:
    """Train `model` in place; on return it holds the weights of the best validation epoch (with `cfg.ema`, of the
    weight average: every evaluation here measures the average).

    With `cfg.target_accuracy` set, the `test` split is measured after every epoch (`monitor/*` in the history:
    not `test/*`, the final evaluation's names)
    and `seconds_to_target` is the training time, those measurements excluded, until it first reaches it.

    After every epoch `on_checkpoint` gets the whole training state (`TrainingState`'s dict: weights,
    optimizers, schedules, early stopping, random generators, history); `resume` takes such a state and goes
    on from the epoch after it, as if training had never stopped.

    With `redraw`, every epoch after the first trains on `redraw(generator)` instead of `train`: a new draw of as
    many examples, from the training's own generator, so that a resumed training draws what it would have.
    """
    model.to(device)
    if device.type == "cuda":
        train = resident(train, device)
        val = resident(val, device) if val is not None else None
    if has_convolutions(model):
        # The layout tensor cores and oneDNN's CPU kernels want: 1.05–1.4× faster training on 2 CPU cores.
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile()
    groups = model.optimizer_groups()
    optimizers = {name: make_optimizer(params, cfg) for name, params in groups.items()}
    schedules = [s for s in (make_schedule(opt, cfg, steps_per_epoch(len(train[0]), cfg)) for opt in optimizers.values())
                 if s is not None]
    per_step = [s for s in schedules if isinstance(s, torch.optim.lr_scheduler.OneCycleLR)]
    average = WeightAverage(model, cfg.ema) if cfg.ema is not None else None
    evaluated = average.model if average is not None else model  # what every evaluation and early stopping see
    stopper, result = EarlyStopping(cfg.patience, cfg.min_delta), FitResult()
    state = TrainingState(model, optimizers, schedules, stopper, result, generator, average)
    first_epoch, earlier_seconds, first_losses, done = 1, 0.0, {}, False
    if resume is not None:
        first_epoch, earlier_seconds, first_losses, done = state.load(resume)
        distributed.print_once(f"resuming after epoch {first_epoch - 1} of {cfg.epochs}")
    start, monitoring = time.perf_counter(), 0.0
    for epoch in range(first_epoch, cfg.epochs + 1):
        if done:
            break
        epoch_start = time.perf_counter()
        if redraw is not None and epoch > 1:
            train = redraw(generator)
            train = resident(train, device) if device.type == "cuda" else train
        row, first = _train_epoch(model, groups, optimizers, per_step, average, train, cfg, device, generator, epoch)
        first_losses = first_losses or {k: v for k, v in first.items() if k.endswith("loss")}
        _check_growth(row, first_losses, epoch, cfg)
        if val is not None:
            row |= {f"val/{k}": v for k, v in evaluate(evaluated, val, cfg.batch_size, device).items()}
        row["lr"] = next(iter(optimizers.values())).param_groups[0]["lr"]
        row["epoch_seconds"] = time.perf_counter() - epoch_start
        if cfg.target_accuracy is not None and test is not None:
            row |= {f"monitor/{k}": v for k, v in evaluate(evaluated, test, cfg.batch_size, device).items()}
            monitoring += time.perf_counter() - epoch_start - row["epoch_seconds"]
        result.history.append(row)
        result.epochs_run = epoch
        monitored = row.get("val/loss", row.get("train/loss"))
        for schedule in schedules:
            if isinstance(schedule, ReduceLROnPlateau):
                schedule.step(monitored)
            elif schedule not in per_step:
                schedule.step()
        done = stopper.should_stop(epoch, row.get("val/loss"), evaluated)
        if on_checkpoint is not None:  # first: an epoch that was reported is an epoch that resumes
            on_checkpoint(state.save(epoch, earlier_seconds + time.perf_counter() - start - monitoring, first_losses, done))
        on_epoch(epoch, row)
        distributed.print_once(f"epoch {epoch}/{cfg.epochs} " + " ".join(f"{k}={v:.4g}" for k, v in row.items()))
        if done:
            distributed.print_once(f"early stopping: val/loss has not improved for {stopper.stalled} epochs "
                 f"(best {stopper.best_loss:.4g} at epoch {stopper.best_epoch})")
    _check_learned(model, result.history, first_losses, cfg)
    if average is not None:
        model.load_state_dict(average.model.state_dict())
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    result.best_epoch = stopper.best_epoch or result.epochs_run
    result.train_seconds = earlier_seconds + time.perf_counter() - start - monitoring
    if cfg.target_accuracy is not None:
        result.seconds_to_target = seconds_to_reach(result.history, "monitor/accuracy", cfg.target_accuracy)
    samples = min(len(train[0]), cfg.batch_size * (cfg.max_batches or len(train[0]))) * result.epochs_run
    result.samples_per_second = samples / max(result.train_seconds, 1e-9)
    return result


def seconds_to_reach(history: list[dict[str, float]], key: str, target: float) -> float | None:
    """Training seconds (`epoch_seconds` summed) until the epoch whose `key` first reached `target`."""
    elapsed = 0.0
    for row in history:
        elapsed += row["epoch_seconds"]
        if row.get(key, -math.inf) >= target:
            return round(elapsed, 2)
    return None


@dataclass
class TrainingState:
    """Everything a training's next epoch depends on, to save after an epoch and resume from bit for bit."""

    model: Trainable
    optimizers: dict[str, torch.optim.Optimizer]
    schedules: list[Any]
    stopper: EarlyStopping
    result: FitResult
    generator: torch.Generator
    average: WeightAverage | None = None

    def save(self, epoch: int, seconds: float, first_losses: dict[str, float], done: bool) -> dict[str, Any]:
        return {"epoch": epoch, "seconds": seconds, "first_losses": first_losses, "done": done,
                "model": self.model.state_dict(), "history": self.result.history,
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                "schedules": [schedule.state_dict() for schedule in self.schedules],
                "stopper": {k: getattr(self.stopper, k) for k in ("best_loss", "best_epoch", "stalled", "best_state")},
                "average": self.average.state_dict() if self.average is not None else None,
                "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def load(self, saved: dict[str, Any]) -> tuple[int, float, dict[str, float], bool]:
        """Restore `saved`; returns the next epoch, the seconds trained so far, the first losses and whether done."""
        self.model.load_state_dict(saved["model"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(saved["optimizers"][name])
        for schedule, schedule_state in zip(self.schedules, saved["schedules"], strict=True):
            schedule.load_state_dict(schedule_state)
        for key, value in saved["stopper"].items():
            setattr(self.stopper, key, value)
        if self.average is not None:
            self.average.load_state_dict(saved["average"])
        self.result.history, self.result.epochs_run = list(saved["history"]), saved["epoch"]
        torch.set_rng_state(saved["rng"]["torch"])
        self.generator.set_state(saved["rng"]["generator"])
        if saved["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        return saved["epoch"] + 1, saved["seconds"], saved["first_losses"], saved["done"]


def _train_epoch(model: Trainable, groups: dict[str, list[nn.Parameter]], optimizers: dict[str, torch.optim.Optimizer],
                 per_step: list[Any], average: WeightAverage | None, train: Batch, cfg: TrainConfig, device: torch.device, generator: torch.Generator,
                 epoch: int) -> tuple[dict[str, float], dict[str, float]]:
    model.train()
    steps = batches(train, rank_batch_size(cfg), generator, cfg.max_batches, (distributed.rank(), distributed.world_size()))
    if sys.stderr.isatty() and distributed.is_main():
        from tqdm import tqdm

        steps = tqdm(steps, total=steps_per_epoch(len(train[0]), cfg), desc=f"epoch {epoch}/{cfg.epochs}", leave=False)
    averager, norms, single = Averager(), [], len(groups) == 1
    for step, batch in enumerate(steps, 1):
        batch = model.prepare(to_device(batch, device))
        metrics: Metrics = {}
        for group, loss, group_metrics in _losses(model, batch, device, cfg.mixed_precision):
            optimizers[group].zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(groups[group])
            if cfg.clip_grad_norm is not None:
                norms.append(nn.utils.clip_grad_norm_(groups[group], cfg.clip_grad_norm))
            optimizers[group].step()
            metrics.update({"loss" if single else f"{group}_loss": loss, **group_metrics})
        for schedule in per_step:
            schedule.step()
        if average is not None:
            average.update()
        averager.add(metrics, len(batch[0]))
        if step % NAN_CHECK_EVERY == 0:
            _check_finite(averager, epoch, step, cfg)
    _check_finite(averager, epoch, step, cfg)
    row = {f"train/{k}": v for k, v in averager.means().items()}
    if norms:  # norms before clipping: what shows exploding gradients
        stacked = torch.stack(norms)
        row |= {"train/grad_norm_max": stacked.max().item(), "train/grad_norm_mean": stacked.mean().item()}
    return row, averager.first()


def _losses(model: Trainable, batch: Batch, device: torch.device, mixed_precision: bool):
    steps = model.training_losses(batch)
    while True:
        with autocast(device, mixed_precision):
            item = next(steps, None)
        if item is None:
            return
        yield item


def _advice(cfg: TrainConfig) -> str:
    return (f"Lower the learning rate (train.lr = {cfg.lr:g}, try {cfg.lr / 10:g})"
            + ("" if cfg.clip_grad_norm else " or set train.clip_grad_norm (e.g. 1.0)") + ".")


def _check_finite(averager: Averager, epoch: int, step: int, cfg: TrainConfig) -> None:
    bad = averager.nonfinite_loss()
    if bad:
        raise TrainingDiverged(f"{bad} became NaN or infinite by epoch {epoch}, batch {step}: training diverged. "
                               + _advice(cfg))


def _check_growth(row: dict[str, float], first_losses: dict[str, float], epoch: int, cfg: TrainConfig) -> None:
    """A loss that ends an epoch at GROWTH_LIMIT times where its first batch started has diverged, NaN or not."""
    for key, first in first_losses.items():
        mean = row.get(f"train/{key}", 0.0)
        if first > 0 and mean >= GROWTH_LIMIT * first:
            raise TrainingDiverged(f"{key} grew from {first:.4g} (first batch) to {mean:.4g} (epoch {epoch} mean): "
                                   f"training diverged. " + _advice(cfg))


def _check_learned(model: Trainable, history: list[dict[str, float]], first_losses: dict[str, float],
                   cfg: TrainConfig) -> None:
    """A classifier that saw all its training data (no `max_batches` cap) and learned nothing: its best validation
    accuracy no better than guessing, and no epoch's loss below its first batch's (a run that has begun to learn
    may still be at chance accuracy)."""
    best = max((row.get("val/accuracy", math.inf) for row in history), default=math.inf)
    start = first_losses.get("loss", -math.inf)
    stuck = cfg.max_batches is None and all(row.get("train/loss", math.inf) >= start for row in history)
    if model.chance_accuracy is not None and best <= model.chance_accuracy + 0.01 and stuck:
        raise TrainingDiverged(f"validation accuracy never beat chance ({best:.4f}, chance {model.chance_accuracy:g}) "
                               f"in {len(history)} epochs: training failed. " + _advice(cfg))
