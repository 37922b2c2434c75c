import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepzoo.config import TrainConfig
from deepzoo.engine import device, trainer
from deepzoo.engine.trainer import Averager, Trainable, TrainingDiverged, fit
from deepzoo.storage import atomic_path, save_torch

CPU = torch.device("cpu")


class Regression(Trainable):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        return self.linear(x).squeeze(-1)

    def loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y), {}


def regression_data(n=256, seed=0, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + noise * torch.randn(n, generator=g)


def train(cfg, train_data=None, val_data=None, seed=0, model=None):
    torch.manual_seed(seed)
    model = model or Regression()
    result = fit(model, train_data or regression_data(), val_data, cfg, CPU, torch.Generator().manual_seed(seed))
    return model, result


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 0.05), ("adamw", 0.05), ("adadelta", 20.0),
                                           ("adagrad", 0.3), ("rmsprop", 0.01)])
def test_every_optimizer_by_name_learns(optimizer, lr):
    cfg = TrainConfig(epochs=15, batch_size=32, optimizer=optimizer, lr=lr, patience=None, schedule="none")
    _, result = train(cfg, val_data=regression_data(64, seed=1))
    first, last = result.history[0]["val/loss"], result.history[-1]["val/loss"]
    assert last < 0.2 * first, (optimizer, first, last)


def test_same_seed_gives_identical_weights_and_different_seed_does_not():
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, patience=None, optimizer="adam", schedule="none")
    a, _ = train(cfg, seed=0)
    b, _ = train(cfg, seed=0)
    c, _ = train(cfg, seed=1)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert not torch.equal(a.linear.weight, c.linear.weight)


def test_early_stopping_stops_and_restores_the_best_epoch():
    # Validation targets from a different function: after the first epochs, fitting the training data
    # makes validation loss worse, so training must stop `patience` epochs after the best epoch.
    x_val, _ = regression_data(64, seed=1)
    val = (x_val, -(x_val @ torch.tensor([1.0, -2.0, 0.5])))
    cfg = TrainConfig(epochs=50, batch_size=32, optimizer="sgd", lr=0.01, patience=2, schedule="none")
    model, result = train(cfg, val_data=val)
    assert result.epochs_run == result.best_epoch + 2 < 50
    best = min(row["val/loss"] for row in result.history)
    assert result.history[result.best_epoch - 1]["val/loss"] == best
    restored = F.mse_loss(model(val[0]), val[1]).item()
    assert restored == pytest.approx(best, rel=1e-5)


def test_plateau_schedule_lowers_the_learning_rate():
    x_val, _ = regression_data(64, seed=1)
    val = (x_val, -(x_val @ torch.tensor([1.0, -2.0, 0.5])))
    cfg = TrainConfig(epochs=6, batch_size=32, optimizer="sgd", lr=0.01, schedule="plateau", patience=None)
    _, result = train(cfg, val_data=val)
    assert result.history[0]["lr"] == 0.01 and result.history[-1]["lr"] < 0.01


def test_onecycle_warms_up_per_step_then_anneals_and_resumes_on_the_same_curve():
    cfg = TrainConfig(epochs=4, batch_size=32, optimizer="adam", lr=0.1, schedule="onecycle", warmup=0.25,
                      patience=None)  # 256 samples: 8 steps an epoch, the peak after 8 of 32 steps
    _, result = train(cfg)
    lrs = [row["lr"] for row in result.history]
    assert lrs[0] == pytest.approx(0.1, rel=0.01) and lrs[0] > lrs[1] > lrs[2] > lrs[3] > 0
    checkpoints = []
    fit(Regression(), regression_data(), None, cfg.model_copy(update={"epochs": 4}), CPU,
        torch.Generator().manual_seed(0), on_checkpoint=lambda state: checkpoints.append(copy.deepcopy(state)))
    resumed = fit(Regression(), regression_data(), None, cfg, CPU, torch.Generator(), resume=checkpoints[1])
    assert [row["lr"] for row in resumed.history] == lrs


