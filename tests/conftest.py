"""Tiny fixtures: a 4-block width-32 ViT saved like a hub model, and a learnable fake Fashion-MNIST."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch


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
        images[i, 2 * y + 4: 2 * y + 7, :] += 180
    return images.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def fake_fmnist_dir(tmp_path_factory) -> Path:
    """A Fashion-MNIST-shaped directory: 600 train / 200 test images, 10 classes, .gz idx files."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 600), ("t10k", 200)):
        labels = np.arange(n) % 10
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", fake_images(labels, rng))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def make_tiny_vit(num_labels: int = 5, layers: int = 4):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=layers,
                       num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
    return ViTForImageClassification(config)


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A tiny ViT written with ``save_pretrained`` (model + image processor), as a hub download would be."""
    from transformers import ViTImageProcessor

    path = tmp_path_factory.mktemp("tiny-vit")
    make_tiny_vit().save_pretrained(path)
    ViTImageProcessor(do_resize=False, size={"height": 28, "width": 28},
                      image_mean=[0.25], image_std=[0.5]).save_pretrained(path)
    return path


@pytest.fixture
def offline_hub(monkeypatch):
    """No hub: transformers / datasets must fail at once with our message, never touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
