"""Multi-process data-parallel training on PyTorch's own engine: `torchrun` + `torch.distributed`.

`torchrun --nproc-per-node N -m deepzoo train FAMILY` (or `train.processes: N` in params) starts N ranks.
Each rank trains on its shard of every epoch with batch_size / N, gradients are averaged across ranks
after each backward pass (so the effective batch size stays `batch_size`), epoch metrics are averaged
too, so every rank takes the same early-stopping decision, and only rank 0 logs and writes outputs.

Gradients are averaged with one all-reduce per optimizer group rather than through the
`DistributedDataParallel` wrapper: DDP synchronises only what runs through the wrapper's `forward`,
while deepzoo's steps call `loss()` and, for the GAN, step two optimizers on one batch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def print_once(message: str) -> None:
    """Print on rank 0 only, so N ranks do not repeat every line."""
    if is_main():
        print(message, flush=True)


def init(device: torch.device) -> None:
    """Join the process group when launched by torchrun (it sets WORLD_SIZE); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def local_device(device: torch.device) -> torch.device:
    """With several ranks on one machine, rank k uses GPU k."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def relaunch(processes: int, argv: list[str]) -> int:
    """Run `deepzoo ARGV` under torchrun with `processes` ranks; returns torchrun's exit code."""
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    command = [*torchrun.split(), "--standalone", f"--nproc-per-node={processes}", "-m", "deepzoo", *argv]
    return subprocess.run(command).returncode


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce instead of one per tensor
    dist.all_reduce(flat)
    flat /= world_size()
    for grad, chunk in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(chunk.view_as(grad))


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor
