"""A driver that stops (Ctrl-C) or dies (kill -9) is continued with --resume, and the result is the sweep
that was asked for: exactly ``search.num_samples`` distinct configurations, none run twice, none lost,
nothing left RUNNING."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from faults.harness import check_exact, cluster_stores, ids, runs_by_kind, start, sweep, wait_for
from mlflow import MlflowClient

from distlap.sweep.settings import load_sweep_config
from distlap.sweep.study import load_study

N = 3
# The worst case for resuming: Ray Tune's saved experiment state is as old as it can be (the period
# between its saves is an hour), so trials asked after it are known to Optuna and MLflow only.
STALE_RAY_STATE = {"TUNE_GLOBAL_CHECKPOINT_S": "3600"}
# Three configurations, the first with a non-finite loss (lr = 1e30): a failure no retry can mend.
CTRL_C_TRIALS = [
    "search.num_samples=3",
    "search.space.train.lr={kind: choice, values: [0.002, 1.0e30]}",
    "search.points_to_evaluate=[{train.lr: 1.0e30, train.prior_precision: 10.0, peft.rank: 2},"
    " {train.lr: 0.002, train.prior_precision: 10.0, peft.rank: 2},"
    " {train.lr: 0.002, train.prior_precision: 100.0, peft.rank: 4}]",
]


def _descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below ``pid`` (from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add((child, _started(child)))
            todo.append(child)
    return found


def _started(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return ""


def _alive(procs: set[tuple[int, str]]) -> set[tuple[int, str]]:
    return {(pid, t) for pid, t in procs if _started(pid) == t}


@pytest.mark.slow
def test_kill_9_mid_trial_then_resume_gives_n_distinct_configurations(tmp_path):
    """The issue's first case: kill -9 of the driver while trials run, then --resume. Also: a second
    driver on the running sweep is refused, and the folder's name holds ' ', '#', '{}', a quote and
    a non-ASCII letter."""
    out, log = tmp_path / "k9 #1 {a} it's ü", tmp_path / "first.log"  # any name a folder can have
    args = ["--smoke-test", "--output", str(out), f"search.num_samples={N}", "resources.max_concurrent=2"]
    proc = start(log, *args, env=STALE_RAY_STATE)
    # A second driver on the running sweep, started once the first holds the folder (its trials have
    # begun) so that its start-up overlaps the first's trials instead of racing the sweep to its end.
    wait_for(proc, log, lambda t: ids(t, "stage: fine-tuning"))
    second_log = tmp_path / "second.log"
    second_driver = start(second_log, "--resume", "--output", str(out))
    # Kill once a trial has finished and the third one is fine-tuning (asked after the saved state).
    text = wait_for(
        proc, log, lambda t: len(set(ids(t, "stage: fine-tuning"))) >= 3 and ids(t, "stage: done")
    )
    done_before = set(ids(text, "stage: done"))
    try:
        second_driver.wait(timeout=120)
    except subprocess.TimeoutExpired:
        second_driver.kill()  # it was not refused: never leave it running
        raise
    refusal = second_log.read_text()
    assert second_driver.returncode == 2 and "in use by a running driver" in refusal, refusal[-3000:]
    # refused while the first still runs: it did not wait for the folder to be free
    assert proc.poll() is None, "the first driver ended before the second was refused (machine too slow?)"
    ray_processes = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.monotonic()

    second = sweep("--resume", "--output", str(out), env=STALE_RAY_STATE)
    assert second.returncode == 0, second.stderr[-3000:]
    configs = check_exact(out, N)
    resumed_log = second.stdout + second.stderr
    for trial_id in done_before:  # finished before the kill: kept, never computed again
        assert f"[{trial_id}] stage: fine-tuning" not in resumed_log
        assert f"[{trial_id}] stage: Laplace" not in resumed_log
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == N and (summary.status == "ok").all()
    table = pd.read_csv(out / "report" / "summary_table.csv")
    assert (table.n_seeds == 1).all() and table.configuration.nunique() == N  # no fabricated seeds
    report = json.loads((out / "report" / "analysis_summary.json").read_text())
    assert report["sweep"]  # the report was written from the complete sweep
    assert len(configs) == N
    # Ray's processes of the killed driver: its trials died with it; its two agents (dashboard, runtime
    # env) notice the dead raylet and exit about a minute later (docs/faults.md, "What survives what").
    while _alive(ray_processes) and time.monotonic() - killed_at < 120:
        time.sleep(1)
    assert not _alive(ray_processes), "Ray processes outlived the killed driver by 2 minutes"


def _finished_and_checkpointed(text: str) -> tuple[set[str], set[str]]:
    """Trials Tune reports finished, and trials past their checkpoint (at the Laplace stage) not done."""
    finished = set(ids(text, "completed after"))
    return finished, set(ids(text, "stage: Laplace fit")) - set(ids(text, "stage: done")) - finished


@pytest.mark.slow
def test_ctrl_c_then_resume_keeps_every_trial_once(tmp_path, monkeypatch):
    """Ctrl-C once a trial has finished and another is past its checkpoint, then --resume with an override
    a resume takes: exactly 3 trials, the finished one kept, the checkpointed one restored without
    retraining. The first configuration's loss is non-finite: a deterministic failure, so it is not retried
    (max_failures=1 is for failures that may pass, such as a lost node), ends FAILED in MLflow (with the
    message) and FAIL in Optuna, and the sweep goes on. The stores are the cluster's, PostgreSQL, where it
    is installed (CI): every trial and subset run is there once, and artifacts stay files in the folder."""
    with cluster_stores(monkeypatch) as stores:
        out, log = tmp_path / "ctrl-c", tmp_path / "first.log"
        proc = start(log, "--smoke-test", "--output", str(out), "max_failures=1", *CTRL_C_TRIALS, *stores)
        finished, checkpointed = _finished_and_checkpointed(
            wait_for(proc, log, lambda text: all(_finished_and_checkpointed(text)))
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
        first_log = log.read_text()  # one resume hint, distlap's own (not Tune's Tuner.restore(...))
        assert f"continue with: python sweeps/layerwise.py --resume --output {out}" in first_log
        assert "Tuner.restore(" not in first_log, first_log[-3000:]
        asked = len(load_study(load_sweep_config(out / "config.yaml").search).trials)
        assert asked < 3 or "unfinished" in set(pd.read_csv(out / "summary.csv").status)

        second = sweep("--resume", "--output", str(out), "max_failures=2")
        assert second.returncode == 0, second.stderr[-3000:]
        check_exact(out, 3, failed=1)
        resumed_log = second.stdout + second.stderr
        for trial_id in finished:
            assert f"[{trial_id}] stage" not in resumed_log  # finished trials are kept, not rerun
        for trial_id in checkpointed:  # restored from its checkpoint, or (if it ended while the driver
            # stopped, its result recorded but not yet reported) that result reported again: never retrained
            restored = f"[{trial_id}] stage: restored the fine-tuned adapter" in resumed_log
            assert restored or f"[{trial_id}] stage: done earlier" in resumed_log
            assert f"[{trial_id}] stage: fine-tuning" not in resumed_log
        _check_the_failed_trial(out, first_log, resumed_log)
        _check_the_stores(out, postgresql=bool(stores))


def _check_the_failed_trial(out: Path, first_log: str, resumed_log: str) -> None:
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary.status) == ["failed", "ok", "ok"]
    failed = summary[summary.status == "failed"].iloc[0]
    assert "non-finite training loss" in failed.error
    assert first_log.count(f"[{failed.trial_id}] stage: fine-tuning") == 1  # not retried
    assert f"[{failed.trial_id}] stage" not in resumed_log  # nor resumed
    run = MlflowClient(load_sweep_config(out / "config.yaml").tracking.uri).get_run(failed.mlflow_run_id)
    assert "non-finite training loss" in run.data.tags["error"]  # FAILED: check_exact
    record = json.loads((out / "trials" / failed.trial_id / "trial_result.json").read_text())
    assert record["status"] == "failed" and "non-finite training loss" in record["message"]


def _check_the_stores(out: Path, postgresql: bool) -> None:
    cfg = load_sweep_config(out / "config.yaml")
    assert cfg.max_failures == 2  # the config continued is saved
    subset = runs_by_kind(out)["subset"][0]  # artifacts stay files, in the output folder
    artifacts = MlflowClient(cfg.tracking.uri).list_artifacts(subset.info.run_id)
    assert [a.path for a in artifacts] == [f"reliability_{subset.data.tags['distlap.subset']}.png"]
    if postgresql:
        assert cfg.tracking.uri.startswith("postgresql") and cfg.search.storage.startswith("postgresql")
        assert not list(out.glob("*.db"))  # no SQLite beside it
        assert (out / "mlartifacts").is_dir()
