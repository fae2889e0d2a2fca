"""The nn subsets as Ray tasks give exactly the serial evaluation's numbers."""

import pytest
import torch

from distlap.config import load_config
from distlap.finetune.run import fine_tune
from distlap.trial import layerwise
from distlap.trial import scoring as trial_scoring

QUIET = dict(log=lambda m: None)


def _trial(fmnist_dir, vit_dir, device: str):
    torch.set_num_threads(1)  # Ray tasks run on one thread too: bit-identical comparisons
    cfg = load_config(
        overrides=[
            f"data.path={fmnist_dir}",
            f"backbone.name={vit_dir}",
            "data.classes=[5,6,7,8,9]",
            "train.epochs=1",
            "train.batch_size=32",
            "train.num_threads=1",
            f"train.device={device}",
            "train.prior_precision=50",
            "train.regime=posthoc",
            "laplace.predictive=nn",
            "laplace.fit_examples=64",
            "laplace.n_samples=4",
            "laplace.n_bootstrap=100",
        ]
    )
    return fine_tune(cfg, **QUIET)


@pytest.fixture(scope="module")
def trial(fake_fmnist_dir, tiny_vit_dir):
    """On the CPU everywhere (the CPU-only tasks below must see the trial's own precision)."""
    return _trial(fake_fmnist_dir, tiny_vit_dir, "cpu")


@pytest.mark.slow
def test_serial_and_ray_give_identical_numbers(trial):
    ray = pytest.importorskip("ray")
    from distlap.sweep.subset_tasks import ray_nn_evaluator

    serial = layerwise(trial, **QUIET).result
    scoring = trial_scoring(trial)  # the serial run's own: the test set's bootstrap seed
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        parallel = layerwise(
            trial, evaluate_nn=ray_nn_evaluator(trial, scoring, {"num_cpus": 1}, lambda m: None), **QUIET
        ).result
    finally:
        ray.shutdown()
    assert list(parallel["subsets"]) == list(serial["subsets"])  # the subsets' order, not the finishing order
    for name in serial["subsets"]:
        a, b = serial["subsets"][name]["metrics"], parallel["subsets"][name]["metrics"]
        assert {k: v for k, v in a.items() if not k.endswith("_s")} == {
            k: v for k, v in b.items() if not k.endswith("_s")
        }, name


@pytest.mark.gpu
def test_fractional_gpu_subset_tasks_match_the_in_process_result(fake_fmnist_dir, tiny_vit_dir):
    """On CUDA: each subset a Ray task holding a quarter of the GPU (four at once), its numbers those of the
    same subsets evaluated in the trial's process on the same GPU (bf16 autocast in both)."""
    ray = pytest.importorskip("ray")
    from distlap.sweep.subset_tasks import ray_nn_evaluator

    trial = _trial(fake_fmnist_dir, tiny_vit_dir, "cuda")
    only = ["layer_0", "late", "all"]
    serial = layerwise(trial, only=only, **QUIET).result
    scoring = trial_scoring(trial)  # the serial run's own: the test set's bootstrap seed
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        quarter = {"num_cpus": 1, "num_gpus": 0.25}
        evaluate = ray_nn_evaluator(trial, scoring, quarter, lambda m: None)
        parallel = layerwise(trial, only=only, evaluate_nn=evaluate, **QUIET).result
    finally:
        ray.shutdown()
    assert list(parallel["subsets"]) == only
    for name in only:
        a, b = serial["subsets"][name]["metrics"], parallel["subsets"][name]["metrics"]
        floats = [k for k, v in a.items() if isinstance(v, float) and not k.endswith("_s")]
        assert {k: b[k] for k in floats} == pytest.approx({k: a[k] for k in floats}, rel=1e-4, abs=1e-6), name