def test_redraw_gives_every_epoch_after_the_first_new_data_and_resumes_drawing_the_same():
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=0.05, schedule="none", patience=None)
    drawn = []

    def redraw(generator):
        x, y = regression_data(seed=int(torch.randint(1000, (), generator=generator)))
        drawn.append(x)
        return x, y

    runs = {}
    for name in ("redrawn", "fixed"):
        torch.manual_seed(0)
        runs[name] = Regression()
        fit(runs[name], regression_data(), None, cfg, CPU, torch.Generator().manual_seed(0),
            redraw=redraw if name == "redrawn" else None)
    assert len(drawn) == 2 and not torch.equal(drawn[0], drawn[1])  # epochs 2 and 3, each its own draw
    assert not torch.equal(runs["redrawn"].linear.weight, runs["fixed"].linear.weight)

    checkpoints, drawn[:] = [], []
    torch.manual_seed(0)
    fit(Regression(), regression_data(), None, cfg, CPU, torch.Generator().manual_seed(0),
        on_checkpoint=lambda state: checkpoints.append(copy.deepcopy(state)), redraw=redraw)
    uninterrupted = list(drawn)
    resumed, drawn[:] = Regression(), []
    fit(resumed, regression_data(), None, cfg, CPU, torch.Generator(), resume=checkpoints[0], redraw=redraw)
    assert len(drawn) == 2 and all(torch.equal(a, b) for a, b in zip(drawn, uninterrupted, strict=True))
    assert torch.equal(resumed.linear.weight, runs["redrawn"].linear.weight)


def test_weight_average_is_what_evaluation_sees_what_training_returns_and_what_resumes():
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="sgd", lr=0.05, schedule="none", patience=None, ema=0.9,
                      mixed_precision=False)  # compared with float32 steps by hand below
    val = regression_data(64, seed=1)
    model, result = train(cfg, val_data=val)
    plain, _ = train(cfg.model_copy(update={"ema": None}), val_data=val)
    # the same steps (same seed): the returned weights are their average, not the last step's
    assert not torch.equal(model.linear.weight, plain.linear.weight)
    assert F.mse_loss(model(val[0]), val[1]).item() == pytest.approx(result.history[-1]["val/loss"], rel=1e-5)

    # the average by hand: w_t = w_{t-1} + (1 - d_t)(θ_t - w_{t-1}), d_t = min(0.9, (1 + t) / (10 + t)), w_0 = θ_0
    torch.manual_seed(0)
    by_hand = Regression()
    average = copy.deepcopy(by_hand.linear.weight.detach())
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.05, momentum=0.9)
    generator, step = torch.Generator().manual_seed(0), 0
    for _ in range(3):
        order = torch.randperm(256, generator=generator)
        x, y = regression_data()
        for start in range(0, 256, 32):
            index = order[start : start + 32]
            optimizer.zero_grad()
            by_hand.loss((x[index], y[index]))[0].backward()
            optimizer.step()
            step += 1
            average += (1 - min(0.9, (1 + step) / (10 + step))) * (by_hand.linear.weight.detach() - average)
    assert torch.allclose(model.linear.weight, average, atol=1e-6)

    checkpoints = []
    torch.manual_seed(0)
    fit(Regression(), regression_data(), val, cfg, CPU, torch.Generator().manual_seed(0),
        on_checkpoint=lambda state: checkpoints.append(copy.deepcopy(state)))
    resumed = Regression()
    fit(resumed, regression_data(), val, cfg, CPU, torch.Generator(), resume=checkpoints[0])
    assert torch.equal(resumed.linear.weight, model.linear.weight)


