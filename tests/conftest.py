"""Fixtures: a learnable fake Fashion-MNIST folder, a tiny ViT saved like a hub model, an offline hub."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import ROOT, fake_images, make_tiny_vit, tiny_trial, write_idx


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
    """One LoRA fine-tuned tiny trial (λ = 50, posthoc: θ̂ after its epochs, as a sweep's trial), shared
    by the tests of what follows fine-tuning: the layer-wise study, its predictives, the evaluation
    protocol. None of them needs a mode (they compare the code with laplace-torch or a naive reference at
    the same θ̂); the mode regime has its own tests (tests/test_trial.py, tests/finetune/test_train.py)."""
    import torch

    from distlap.config import load_config
    from distlap.finetune.run import fine_tune

    torch.set_num_threads(1)
    cfg = load_config(
        overrides=[
            *tiny_trial(fake_fmnist_dir, tiny_vit_dir),
            "train.num_threads=1",
            "train.prior_precision=50",
            "train.regime=posthoc",
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


# The shared smoke sweep: fixed points instead of TPE draws, so that it is the same sweep every time --
# configurations A and B, each with seeds 0 and 1 (search.seeds: aggregated by the report).
SMOKE_SWEEP = [
    "search.num_samples=4",
    "search.seeds=[0, 1]",
    "search.points_to_evaluate=[{train.prior_precision: 10.0, peft.rank: 2}, "
    "{train.prior_precision: 100.0, peft.rank: 4}]",
]


SMOKE_READER = re.compile(r"def \w+\([^)]*\bsmoke_sweep\b")  # a test or fixture that takes it


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory) -> SimpleNamespace:
    """One ``python sweeps/layerwise.py --smoke-test`` run as a user runs it (its own local Ray, in a
    subprocess), shared by every test that only reads what a sweep leaves: the driver's end-to-end
    checks, the report, the MLflow tree. ``.out`` is its folder, ``.log`` its console output. None of
    them may change what the sweep recorded (copy the folder first, as the report's partial-sweep tests
    do)."""
    out = tmp_path_factory.mktemp("smoke") / "sweep"
    cmd = [sys.executable, str(ROOT / "sweeps" / "layerwise.py"), "--smoke-test", "--output", str(out)]
    proc = subprocess.run([*cmd, *SMOKE_SWEEP], cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the smoke sweep failed:\n{log[-6000:]}"
    return SimpleNamespace(out=out, log=log)


def pytest_configure(config):
    """Under pytest-xdist each worker gets its share of the cores for torch's own threads (torch takes
    every core by default, and two workers on two cores then spend their time waiting on each other)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: where none is visible they are skipped, and say why. Slow tests
    run first: the workers start the long sweeps at once and the short tests fill the end (the order
    within each kind is kept)."""
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="marker gpu: needs a CUDA device, and torch sees none here")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    items.sort(key=lambda item: "slow" not in item.keywords)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` (pyproject.toml) sends each test module to one worker, so that its
    module-scoped fixtures are built once; here the modules that read the session's smoke sweep form
    one scope too, so that the sweep runs once. (pytest-xdist's own ``xdist_group`` does not take
    effect under pytest 9.2.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    readers = {
        path.relative_to(config.rootpath).as_posix()
        for path in (config.rootpath / "tests").rglob("test_*.py")
        if SMOKE_READER.search(path.read_text())
    }

    class SmokeSweepScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "smoke_sweep" if module in readers else module

    return SmokeSweepScope(config, log)
