"""Fixtures: a learnable fake Fashion-MNIST folder, a tiny ViT saved like a hub model, an offline hub."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import fake_images, make_tiny_vit, tiny_trial, write_idx


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


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A tiny ViT written with ``save_pretrained`` (model + image processor), as a hub download would be."""
    from transformers import ViTImageProcessor

    path = tmp_path_factory.mktemp("tiny-vit")
    make_tiny_vit().save_pretrained(path)
    ViTImageProcessor(
        do_resize=False, size={"height": 28, "width": 28}, image_mean=[0.25], image_std=[0.5]
    ).save_pretrained(path)
    return path


@pytest.fixture
def offline_hub(monkeypatch):
    """No hub: transformers / datasets must fail at once with our message, never touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def fine_tuned(fake_fmnist_dir, tiny_vit_dir, tmp_path_factory):
    """One LoRA fine-tuned tiny trial at its converged MAP (λ = 50), shared by the tests of what follows
    fine-tuning: the layer-wise study, its predictives, the evaluation protocol."""
    import torch

    from distlap.config import load_config
    from distlap.finetune.run import fine_tune

    torch.set_num_threads(1)
    cfg = load_config(
        overrides=[
            *tiny_trial(fake_fmnist_dir, tiny_vit_dir),
            "train.num_threads=1",
            "train.prior_precision=50",
            "train.regime=mode",
            "laplace.fit_examples=64",
            "laplace.n_samples=4",
            "laplace.n_bootstrap=200",
            "laplace.subsets={head_and_tail: [0, 3]}",
            f"output_dir={tmp_path_factory.mktemp('fine-tuned')}",
        ]
    )
    ft = fine_tune(cfg, log=lambda m: None)
    assert ft.train.status == "ok"
    return ft


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: where none is visible they are skipped, and say why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marker gpu: needs a CUDA device, and torch sees none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
