"""benchmarks/store_load.py --quick: a real sweep of 4 tiny trials, 2 at once, on the default SQLite
stores; every run, metric, artifact and Optuna trial is there once, in one line and its JSON."""

from __future__ import annotations

import json
import re

import pytest

from helpers import run_benchmark

LINE = re.compile(
    r"store_load: trials=4 concurrency=2 lost=(\d+) duplicated=(\d+) locked_errors=(\d+) "
    r"seconds=\d+ store=sqlite"
)


@pytest.mark.slow
def test_quick_run_finds_every_write_once_and_writes_its_json(tmp_path):
    out, results, sweeps = tmp_path / "runs", tmp_path / "results", tmp_path / "sweeps"
    args = ("--quick", "--sweeps", str(sweeps), "--out", str(out), "--results", str(results))
    run = run_benchmark("store_load.py", *args, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert LINE.fullmatch(last).groups() == ("0", "0", "0"), last
    (path,) = out.glob("store_load-*.json")
    assert (results / path.name).read_text() == path.read_text()
    record = json.loads(path.read_text())
    (sqlite,) = record["figures"]["stores"]
    assert sqlite["exit_code"] == 0 and sqlite["failed_trials"] == 0
    # one sweep run, 4 trial runs and 4 Optuna trials, 7 subset runs per trial (3 blocks + 4 groups)
    assert sqlite["checked"]["sweep run"] == 1 and sqlite["checked"]["trial run"] == 4
    assert sqlite["checked"]["subset run"] == 4 * 7 and sqlite["checked"]["optuna trial"] == 4
    assert sqlite["checked"]["artifact"] == 2 + 4 * (2 + 7)
    assert "git_commit" in record["provenance"]
    assert (sweeps / "sqlite" / "mlflow.db").is_file() and (sweeps / "sqlite" / "optuna.db").is_file()
