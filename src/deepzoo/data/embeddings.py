"""`embed_images`: the fixed feature extractor behind every FID in deepzoo, and the real images' statistics.

The lecture CNN (the `cnn` family's architecture) trained on Fashion-MNIST with this section's own recipe and
seed, not the `cnn` family's experiment params: FID stays put while the `cnn` family is experimented on, and
the generative evaluations embed only their generated images. Output `data/processed/embeddings/`:
    extractor.pt2   images [N, 1, 28, 28] in [0, 1] → penultimate features [N, 1024], a `torch.export`
                    program: evaluations load it without the model's code
    reference.pt    {"test_mean" [D], "test_cov" [D, D] (float64) of the first n test images, "floor": FID of
                    the first n training images vs them, "train_features" [n, D] (float32)}
    extractor.json  the extractor's own test accuracy and epochs, n and the floor
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field

from deepzoo.config import Section, TrainConfig
from deepzoo.data import fashion_mnist
from deepzoo.engine import tracking
from deepzoo.engine.device import configure_cpu, precision, resolve, seed_everything
from deepzoo.engine.trainer import Batch, evaluate, fit
from deepzoo.families import cnn
from deepzoo.metrics import fid
from deepzoo.registry import EMBEDDINGS
from deepzoo.storage import atomic_path

OUTPUT = Path(EMBEDDINGS)
EXPERIMENT = "fashion-mnist-generation"  # its MLflow run sits beside the runs whose FID it measures


class Params(Section):
    seed: int  # the extractor's own: vary it to measure how much FID moves with the features alone
    samples: int = Field(ge=10)  # n: test images in the reference, real training images for the floor
    model: cnn.ModelConfig
    train: TrainConfig


def prepare(params: Params, seed: int, output: Path = OUTPUT) -> dict[str, float]:
    configure_cpu()
    device = resolve()
    splits = fashion_mnist.splits()
    generator = seed_everything(seed)
    model = cnn.CNN(params.model)
    with tracking.run(EXPERIMENT, "embed_images", "embed_images", str(device)) as tracker:
        tracker.log_params(params.model_dump())
        tracker.set_tags({"precision": precision(device, params.train.mixed_precision)})
        result = fit(model, splits["train"], splits["val"], params.train, device, generator,
                     lambda epoch, row: tracker.log_metrics(row, epoch))
        accuracy = evaluate(model, splits["test"], 1000, device)["accuracy"]
        summary = write_reference(model, splits, params.samples, output,
                                  {"test_accuracy": round(accuracy, 4), "epochs_run": result.epochs_run},
                                  tracker.run_id)
        tracker.log_metrics({tracking.mlflow_key(k): v for k, v in summary.items()})
    return summary


def write_reference(model: cnn.CNN, splits: dict[str, Batch], samples: int, output: Path = OUTPUT,
                    facts: dict[str, float] | None = None, run_id: str = "unknown") -> dict[str, float]:
    """Export `model`'s features and store the first n test and training images' side of every FID in `output`,
    with `facts` about the extractor and the MLflow run that trained it in `extractor.json`."""
    n = min(samples, len(splits["test"][0]), len(splits["train"][0]))
    with atomic_path(output) as tmp:
        tmp.mkdir()
        extractor = fid.export_extractor(model, tmp / fid.EXTRACTOR)
        test, train = (fid.features(extractor, fashion_mnist.to_unit(splits[s][0][:n])) for s in ("test", "train"))
        test_gaussian = fid.fit_gaussian(test)
        floor = fid.frechet_distance(fid.fit_gaussian(train), test_gaussian)
        torch.save({"test_mean": torch.from_numpy(test_gaussian.mean), "test_cov": torch.from_numpy(test_gaussian.cov),
                    "floor": floor,
                    "train_features": train.float()}, tmp / fid.REFERENCE)
        summary = {**(facts or {}), "samples": n, "fid_real_floor": round(floor, 3)}
        (tmp / fid.FACTS).write_text(json.dumps(summary | {"run_id": run_id}, indent=2) + "\n")
    return summary