class Threshold(Trainable):
    """Classifies x > 0; its accuracy is the share of the batch it gets right."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 2)

    def loss(self, batch):
        x, y = batch
        logits = self.linear(x)
        return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean()}


def test_target_accuracy_measures_the_test_split_each_epoch_and_times_its_first_crossing():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1, generator=g)
    data, test = (x, (x[:, 0] > 0).long()), (-x, (x[:, 0] < 0).long())
    cfg = TrainConfig(epochs=6, batch_size=64, optimizer="sgd", lr=0.05, schedule="none", patience=None,
                      target_accuracy=0.95)
    result = fit(Threshold(), data, None, cfg, CPU, torch.Generator().manual_seed(0), test=test)
    accuracies = [row["monitor/accuracy"] for row in result.history]
    first = next(i for i, a in enumerate(accuracies) if a >= 0.95)
    assert result.seconds_to_target == pytest.approx(sum(r["epoch_seconds"] for r in result.history[: first + 1]),
                                                     abs=0.01)
    assert result.train_seconds == pytest.approx(sum(r["epoch_seconds"] for r in result.history), rel=0.2)
    never = fit(Threshold(), data, None, cfg.model_copy(update={"target_accuracy": 1.0, "epochs": 1}), CPU,
                torch.Generator().manual_seed(0), test=(x[:8], torch.zeros(8, dtype=torch.long)))
    assert never.seconds_to_target is None
    untimed = fit(Threshold(), data, None, cfg.model_copy(update={"target_accuracy": None}), CPU,
                  torch.Generator().manual_seed(0), test=test)
    assert untimed.seconds_to_target is None and "monitor/accuracy" not in untimed.history[0]


def test_diverging_loss_raises_a_clear_error():
    cfg = TrainConfig(epochs=5, batch_size=32, optimizer="sgd", lr=10.0, momentum=0.0, patience=None, schedule="none")
    with pytest.raises(TrainingDiverged, match=r"loss became NaN or infinite by epoch \d, batch \d+.*"
                                               r"Lower the learning rate \(train.lr = 10, try 1\)"):
        train(cfg, regression_data(n=2048, noise=1.0))  # 64 batches: the loss overflows within epoch 1


def test_a_loss_that_grows_a_hundredfold_fails_like_a_nan_even_while_finite():
    """SGD with lr · E[x²] > 1 on a quadratic loss multiplies the error each step: finite, but diverging."""
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="sgd", lr=1.5, momentum=0.0, patience=None, schedule="none")
    with pytest.raises(TrainingDiverged, match=r"loss grew from [\d.]+ \(first batch\) to [\d.e+]+ \(epoch 1 mean\): "
                                               r"training diverged\. Lower the learning rate \(train.lr = 1.5"):
        train(cfg)
    _, result = train(cfg.model_copy(update={"lr": 0.05}))  # a sane step size trains as before
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]


class Guesser(Trainable):
    """A classifier that cannot use its input: the best it can do is the class prior, i.e. chance."""

    chance_accuracy = 0.25

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(4))

    def loss(self, batch):
        _, labels = batch
        logits = self.logits.expand(len(labels), 4)
        return F.cross_entropy(logits, labels), {"accuracy": (logits.argmax(-1) == labels).float().mean()}


def test_a_classifier_that_ends_at_chance_accuracy_fails():
    data = (torch.zeros(400, 1), torch.arange(400) % 4)  # balanced: guessing scores 0.25
    cfg = TrainConfig(epochs=2, batch_size=50, optimizer="sgd", lr=0.1, patience=None, schedule="none")
    with pytest.raises(TrainingDiverged, match=r"validation accuracy never beat chance \(0.2500, chance 0.25\) in 2"):
        train(cfg, data, data, model=Guesser())


def test_gradient_clipping_bounds_the_norm_and_is_recorded(monkeypatch):
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=1e-3, clip_grad_norm=0.5, patience=None,
                      schedule="none")
    model = Regression()
    with torch.no_grad():
        model.linear.weight.fill_(50.0)  # huge gradients
    norms = []
    original = nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        total = original(params, max_norm)
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
        return total

    monkeypatch.setattr(nn.utils, "clip_grad_norm_", spy)
    _, result = train(cfg, model=model)
    assert norms and max(norms) <= 0.5 + 1e-5
    assert result.history[0]["train/grad_norm_max"] > 0.5  # the norm before clipping is what gets logged


class TwoPlayers(Trainable):
    """Two optimizer groups stepped in order: the second loss sees the first group's update."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(1, 1), nn.Linear(1, 1)
        self.seen = []

    def optimizer_groups(self):
        return {"a": list(self.a.parameters()), "b": list(self.b.parameters())}

    def training_losses(self, batch):
        (x,) = batch
        yield "a", self.a(x).pow(2).mean(), {}
        self.seen.append(self.a.weight.item())
        yield "b", (self.b(x) - self.a(x).detach()).pow(2).mean(), {}

    def loss(self, batch):
        (x,) = batch
        return self.a(x).pow(2).mean(), {}


