"""benchmarks/vit_b16.py at --scale tiny: the issue-17 pipeline runs end to end on CPU and its JSON holds
every figure, the goals, the settings it ran with and where it came from."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from distlap.config import LaplaceConfig
from helpers import ROOT, run_benchmark

FIGURES = {
    "finetune_images_per_s",
    "finetune_peak_gib",
    "fit_s",
    "fit_peak_gib",
    "eval_s",
    "eval_peak_gib",
    "protocol_s",
    "protocol_peak_gib",
    "robustness_s",
    "robustness_peak_gib",
    "glm_tasks",
    "subsets",
    "coalitions",
    "nn_eval_s",
    "nn_samples",
    "lora_vit_s_images_per_s",
    "lora_vit_s_peak_gib",
    "goals",
    "verdicts",
}


@pytest.mark.slow
def test_tiny_scale_runs_and_writes_its_figures_with_provenance(tmp_path):
    args = ("--scale", "tiny", "--nn", "--glm-tasks", "2", "--out", str(tmp_path))
    run = run_benchmark("vit_b16.py", *args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = tmp_path.glob("vit_b16-*.json")
    record = json.loads(path.read_text())
    figures = record["figures"]
    assert set(figures) >= FIGURES, FIGURES - set(figures)
    assert figures["subsets"] == 16 and figures["coalitions"] == 2**12  # 12 blocks, 3 groups, all
    laplace = record["settings"]["config"]["laplace"]
    assert figures["nn_samples"] == record["settings"]["nn_samples"] * laplace["n_sample_sets"] == 4 * 3
    stages = ("finetune_images_per_s", "fit_s", "eval_s", "protocol_s", "robustness_s")
    assert all(figures[k] > 0 for k in (*stages, "lora_vit_s_images_per_s"))
    assert figures["glm_tasks"] == 2 and figures["refine_steps"] >= 1  # sharded glm, a real refinement
    for what in ("protocol: temperature", "robustness: ", "evaluation, glm, fp32, 2 tasks"):
        assert what in run.stdout
    assert figures["eval_peak_gib"] is None and "n/a (CPU)" in run.stdout  # no CUDA here
    refused = run_benchmark("vit_b16.py", "--glm-tasks", "-1", cwd=tmp_path)
    assert refused.returncode == 2 and "--glm-tasks must be 0" in refused.stderr
    assert set(figures["verdicts"]) == set(figures["goals"]) == {"eval_s", "lora_vit_s_images_per_s"}
    assert record["settings"]["scale"] == "tiny" and record["settings"]["n_test"] == 64
    assert laplace["estimator"] == "mc" and laplace["predictive"] == "glm"  # the config's estimator, glm
    prov = record["provenance"]
    assert len(prov["git_commit"]) == 40 and prov["packages"]["torch"] and prov["device"].startswith("cpu")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert prov["git_commit"] == head.stdout.strip()  # this checkout's code was measured


def test_full_scale_bootstraps_the_shapley_values_as_a_trial_does(monkeypatch):
    """No override of laplace.shapley_bootstrap at full scale: the trial's default (issue 24)."""
    spec = importlib.util.spec_from_file_location("vit_b16", ROOT / "benchmarks" / "vit_b16.py")
    vit_b16 = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vit_b16", vit_b16)  # its dataclasses look their module up
    spec.loader.exec_module(vit_b16)
    cfg = vit_b16.trial_config(vit_b16.SCALES["full"], ROOT / "b16", ROOT / "data")
    assert cfg.laplace.shapley_bootstrap == LaplaceConfig().shapley_bootstrap == 200
