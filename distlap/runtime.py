"""Where and how tensors run: device choice, bf16 autocast on CUDA, seeds, CPU threads, prediction, timing."""

from __future__ import annotations

import contextlib
import os
import random
import time

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast for the backbone on CUDA; fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(num_threads: int | None = None) -> int:
    """Match torch's intra-op threads to this process's CPU reservation.

    Ray sets OMP_NUM_THREADS from a worker's ``num_cpus``; honouring it keeps two trials on two
    cores from oversubscribing each other.
    """
    n = num_threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or available_cpus()
    torch.set_num_threads(n)
    return n


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A network's own predictive: softmax probabilities (N, K) in fp32 and labels (N,), on the CPU.

    The forward pass runs under :func:`autocast` (bf16 on CUDA); the softmax in fp32.
    """
    model.eval().to(device)
    probs, labels = [], []
    for x, y in loader:
        with autocast(device):
            logits = model(x.to(device))  # (B, K)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``: wall-clock seconds of the block."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
