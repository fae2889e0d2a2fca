"""benchmarks/inference_coverage.py --quick: the simulation runs the real inference code end to end at a
tiny size, ends with one line per design and writes its JSON (figures, settings, provenance) twice."""

from __future__ import annotations

import json
import re

import pytest

from helpers import run_benchmark

LINE = re.compile(
    r"design=(single|crossed|nested) coverage_ece=[01]\.\d{3} coverage_nll=[01]\.\d{3} fwer=[01]\.\d{3} "
    r"power10=[01]\.\d{3} power18=[01]\.\d{3}"
)


@pytest.mark.slow
def test_quick_run_prints_one_line_per_design_and_writes_its_json(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    run = run_benchmark(
        "inference_coverage.py", "--quick", "--out", str(out), "--results", str(results), cwd=tmp_path
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-3:]
    assert [LINE.fullmatch(line).group(1) for line in last] == ["single", "crossed", "nested"], last
    (path,) = out.glob("inference_coverage-*.json")
    assert (results / path.name).read_text() == path.read_text()
    record = json.loads(path.read_text())
    assert record["settings"]["reps"] == 4 and record["settings"]["world"]["n_test"] == 1000
    assert "git_commit" in record["provenance"] and record["provenance"]["packages"]
    summary = record["figures"]["summary"]
    assert summary["crossed"]["design_detected"] == ["crossed"] and summary["nested"]["design_detected"] == [
        "nested"
    ]
    assert 0.02 < record["figures"]["truth"]["mean_delta"]["ece"] < 0.04  # the planted effect, Δ_ECE ≈ 0.03
