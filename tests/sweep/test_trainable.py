"""One Ray Tune trial of each kind, through Ray Tune itself (one trial, fixed settings, local Ray):
what it reports, writes, checkpoints and logs to MLflow. A failing trial's record: the Ctrl-C sweep of
tests/faults/test_resume.py, whose first configuration fails."""

import json

import pytest
from mlflow import MlflowClient

from distlap import names
from distlap.sweep.settings import load_sweep_config, resolve
from distlap.sweep.tracking import SweepTracker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for this module's trials (started once, not once per test; shut down after them)."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _run_one(kind, tmp_path, fake_fmnist_dir, tiny_vit_dir, *overrides):
    from ray import tune

    from distlap.sweep.kinds import trainable

    metric = "bayes/val/nll" if kind == "layerwise" else "map/val/nll"
    cfg = resolve(
        load_sweep_config(
            overrides=[
                f"kind={kind}",
                f"output_dir={tmp_path}",
                f"search.metric={metric}",
                "search.num_samples=1",
                f"trial.data.path={fake_fmnist_dir}",
                f"trial.backbone.name={tiny_vit_dir}",
                "trial.data.classes=[5,6,7,8,9]",
                "trial.train.epochs=1",
                "trial.train.refine_steps=3",
                "trial.laplace.fit_examples=32",
                "trial.laplace.n_samples=2",
                "trial.laplace.n_bootstrap=20",
                *overrides,
            ]
        )
    )
    tracker = SweepTracker.open(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        "s",
        run_name="s",
        artifact_location=str(tmp_path / "mlartifacts"),
    )
    run_id = tracker.trial_run("t", run_name="trial-000", params={})
    config = {"train.prior_precision": 10.0, "peft.rank": 2, names.RUN_ID: run_id}
    tuner = tune.Tuner(
        tune.with_parameters(trainable(cfg), sweep=cfg),
        param_space=config,
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="one"),
    )
    return cfg, run_id, tuner.fit()[0]


def test_layerwise_trial_reports_writes_and_logs(local_ray, tmp_path, fake_fmnist_dir, tiny_vit_dir):
    cfg, run_id, result = _run_one("layerwise", tmp_path, fake_fmnist_dir, tiny_vit_dir)
    assert result.error is None
    trial_dir = next((tmp_path / names.TRIALS_DIR).iterdir())
    record = json.loads((trial_dir / names.TRIAL_FILE).read_text())
    assert record["status"] == "ok" and record["config"]["peft"]["rank"] == 2
    assert result.metrics[cfg.search.metric] == record["metrics"][cfg.search.metric]
    assert (trial_dir / names.LAYERWISE_FILE).is_file() and (trial_dir / "adapter").is_dir()
    assert (trial_dir / names.POSTERIOR_FILE).is_file()  # the glm posterior, for python -m distlap.export
    assert result.checkpoint is not None  # the fine-tuned adapter, for a retry or a resumed sweep
    run = MlflowClient(cfg.tracking.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics[names.score("bayes", "test", "ece")] == record["metrics"]["bayes/test/ece"]
    assert run.data.params["train.lr"] == str(cfg.trial.train.lr)  # the non-searched settings too
    assert names.TRAIN_LOSS in run.data.metrics  # the training curve


def test_peft_trial_without_laplace_reports_the_map(local_ray, tmp_path, fake_fmnist_dir, tiny_vit_dir):
    cfg, _, result = _run_one("peft_methods", tmp_path, fake_fmnist_dir, tiny_vit_dir)
    assert result.error is None
    assert names.score("map", "test", "accuracy") in result.metrics
    assert not any(k.startswith("bayes/") for k in result.metrics)
    assert not list(tmp_path.glob(f"{names.TRIALS_DIR}/*/{names.LAYERWISE_FILE}"))


@pytest.mark.parametrize("every_s, reported", [(0.0, [1, 2, 3]), (3600.0, [])])
def test_epoch_checkpoints_at_most_every_so_often_and_every_row_reaches_mlflow(
    monkeypatch, every_s, reported
):
    """every_s = 0: a checkpoint and a history write after each epoch; a long period: none mid-training,
    and the rows still reach MLflow, at the flush that ends training."""
    from distlap.sweep import checkpoints, trainable

    seen, logged = [], []
    monkeypatch.setattr(checkpoints, "report", lambda ft, metrics, train_state: seen.append(metrics["epoch"]))

    class Run:
        def log_history(self, rows):
            logged.append([r["epoch"] for r in rows])

    every = trainable._EpochCheckpoints(ft=None, run=Run(), every_s=every_s)
    for epoch in (1, 2, 3):
        every({"epoch": epoch}, state={})
    every.flush()
    assert seen == reported
    assert sum(logged, []) == [1, 2, 3] and (len(logged) == 3 if every_s == 0 else logged == [[1, 2, 3]])
