"""Trial checkpoints: a trial killed mid-training resumes from its last epoch and ends with the same
numbers as one never interrupted; after training it restores without retraining."""

import pytest

from distlap import names

pytestmark = pytest.mark.slow


def _run(tmp_path, fake_fmnist_dir, tiny_vit_dir, fail_at, name):
    import ray
    from ray import tune

    from distlap.sweep.kinds import trainable
    from distlap.sweep.settings import load_sweep_config, resolve
    from distlap.sweep.tracking import SweepTracker

    out = tmp_path / name
    cfg = resolve(
        load_sweep_config(
            overrides=[
                f"output_dir={out}",
                "search.num_samples=1",
                f"trial.data.path={fake_fmnist_dir}",
                f"trial.backbone.name={tiny_vit_dir}",
                "trial.data.classes=[5,6,7,8,9]",
                "trial.train.epochs=3",
                "trial.train.refine_steps=5",
                "resources.checkpoint_every_s=0",  # a checkpoint after every epoch: the kill lands after 2
                "trial.laplace.fit_examples=32",
                "trial.laplace.n_bootstrap=20",
                "trial.laplace.shapley_bootstrap=0",
            ]
        )
    )
    tracker = SweepTracker.open(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        "s",
        run_name="s",
        artifact_location=str(out / "mlartifacts"),
    )
    config = {
        "train.prior_precision": 10.0,
        "peft.rank": 2,
        names.RUN_ID: tracker.trial_run("t", run_name="t", params={}),
    }
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"DISTLAP_FAIL_AFTER_EPOCH": str(fail_at)}},
    )
    try:
        tuner = tune.Tuner(
            tune.with_parameters(trainable(cfg), sweep=cfg),
            param_space=config,
            run_config=tune.RunConfig(
                storage_path=str(out / "ray"), name="one", failure_config=tune.FailureConfig(max_failures=1)
            ),
        )
        return tuner.fit()[0]
    finally:
        ray.shutdown()


def test_a_trial_killed_mid_training_resumes_with_the_same_numbers(tmp_path, fake_fmnist_dir, tiny_vit_dir):
    """The init anchor makes θ₀ depend on the initialisation: the resumed trial must read θ₀ from its
    checkpoint, not from the adapter it loads (a trained A), or its prior, MAP and answer would differ."""
    import json

    from safetensors.torch import load_file

    whole = _run(tmp_path, fake_fmnist_dir, tiny_vit_dir, 0, "whole")
    broken = _run(tmp_path, fake_fmnist_dir, tiny_vit_dir, 2, "broken")  # dies after epoch 2, once
    assert whole.error is None and broken.error is None
    for key in ("map/test/nll", "bayes/test/ece", "bayes/test/delta_ece", names.ROBUST_AFTER):
        assert broken.metrics[key] == whole.metrics[key], key
    trials = [next((tmp_path / name / names.TRIALS_DIR).iterdir()) for name in ("whole", "broken")]
    means = [load_file(str(t / "adapter" / "prior_mean.safetensors")) for t in trials]
    assert means[0].keys() == means[1].keys()
    assert all(means[0][k].equal(means[1][k]) for k in means[0])
    results = [json.loads((t / names.LAYERWISE_FILE).read_text()) for t in trials]
    delta = names.delta("subset", "test", "ece")
    assert {s: r["metrics"][delta] for s, r in results[0]["subsets"].items()} == {
        s: r["metrics"][delta] for s, r in results[1]["subsets"].items()
    }
