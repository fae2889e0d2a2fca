"""The GLM pass as Ray tasks over shards (distlap.sweep.glm_tasks) gives the serial pass's numbers."""

import pytest
import torch

from distlap.bayes.glm import glm_pass, param_blocks, probit_probs
from distlap.bayes.layerwise import fit_once
from distlap.trial import laplace_data
from helpers import study_of

CPU = torch.device("cpu")
QUIET = lambda m: None
SUBSETS = ((), (0,), (3,), (1, 2), (0, 1, 2, 3))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of two CPUs for this module's tests (as tests/sweep/test_subset_tasks.py starts one)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("tasks", [1, 2, 3])
def test_ray_shards_give_the_serial_probabilities(fine_tuned, local_ray, tasks):
    from distlap.sweep.glm_tasks import ray_glm_runner

    data = laplace_data(fine_tuned)
    la, _ = fit_once(data, fine_tuned.cfg.laplace, fine_tuned.cfg.train.prior_precision, QUIET)
    blocks, grid = param_blocks(data.model, la), [1.0, 50.0, 1e3]
    serial = glm_pass(data.model, la, blocks, data.test, CPU, grid)
    run = ray_glm_runner(tasks, {"num_cpus": 1}, QUIET)
    parallel = glm_pass(data.model, la, blocks, data.test, CPU, grid, run=run)
    assert parallel.variances.shape == serial.variances.shape
    assert torch.equal(parallel.labels, serial.labels)  # the examples' order
    torch.testing.assert_close(parallel.logits, serial.logits, rtol=0, atol=1e-6)
    for g in range(len(grid)):
        for subset in SUBSETS:
            torch.testing.assert_close(
                probit_probs(parallel.logits, parallel.at(g), subset),
                probit_probs(serial.logits, serial.at(g), subset),
                rtol=0,
                atol=1e-6,
            )


@pytest.mark.slow
def test_a_study_with_ray_shards_gives_the_serial_rows(fine_tuned, local_ray):
    """Rows (at the global λ and each λ_S), the Shapley values and the predictive on further data."""
    from distlap.sweep.glm_tasks import ray_glm_runner

    only = ("layer_0", "late", "all")
    serial = study_of(fine_tuned, only=only)
    passes = []
    parallel = study_of(fine_tuned, only=only, run_glm=ray_glm_runner(2, {"num_cpus": 1}, passes.append))
    assert len(passes) == 2 and all("in 2 Ray tasks" in line for line in passes)  # validation, test
    a, b = serial.result, parallel.result
    assert list(b["subsets"]) == list(only)
    for name in only:
        ours, theirs = a["subsets"][name]["metrics"], b["subsets"][name]["metrics"]
        floats = [k for k, v in ours.items() if isinstance(v, float) and not k.endswith("_s")]
        assert {k: theirs[k] for k in floats} == pytest.approx({k: ours[k] for k in floats}, abs=1e-6), name
    for score, values in a["attribution"]["values"].items():
        assert b["attribution"]["values"][score]["shapley"] == pytest.approx(values["shapley"], abs=1e-6)
    loader = fine_tuned.loader("val")
    mine, yours = serial.predictive(loader, serial.subsets), parallel.predictive(loader, parallel.subsets)
    assert len(passes) == 3  # the predictive's pass ran as tasks too
    for name in only:
        torch.testing.assert_close(yours.subsets[name], mine.subsets[name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_glm_trial_with_eval_tasks_runs_its_passes_in_its_child_bundle(
    local_ray, tmp_path, fake_fmnist_dir, tiny_vit_dir
):
    """Through Ray Tune with the sweep's placement group (a trial bundle and one child bundle on this
    2-CPU Ray): the shard tasks fit the child bundle (a task escaping it would wait forever), and the
    trial ends with its results, shift and OOD included."""
    import json

    from ray import tune

    from distlap import names
    from distlap.sweep.driver import trial_resources
    from distlap.sweep.kinds import trainable
    from distlap.sweep.settings import load_sweep_config, resolve
    from distlap.sweep.tracking import SweepTracker

    cfg = resolve(
        load_sweep_config(
            overrides=[
                f"output_dir={tmp_path}",
                "search.num_samples=1",
                "resources.eval_tasks=1",
                f"trial.data.path={fake_fmnist_dir}",
                f"trial.backbone.name={tiny_vit_dir}",
                "trial.data.classes=[5,6,7,8,9]",
                "trial.train.epochs=1",
                "trial.train.refine_steps=2",  # the robustness re-run is a glm study too, not timed here
                "trial.laplace.fit_examples=32",
                "trial.laplace.n_bootstrap=20",
                "trial.laplace.shapley_bootstrap=0",
            ]
        )
    )
    tracker = SweepTracker.open(
        cfg.tracking.uri, cfg.tracking.experiment, "s", run_name="s", artifact_location=str(tmp_path / "a")
    )
    config = {
        "train.prior_precision": 10.0,
        "peft.rank": 2,
        names.RUN_ID: tracker.trial_run("t", run_name="t0", params={}),
    }
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable(cfg), sweep=cfg), trial_resources(cfg)),
        param_space=config,
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="one"),
    )
    result = tuner.fit()[0]
    assert result.error is None
    trial_dir = next((tmp_path / names.TRIALS_DIR).iterdir())
    layerwise = json.loads((trial_dir / names.LAYERWISE_FILE).read_text())
    assert layerwise["shift"] and layerwise["subsets"]["all"]["metrics"]


def test_the_trainable_hands_glm_trials_the_shard_runner():
    """eval_tasks > 0: glm trials get ``run_glm`` (nn trials keep their subset evaluator); 0: neither."""
    from types import SimpleNamespace

    from distlap.sweep.settings import load_sweep_config
    from distlap.sweep.trainable import _task_runners

    ft = SimpleNamespace(cfg=load_sweep_config().trial)  # glm, the default
    assert _task_runners(ft, load_sweep_config(overrides=["resources.eval_tasks=2"]), QUIET).keys() == {
        "run_glm"
    }
    assert _task_runners(ft, load_sweep_config(), QUIET) == {}
