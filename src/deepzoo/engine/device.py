"""Device choice from the environment, never from params: switching CPU/GPU must not rerun a DVC stage."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
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


@functools.cache
def bf16_autocast(device_type: str) -> bool:
    """Whether training steps on this kind of device run under bf16 autocast (`train.mixed_precision`): on CUDA
    GPUs that support bf16, and on CPUs with bf16 instructions (AVX512-BF16 or AMX), where oneDNN's convolutions,
    matmuls and LSTMs ran 1.15-1.46× faster on 2 cores at the same accuracy. Other CPUs would emulate bf16, slower
    than float32."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def uses_bf16(device: torch.device, mixed_precision: bool) -> bool:
    """Whether training steps with `train.mixed_precision` run under bf16 autocast on `device`: the one rule."""
    return mixed_precision and bf16_autocast(device.type)


def precision(device: torch.device, mixed_precision: bool) -> str:
    """What a training's steps compute in, for its MLflow run: the same params give bf16 on one machine and
    float32 on another."""
    return "bf16 autocast" if uses_bf16(device, mixed_precision) else "float32"


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_KEPT = 256 << 20  # bytes of free heap kept for the next step's tensors rather than returned to the system
MAPPED_FROM = 32 << 20  # bytes: larger tensors get their own mapping, returned to the system when freed


def configure_cpu() -> None:
    """Threads and memory allocator of a process that trains or evaluates on this machine's CPU.

    One intra-op thread per core, shared among the ranks torchrun started on this machine. Queued `dvc exp`
    workers run side by side, and processes whose thread pools together exceed the cores slow each other down
    ~10× (spinning OpenMP threads): there each stage takes one thread.

    glibc's malloc moves its thresholds as tensors come and go, and ends up returning the top of the heap to the
    system after every step, only to fault the same pages back in at the next one: `embed_images`' epochs took
    21 s instead of 15 s. Fixed thresholds keep up to HEAP_KEPT of free heap instead.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if repository_root() != Path.cwd():
        sharing = cores
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", max(cores // sharing, 1))))
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MAPPED_FROM)
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_KEPT)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
