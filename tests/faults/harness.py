"""The fault suite's harness: run the sweep script as a user does, watch its log, read its stores."""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from distlap.names import KIND_TAG, RUN_ID, TRIAL_TAG
from distlap.sweep.settings import load_sweep_config
from distlap.sweep.study import load_study

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "sweeps" / "layerwise.py"
N_SUBSETS = 7  # the smoke backbone: 3 blocks + early / mid / late / all


def sweep(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python sweeps/layerwise.py ARGS`` to its end."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def start(log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """The sweep script in the background (its own session, as from a terminal), output in ``log``.

    Its SIGINT is the default, as in a terminal's foreground job, whatever pytest's own is: a shell
    starts a background job (``pytest ... &``) with SIGINT ignored, the children inherit that, and
    Python then installs no KeyboardInterrupt handler, so Ctrl-C tests would see a sweep deaf to it.
    """
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=_terminal_sigint,
        )


def _terminal_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(proc: subprocess.Popen, log: Path, ready, timeout: float = 240) -> str:
    """Poll ``log`` until ``ready(text)``; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if ready(text):
            return text
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (code {proc.returncode}) first:\n{text[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting:\n{log.read_text()[-3000:]}")


def ids(text: str, marker: str) -> list[str]:
    """Ray trial ids on ``[<id>] <marker>`` lines and Tune's ``layerwise_trial_<id> <marker>`` lines."""
    pattern = re.compile(rf"(?:layerwise_trial_(\w+)|\[(\w+)\]) {re.escape(marker)}")
    return [a or b for a, b in pattern.findall(text)]


def runs_by_kind(out: Path) -> dict[str, list]:
    cfg = load_sweep_config(out / "config.yaml")
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = collections.defaultdict(list)
    for run in client.search_runs([experiment.experiment_id], max_results=5000):
        runs[run.data.tags[KIND_TAG]].append(run)
    return runs


def check_exact(out: Path, n: int, failed: int = 0) -> list[tuple]:
    """The stores hold exactly ``n`` distinct configurations, each run once to its end: ``n - failed``
    COMPLETE Optuna trials and ``failed`` FAIL ones, with distinct settings; one MLflow trial run per
    Optuna trial (FINISHED with the trial's objective and its subset runs, or FAILED with none); the
    trial's results file; nothing RUNNING anywhere. Returns the configurations."""
    cfg = load_sweep_config(out / "config.yaml")
    study = load_study(cfg.search)
    states = collections.Counter(t.state for t in study.trials)
    assert states == collections.Counter({TrialState.COMPLETE: n - failed, TrialState.FAIL: failed}), states
    configs = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(configs)) == n, f"a configuration ran twice: {configs}"
    runs = runs_by_kind(out)
    trials = {r.info.run_id: r for r in runs["trial"]}
    assert sorted(trials) == sorted(t.user_attrs[RUN_ID] for t in study.trials)
    mlflow_configs = {tuple(sorted((k, r.data.params[k]) for k in cfg.search.space)) for r in trials.values()}
    assert len(mlflow_configs) == n
    per_trial = collections.Counter(r.data.tags["mlflow.parentRunId"] for r in runs["subset"])
    for t in study.trials:
        run = trials[t.user_attrs[RUN_ID]]
        ok = t.state == TrialState.COMPLETE
        assert run.info.status == ("FINISHED" if ok else "FAILED"), (t.number, run.info.status)
        assert per_trial[run.info.run_id] == (N_SUBSETS if ok else 0), per_trial
        if ok:
            assert run.data.metrics[cfg.search.metric] == pytest.approx(t.value)
            assert (out / "trials" / t.user_attrs[TRIAL_TAG] / "layer_wise_results.json").is_file()
    others = [r for kind in runs if kind != "trial" for r in runs[kind]]
    assert {r.info.status for r in others} == {"FINISHED"}
    return configs


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` read-only for everyone (root too), as a read-only mount makes it: a read-only bind
    mount of it onto itself. Skips the test where mounting is not allowed."""
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode
    ):
        pytest.skip("needs root and mount (a read-only bind mount)")
    try:
        _remount_read_only(folder)
        yield folder
    finally:
        for _ in range(20):  # busy while a process still has a file open there
            if not subprocess.run(["umount", folder], capture_output=True).returncode:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", folder], capture_output=True)


def _remount_read_only(folder: Path, seconds: float = 60) -> None:
    """The kernel refuses a read-only remount ("mount point is busy") while any process holds a file
    there open for writing (an MLflow SQLite connection between writes, say): retry until it is idle."""
    deadline = time.monotonic() + seconds
    while True:
        command = ["mount", "-o", "remount,bind,ro", folder, folder]
        remount = subprocess.run(command, capture_output=True, text=True)
        if not remount.returncode:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{folder} stayed busy for {seconds:.0f} s: {remount.stderr.strip()}")
        time.sleep(0.05)


def _store_load():
    """benchmarks/store_load.py, the one home of the throwaway PostgreSQL server (a benchmark cannot
    import this pytest module, so the tests import it)."""
    spec = importlib.util.spec_from_file_location("store_load", ROOT / "benchmarks" / "store_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def cluster_stores(monkeypatch):
    """The cluster's stores where PostgreSQL is installed (the README's test command installs it): MLflow
    and Optuna in a throwaway PostgreSQL server with password (SCRAM) authentication, run as the
    ``postgres`` system user when this is root (PostgreSQL refuses root), PGPASSFILE set for the sweep and
    the test; yields the sweep's two store overrides. Elsewhere the sweep's own SQLite files (yields [])."""
    pg = _store_load()
    if not (pg.postgres_bin("initdb") and pg.postgres_bin("pg_ctl")):
        print("PostgreSQL is not installed (apt-get install postgresql): the stores are SQLite files")
        yield []
        return
    with pg.postgres_server(password="s3cret-for-tests") as (stores, passfile):
        monkeypatch.setenv("PGPASSFILE", str(passfile))
        yield stores
