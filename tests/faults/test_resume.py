"""A driver that dies is continued with --resume, and the result is the sweep that was asked for: exactly
``search.num_samples`` distinct configurations, none run twice, none lost, nothing left RUNNING."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from faults.harness import check_exact, ids, start, sweep, wait_for

N = 4
# The worst case for resuming: Ray Tune's saved experiment state is as old as it can be (the period
# between its saves is an hour), so trials asked after it are known to Optuna and MLflow only.
STALE_RAY_STATE = {"TUNE_GLOBAL_CHECKPOINT_S": "3600"}


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
    # Ray's processes of the killed driver: its trials died with it; its two agents (dashboard,
    # runtime env) notice the dead raylet and exit about a minute later (README, "What survives what").
    while _alive(ray_processes) and time.monotonic() - killed_at < 120:
        time.sleep(1)
    assert not _alive(ray_processes), "Ray processes outlived the killed driver by 2 minutes"
