"""benchmarks/map_convergence.py on a tiny trial: one line per (method, λ), a JSON with every figure, the
settings and provenance; each method's figures are what its own numbers say (L-BFGS lowers the objective
from θ̂, a longer Adam lowers it from the same start)."""

from __future__ import annotations

import json
import re

import pytest

from helpers import run_benchmark, tiny_trial

LINE = re.compile(
    r"map_convergence: method=(adam|adam_long|adam\+adam|adam\+lbfgs) lambda=(\S+) iterations=(\d+) "
    r"seconds=[\d.]+ stationarity=\S+ objective=\S+"
)


@pytest.mark.slow
def test_tiny_run_prints_every_method_and_writes_its_json(tmp_path, fake_fmnist_dir, tiny_vit_dir):
    args = ["--lambdas", "10", "1000", "--lbfgs-steps", "20", "--long", "2", "--refine-epochs", "3"]
    trial = [*tiny_trial(fake_fmnist_dir, tiny_vit_dir), "data.max_train=120"]
    run = run_benchmark("map_convergence.py", *args, "--out", str(tmp_path), *trial, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [LINE.fullmatch(x) for x in run.stdout.splitlines() if x.startswith("map_convergence: method")]
    assert all(lines) and len(lines) == 8
    assert {(m.group(1), m.group(2)) for m in lines} == {
        (method, lam) for method in ("adam", "adam_long", "adam+adam", "adam+lbfgs") for lam in ("10", "1000")
    }
    (path,) = tmp_path.glob("map_convergence-*.json")
    record = json.loads(path.read_text())
    for lam in ("10", "1000"):
        f = record["figures"][lam]
        assert f["adam"]["iterations"] == 2 * 4  # 2 epochs of 4 batches (120 images, batch 32)
        assert f["adam_long"]["iterations"] == 2 * f["adam"]["iterations"]
        assert f["adam+adam"]["iterations"] == 3 and 1 <= f["adam+lbfgs"]["iterations"] <= 20
        assert f["adam+lbfgs"]["objective"] < f["adam"]["objective"]  # L-BFGS descends from θ̂
        assert all(f[m]["stationarity"] > 0 for m in f)
    assert record["figures"]["1000"]["adam+lbfgs"]["stationarity"] <= 1e-2  # a strong prior: the mode
    prov = record["provenance"]
    assert len(prov["git_commit"]) == 40 and prov["packages"]["torch"]
    assert record["settings"]["lambdas"] == [10.0, 1000.0] and record["settings"]["tolerance"] == 0.01
