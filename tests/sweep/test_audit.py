"""The store audit of benchmarks/store_load.py: a hand-made one-trial sweep is complete; a run written
twice, a metric never written and a lock error in the log are each counted once."""

from __future__ import annotations

import json

import optuna
from mlflow import MlflowClient

from distlap.config import to_yaml
from distlap.names import KIND_TAG, RUN_ID, SWEEP_TAG, TRIAL_TAG
from distlap.sweep.audit import audit, lock_errors
from distlap.sweep.settings import load_sweep_config, resolve
from distlap.sweep.study import storage
from distlap.sweep.tracking import SweepTracker, TrialRun


def _one_trial_sweep(out):
    cfg = resolve(load_sweep_config(overrides=["search.num_samples=1"], exact={"output_dir": str(out)}))
    out.mkdir()
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "summary.csv").write_text("x\n1\n")
    tracker = SweepTracker.open(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        cfg.search.study_name,
        run_name="s",
        artifact_location=(out / "mlartifacts").as_uri(),
    )
    study = optuna.create_study(study_name=cfg.search.study_name, storage=storage(cfg.search.storage))
    trial = study.ask()
    run_id = tracker.trial_run("t1", run_name="trial-000", params={})
    trial.set_user_attr(TRIAL_TAG, "t1")
    trial.set_user_attr(RUN_ID, run_id)
    folder = out / "trials" / "t1"
    (folder / "plots").mkdir(parents=True)
    for name in ("map", "all"):
        (folder / "plots" / f"reliability_{name}.png").write_bytes(b"png")
    result = {"status": "ok", "metrics": {"a": 1.0}, "history": [{"epoch": 1, "loss": 0.5}]}
    layerwise = {"subsets": {"all": {"blocks": [0], "metrics": {"m": 2.0}}}}
    (folder / "trial_result.json").write_text(json.dumps(result))
    (folder / "layer_wise_results.json").write_text(json.dumps(layerwise))
    with TrialRun(cfg.tracking.uri, run_id) as run:
        run.log_history(result["history"])
        run.log(metrics=result["metrics"])
        run.log_subsets(layerwise, folder / "plots")
        run.log_artifact(folder / "layer_wise_results.json")
    study.tell(trial, 1.0)
    tracker.finish(metrics={}, artifacts=[out / "summary.csv", out / "config.yaml"])
    return cfg, tracker, folder, result


def test_audit_counts_what_is_lost_duplicated_and_locked(tmp_path):
    out = tmp_path / "sweep"
    cfg, tracker, folder, result = _one_trial_sweep(out)
    clean = audit(out)
    assert (clean.lost, clean.duplicated, clean.locked_errors, clean.failed) == ([], [], 0, 0)
    assert clean.ok and clean.checked["metric"] == 3 and clean.checked["artifact"] == 5

    result["metrics"]["b"] = 3.0  # the trial recorded b, its run never got it
    (folder / "trial_result.json").write_text(json.dumps(result))
    key = {SWEEP_TAG: cfg.search.study_name, KIND_TAG: "trial", TRIAL_TAG: "t1"}
    MlflowClient(cfg.tracking.uri).create_run(tracker.experiment_id, tags=key)  # the trial run again
    found = audit(out, console="sqlite3.OperationalError: database is locked\n")
    assert len(found.lost) == 1 and "metric b" in found.lost[0]
    assert len(found.duplicated) == 1 and "trial run t1 x2" in found.duplicated[0]
    assert found.locked_errors == 1 and not found.ok


def test_lock_errors_are_sqlite_and_postgresql_busy_errors():
    text = "database is locked ... (psycopg.errors.LockNotAvailable) could not obtain lock on row ... fine"
    assert lock_errors(text) == 2 and lock_errors("all trials done") == 0
