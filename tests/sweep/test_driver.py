"""A whole sweep as the user runs it (``python sweeps/layerwise.py`` in a subprocess, with its own local
Ray): the MLflow tree, the Optuna study and the output folder agree. Failures, Ctrl-C and resume are
in tests/faults."""

import collections
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from distlap import names
from distlap.names import KIND_TAG, RUN_ID, TRIAL_TAG
from distlap.sweep.settings import load_sweep_config
from distlap.sweep.study import load_study

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "sweeps" / "layerwise.py"


# --- whole sweeps (subprocesses) -----------------------------------------------------------------


def _runs(out: Path) -> dict[str, list]:
    cfg = load_sweep_config(out / "config.yaml")
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = collections.defaultdict(list)
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        runs[run.data.tags[KIND_TAG]].append(run)
    return runs


def _check_tree(out: Path, n_trials: int, n_subsets: int) -> pd.DataFrame:
    """Exactly one sweep run, n trial runs under it, n_subsets subset runs under each, one Optuna
    trial per trial run (and back), files in the output folder."""
    cfg = load_sweep_config(out / "config.yaml")
    runs = _runs(out)
    (sweep,) = runs["sweep"]
    assert sweep.data.tags["git_commit"] and sweep.data.tags["version.torch"] == "2.14.1"
    trials = {r.info.run_id: r for r in runs["trial"]}
    assert len(trials) == n_trials
    assert len({r.data.tags[TRIAL_TAG] for r in trials.values()}) == n_trials  # no duplicates
    assert all(r.data.tags["mlflow.parentRunId"] == sweep.info.run_id for r in trials.values())
    by_parent = collections.Counter(r.data.tags["mlflow.parentRunId"] for r in runs["subset"])
    ok_runs = [rid for rid, r in trials.items() if r.info.status == "FINISHED"]
    assert all(by_parent[rid] == n_subsets for rid in ok_runs)
    study = load_study(cfg.search)
    assert len(study.trials) == n_trials
    for t in study.trials:
        run = trials[t.user_attrs[RUN_ID]]
        assert run.data.tags[TRIAL_TAG] == t.user_attrs[TRIAL_TAG]
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            assert run.data.metrics[cfg.search.metric] == pytest.approx(t.value)
            assert (out / "trials" / t.user_attrs[TRIAL_TAG] / "layer_wise_results.json").is_file()
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == n_trials
    files = {p.name for p in out.iterdir()}
    assert {"config.yaml", "mlflow.db", "optuna.db", "ray_results", "trials", "summary.csv"} <= files
    return summary


@pytest.mark.slow
def test_smoke_sweep_end_to_end(smoke_sweep):
    """The session's shared smoke sweep (tests/conftest.py: 2 configurations x 2 seeds, two at a time)."""
    out = smoke_sweep.out
    summary = _check_tree(out, n_trials=4, n_subsets=7)  # vit-mini: 3 blocks + early/mid/late/all
    assert (summary.status == "ok").all()
    runs = _runs(out)
    trial = runs["trial"][0]
    assert {
        "bayes/val/nll",
        "bayes/test/ece",
        "map/test/ece",
        "bayes/test/delta_ece",
        names.TUNED_PARAMS_PCT,
        names.TIME_PER_EPOCH,
        names.TRAIN_LOSS,
        "epoch/val/ece",
    } <= set(trial.data.metrics)
    for key in trial.data.metrics:
        names.describe(key)  # every logged key is in the vocabulary
    assert trial.data.tags["git_commit"] and trial.data.tags["device"]
    subset = next(r for r in runs["subset"] if r.data.tags["distlap.subset"] == "all")
    client = MlflowClient(load_sweep_config(out / "config.yaml").tracking.uri)
    assert [a.path for a in client.list_artifacts(subset.info.run_id)] == ["reliability_all.png"]
    assert "stage: fine-tuning" in smoke_sweep.log  # progress names the stage
    assert re.search(r"\[sweep\] finished in \d+:\d\d", smoke_sweep.log)  # and the sweep's wall time
    assert (out / "report" / "report.html").is_file()  # the analysis report is written at the end
