"""Device choice from the environment, never from params: switching CPU/GPU must not rerun a DVC stage."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deepzoo.storage import repository_root

ENV = "DEEPZOO_DEVICE"


def resolve(name: str | None = None) -> torch.device:
    """`DEEPZOO_DEVICE` = auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps."""
    name = (name or os.environ.get(ENV) or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{ENV}={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{ENV}={name} but this PyTorch build sees no CUDA GPU; use {ENV}=cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{ENV}={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def configure_threads() -> None:
    """One intra-op thread per core, shared among the ranks torchrun started on this machine.

    Queued `dvc exp` workers run side by side, and processes whose thread pools together exceed the
    cores slow each other down ~10× (spinning OpenMP threads): there each stage takes one thread.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if repository_root() != Path.cwd():
        sharing = cores
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", max(cores // sharing, 1))))


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
