"""The nn subsets as Ray tasks give exactly the serial evaluation's numbers."""

import pytest
import torch

from distlap.bayes.layerwise import Scoring
from distlap.config import load_config
from distlap.finetune.run import fine_tune
from distlap.trial import layerwise

QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def trial(fake_fmnist_dir, tiny_vit_dir):
    torch.set_num_threads(1)  # Ray tasks run on one thread too: bit-identical comparisons
    cfg = load_config(
        overrides=[
            f"data.path={fake_fmnist_dir}",
            f"backbone.name={tiny_vit_dir}",
            "data.classes=[5,6,7,8,9]",
            "train.epochs=1",
            "train.batch_size=32",
            "train.num_threads=1",
            "train.prior_precision=50",
            "train.converge=false",
            "laplace.predictive=nn",
            "laplace.fit_examples=64",
            "laplace.n_samples=4",
            "laplace.n_bootstrap=100",
        ]
    )
    return fine_tune(cfg, **QUIET)


def test_serial_and_ray_give_identical_numbers(trial):
    ray = pytest.importorskip("ray")
    from distlap.sweep.subset_tasks import ray_nn_evaluator

    serial = layerwise(trial, **QUIET).result
    scoring = Scoring(trial.cfg.n_bins, trial.cfg.laplace.n_bootstrap, trial.cfg.seed)
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
