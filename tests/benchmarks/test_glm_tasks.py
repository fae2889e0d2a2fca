"""benchmarks/glm_tasks.py --quick: the default trial's glm passes as 1 and 2 Ray tasks, timed side by
side, end with the one-line summary and write their JSON (figures, settings, provenance) twice."""

from __future__ import annotations

import json
import re

import pytest

from helpers import run_benchmark

LINE = re.compile(r"glm tasks: 1 -> (\d+\.\d\d) s, 2 -> (\d+\.\d\d) s, ratio (\d+\.\d\d)x")


@pytest.mark.slow
def test_quick_run_prints_the_ratio_and_writes_its_json(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    run = run_benchmark("glm_tasks.py", "--quick", "--out", str(out), "--results", str(results), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    match = LINE.fullmatch(run.stdout.strip().splitlines()[-1])
    assert match, run.stdout[-1000:]
    (path,) = out.glob("glm_tasks-*.json")
    assert (results / path.name).read_text() == path.read_text()
    record = json.loads(path.read_text())
    assert record["settings"]["repeats"] == 1 and record["settings"]["tasks"] == [1, 2]
    assert "git_commit" in record["provenance"] and record["provenance"]["packages"]
    figures = record["figures"]
    one, two = figures["median_s"]["1"], figures["median_s"]["2"]
    assert figures["ratio"] == pytest.approx(one / two)
    # the printed line is the JSON's figures rounded (the ratio is not recomputed from rounded seconds:
    # at --quick's ~0.5 s a 0.005 s rounding moves it by 1-2 %)
    assert match.groups() == (f"{one:.2f}", f"{two:.2f}", f"{one / two:.2f}")
    assert figures["max_abs_prob_difference"]["2"] < 1e-6  # the shards' table is the one task's