def test_multi_optimizer_steps_run_in_order_through_the_one_loop():
    model = TwoPlayers()
    before_a, before_b = model.a.weight.item(), model.b.weight.item()
    cfg = TrainConfig(epochs=1, batch_size=8, optimizer="sgd", lr=0.1, patience=None, schedule="none")
    _, result = train(cfg, train_data=(torch.randn(8, 1),), model=model)
    assert model.seen[0] != before_a  # "b" was computed after "a" stepped
    assert model.b.weight.item() != before_b
    assert {"train/a_loss", "train/b_loss"} <= set(result.history[0])


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path: Path):
    path = tmp_path / "model.pt"
    save_torch(path, {"version": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_torch(path, {"version": 2, "bad": Unpicklable()})
    assert torch.load(path) == {"version": 1}
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # no temporary left behind


def test_atomic_folder_is_replaced_whole_or_not_at_all(tmp_path: Path):
    folder = tmp_path / "out"
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("first")
    with pytest.raises(ValueError), atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("half")
        raise ValueError("stage failed")
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt"]


def test_the_averager_weighs_batches_by_size_and_remembers_a_loss_that_was_ever_nan():
    averager = Averager()
    batches = [(2.0, 0.5, 64), (4.0, 1.0, 64), (1.0, 0.0, 16)]  # (loss, accuracy, batch size): a short last batch
    for loss, accuracy, n in batches:
        averager.add({"loss": torch.tensor(loss), "accuracy": torch.tensor(accuracy)}, n)
    expected = sum(loss * n for loss, _, n in batches) / 144
    assert averager.means() == pytest.approx({"loss": expected, "accuracy": 96 / 144})
    assert averager.first() == {"loss": 2.0, "accuracy": 0.5} and averager.nonfinite_loss() is None
    averager.add({"loss": torch.tensor(float("nan")), "accuracy": torch.tensor(float("nan"))}, 8)
    averager.add({"loss": torch.tensor(1.0), "accuracy": torch.tensor(1.0)}, 8)
    assert averager.nonfinite_loss() == "loss"  # a metric that is not a loss never stops training
    assert Averager().means() == {} and Averager().first() == {} and Averager().nonfinite_loss() is None


class DtypeRecorder(Regression):
    """Notes the dtype its layer computed in, for training steps and for evaluations apart."""

    def __init__(self):
        super().__init__()
        self.dtypes = {"training": set(), "evaluation": set()}

    def loss(self, batch):
        x, y = batch
        out = self(x)
        self.dtypes["training" if self.training else "evaluation"].add(out.dtype)
        return F.mse_loss(out.float(), y), {}


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("mixed_precision", [True, False])
def test_training_steps_run_in_bf16_only_when_asked_and_native_and_evaluations_never(monkeypatch, native,
                                                                                       mixed_precision):
    monkeypatch.setattr(device, "bf16_autocast", lambda device_type: native)  # the one place both ask
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.01, patience=None, optimizer="adam", schedule="none",
                      mixed_precision=mixed_precision)
    model = DtypeRecorder()
    fit(model, regression_data(), regression_data(64, seed=1), cfg, CPU, torch.Generator().manual_seed(0))
    bf16 = native and mixed_precision
    assert model.dtypes == {"training": {torch.bfloat16 if bf16 else torch.float32}, "evaluation": {torch.float32}}
    assert device.precision(CPU, mixed_precision) == ("bf16 autocast" if bf16 else "float32")  # the run's tag
