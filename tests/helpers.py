"""Tiny test material shared by the tests: an idx writer, learnable fake Fashion-MNIST images and a 4-block
width-32 ViT. Importable as ``from helpers import ...`` (pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
# MLflow 3's server also starts a job runner, seven huey consumer processes for GenAI jobs that distlap
# never submits: about 20 s of CPU per start on a 2-core machine (6.5 s without). The tests' servers run
# without it, as the cluster head's does (cluster.yaml).
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format (magic 0x0000 08 ndim, big-endian dims), gzipped if .gz."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 images whose brightest row band encodes the class: learnable in a few steps."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28))
    for i, y in enumerate(labels):
        images[i, 2 * y + 4 : 2 * y + 7, :] += 180
    return images.clip(0, 255).astype(np.uint8)


def make_tiny_vit(num_labels: int = 5, layers: int = 4):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def lora_model(method="lora", layers=4):
    """A 3-class tiny ViT with a PEFT method applied and its tuned parameters moved off their init."""
    torch.manual_seed(0)
    from distlap.config import PeftConfig
    from distlap.finetune.adapters import apply_peft
    from distlap.finetune.train import LogitsModel

    model = LogitsModel(
        apply_peft(make_tiny_vit(num_labels=3, layers=layers), PeftConfig(method=method, rank=2))
    )
    with torch.no_grad():  # move LoRA B off zero so the GGN of A is not degenerate
        for name, p in model.named_parameters():
            if "lora_B" in name or "ln_tuning" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def loader(n=48, seed=0):
    """Random 28x28 images with 3 random labels, batches of 16."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 3, (n,), generator=g)),
        batch_size=16,
    )


def study_of(ft, laplace=None, **kw):
    """The layer-wise :class:`~distlap.bayes.layerwise.Study` of a fine-tuned trial, quietly (its own
    config's Laplace settings unless ``laplace`` is given)."""
    from distlap.bayes.layerwise import Scoring, run_layerwise
    from distlap.trial import laplace_data

    la = laplace or ft.cfg.laplace
    scoring = Scoring(ft.cfg.n_bins, la.n_bootstrap, ft.cfg.seed)
    return run_layerwise(
        laplace_data(ft),
        la,
        prior_precision=ft.cfg.train.prior_precision,
        scoring=scoring,
        log=lambda m: None,
        **kw,
    )


def tiny_trial(fmnist_dir: Path, vit_dir: Path) -> list[str]:
    """Overrides of a tiny LoRA trial: the fake Fashion-MNIST, the 4-block ViT, classes 5-9, 2 epochs."""
    return [
        f"data.path={fmnist_dir}",
        f"backbone.name={vit_dir}",
        "data.classes=[5,6,7,8,9]",
        "train.epochs=2",
        "train.batch_size=32",
        "train.lr=5e-3",
    ]


def run_benchmark(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> ARGS`` in ``cwd`` as a user runs it, on this checkout's distlap and
    one thread (its figures are checked, not its speed); output captured, 10 minutes at most."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
