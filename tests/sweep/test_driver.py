"""Whole sweeps as the user runs them (``python sweeps/layerwise.py`` in a subprocess, each with its own
local Ray): the MLflow tree, the Optuna study and the output folder agree; failures and resume."""

import collections
import json
import re
import signal
import subprocess
import sys
import time
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


def _sweep(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


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
    """The session's shared smoke sweep (tests/conftest.py: 2 configurations x 2 seeds, all at once)."""
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


@pytest.mark.slow
def test_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    """lr=1e30 makes the loss non-finite: a deterministic failure, so it is not retried (max_failures=1
    is for failures that may pass, such as a lost node); it ends FAILED in MLflow (with the message)
    and FAIL in Optuna; the other trial completes, evaluating its subsets
    as Ray tasks in its child bundle (2 CPUs per trial on this 2-CPU Ray: any task escaping the trial's
    placement group would wait forever)."""
    out = tmp_path / "fail"
    proc = _sweep(
        "--smoke-test",
        "--output",
        str(out),
        "max_failures=1",
        "trial.laplace.predictive=nn",
        "resources.eval_tasks=1",
        "search.space.train.lr={kind: choice, values: [0.002, 1.0e30]}",
        "search.points_to_evaluate=[{train.lr: 1.0e30, train.prior_precision: 10.0, peft.rank: 2},"
        " {train.lr: 0.002, train.prior_precision: 10.0, peft.rank: 2}]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _check_tree(out, n_trials=2, n_subsets=7)
    assert list(summary.status) == ["failed", "ok"]
    assert "non-finite training loss" in summary.error[0]
    failed_id = summary.trial_id[0]
    assert (proc.stdout + proc.stderr).count(f"[{failed_id}] stage: fine-tuning") == 1  # no retry
    # the layer-wise engine's own line about Ray tasks
    assert re.search(rf"\[{summary.trial_id[1]}\] .*as Ray tasks", proc.stdout + proc.stderr)
    run = MlflowClient(load_sweep_config(out / "config.yaml").tracking.uri).get_run(summary.mlflow_run_id[0])
    assert run.info.status == "FAILED" and "non-finite training loss" in run.data.tags["error"]
    assert json.loads((out / "trials" / failed_id / "trial_result.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_exactly_n_trials(tmp_path):
    """Ctrl-C once a trial has finished and another is past its checkpoint; --resume keeps the finished
    trial, restores the checkpointed one without retraining and ends with exactly 3 trials."""
    out, log = tmp_path / "resume", tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--smoke-test", "--output", str(out), "search.num_samples=3"],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text()
        finished = set(_ids(text, "completed after"))
        checkpointed = set(_ids(text, "stage: Laplace fit")) - set(_ids(text, "stage: done")) - finished
        if finished and checkpointed:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    first_log = log.read_text()  # one resume hint, distlap's own (not Tune's Tuner.restore(...))
    assert f"continue with: python sweeps/layerwise.py --resume --output {out}" in first_log
    assert "Tuner.restore(" not in first_log, first_log[-3000:]
    assert len(load_study(load_sweep_config(out / "config.yaml").search).trials) < 3 or "unfinished" in set(
        pd.read_csv(out / "summary.csv").status
    )

    second = _sweep("--resume", "--output", str(out))
    assert second.returncode == 0, second.stderr[-3000:]
    summary = _check_tree(out, n_trials=3, n_subsets=7)
    assert (summary.status == "ok").all()
    resumed_log = second.stdout + second.stderr
    for trial_id in finished:
        assert f"[{trial_id}] stage" not in resumed_log  # finished trials are kept, not rerun
    for trial_id in checkpointed:  # restored from its checkpoint, or (if it ended while the driver
        # stopped, its result recorded but not yet reported) that result reported again: never retrained
        restored = f"[{trial_id}] stage: restored the fine-tuned adapter" in resumed_log
        assert restored or f"[{trial_id}] stage: done earlier" in resumed_log
        assert f"[{trial_id}] stage: fine-tuning" not in resumed_log


def _ids(text: str, marker: str) -> list[str]:
    """Ray trial ids on lines with ``marker``: Tune's ``layerwise_trial_<id> completed after`` lines and
    our ``[<id>] stage: ...`` lines."""
    pattern = re.compile(rf"(?:layerwise_trial_(\w+)|\[(\w+)\]) {re.escape(marker)}")
    return [a or b for a, b in pattern.findall(text)]
