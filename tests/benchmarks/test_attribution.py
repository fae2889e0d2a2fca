"""benchmarks/attribution.py --quick: the real attribution call on a tiny synthetic GLM pass, bootstrap on;
it ends with its one line and writes its JSON (figures, settings, provenance) twice."""

from __future__ import annotations

import json
import re

import pytest

from helpers import run_benchmark

LINE = re.compile(r"attribution: coalitions=16 examples=300 classes=10 bootstrap=20 seconds=\d+\.\d{2}")


@pytest.mark.slow
def test_quick_run_prints_its_line_and_writes_its_json(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    args = ("--quick", "--out", str(out), "--results", str(results))
    run = run_benchmark("attribution.py", *args, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert LINE.fullmatch(run.stdout.strip().splitlines()[-1]), run.stdout[-500:]
    (path,) = out.glob("attribution-*.json")
    assert (results / path.name).read_text() == path.read_text()
    record = json.loads(path.read_text())
    assert record["settings"]["bootstrap"] == 20 and record["settings"]["blocks"] == 4
    assert "git_commit" in record["provenance"] and record["provenance"]["packages"]
    figures = record["figures"]
    assert figures["method"] == "exact" and figures["coalitions"] == 16 and figures["seconds"] > 0
    for entry in figures["values"].values():
        assert abs(entry["efficiency_gap"]) < 1e-12  # exact Shapley values sum to v(all)
        assert all(lo <= hi for lo, hi in zip(entry["shapley_low"], entry["shapley_high"], strict=True))
