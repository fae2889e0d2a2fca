"""The PEFT methods study end to end: ``python sweeps/peft_methods.py --smoke-test`` in a subprocess (a
grid of 3 methods x 2 tiny backbones on a local Ray), then its summary, trial files, MLflow runs and
the report: the consolidated tables' columns, the tuned-parameter share against peft's own count of
the saved adapters, and the composite plots."""

import collections
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from mlflow import MlflowClient
from peft import PeftModel

from analysis.peft_figures import FIGURES
from analysis.peft_tables import COLUMNS
from distlap.finetune.backbones import load_backbone
from distlap.sweep.tracking import KIND_TAG, SUBSET_TAG

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("peft") / "sweep"
    cmd = [sys.executable, str(ROOT / "sweeps" / "peft_methods.py"), "--smoke-test", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"smoke sweep failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def summary(sweep_dir) -> pd.DataFrame:
    return pd.read_csv(sweep_dir / "summary.csv")


def _result(sweep_dir: Path, trial_id: str) -> dict:
    return json.loads((sweep_dir / "trials" / trial_id / "trial_result.json").read_text())


def test_every_grid_point_runs_once_with_its_setting(sweep_dir, summary):
    assert len(summary) == 6 and (summary.status == "ok").all()
    points = set(zip(summary["setting"], summary["peft.method"], strict=True))
    assert points == {
        (s, m) for s in ("vit_tiny_fmnist", "vit_mini_fmnist") for m in ("norm", "lora", "hybrid")
    }
    backbones = {"vit_tiny_fmnist": "distlap/vit-tiny-fmnist", "vit_mini_fmnist": "distlap/vit-mini-fmnist"}
    for row in summary.to_dict("records"):
        config = _result(sweep_dir, row["trial_id"])["config"]
        assert config["peft"]["method"] == row["peft.method"]
        assert config["backbone"]["name"] == backbones[row["setting"]]
        assert config["data"]["classes"] == [
            5,
            6,
            7,
            8,
            9,
        ]  # the classes the backbones were not pretrained on
    for key in (
        "map/test/accuracy",
        "map/test/ece",
        "map/test/nll",
        "map/test/brier",
        "bayes/test/ece",
        "tuned_params",
        "tuned_params_pct",
        "time_per_epoch_s",
    ):
        assert summary[key].notna().all(), key


def test_tuned_params_pct_is_peft_own_count_of_the_saved_adapter(sweep_dir, summary):
    for row in summary.to_dict("records"):
        config = _result(sweep_dir, row["trial_id"])["config"]
        backbone, _ = load_backbone(config["backbone"]["name"], 5, seed=config["seed"])
        model = PeftModel.from_pretrained(
            backbone, sweep_dir / "trials" / row["trial_id"] / "adapter", is_trainable=True
        )
        trainable, total = model.get_nb_trainable_parameters()
        assert row["tuned_params"] == trainable
        assert row["tuned_params_pct"] == pytest.approx(100 * trainable / total, rel=1e-9)
    pct = summary.groupby("peft.method")["tuned_params_pct"].max()
    assert pct["norm"] < pct["lora"] and pct["hybrid"] > pct["norm"]  # LoRA factors outnumber LayerNorms


def test_report_tables_have_the_seed_columns(sweep_dir, summary):
    report = sweep_dir / "report"
    markdown = (report / "peft_methods.md").read_text()
    header = "| " + " | ".join(COLUMNS) + " |"
    assert markdown.count(header) == 2  # one table per (backbone, dataset)
    tables = sorted(report.glob("table_*.csv"))
    assert len(tables) == 2
    for path in tables:
        table = pd.read_csv(path)
        assert table.columns[0] == "Method" and set(COLUMNS) <= set(table.columns)
        assert list(table["Method"]) == ["Norm", "LoRA", "Hybrid"]
        assert (table["n_seeds"] == 1).all()
    trials = summary.set_index(["setting", "peft.method"])
    tiny = pd.read_csv(report / "table_distlap-vit-tiny-fmnist_fashion-mnist.csv").set_index("Method")
    for method, name in (("norm", "Norm"), ("lora", "LoRA"), ("hybrid", "Hybrid")):
        row = trials.loc[("vit_tiny_fmnist", method)]
        assert tiny.loc[name, "Tuned Params %"] == pytest.approx(row["tuned_params_pct"])
        assert tiny.loc[name, "Acc@1"] == pytest.approx(100 * row["map/test/accuracy"])
        assert tiny.loc[name, "ECE"] == pytest.approx(row["map/test/ece"])
    assert "## Cross-setting trends" in markdown and "highest accuracy" in markdown


def test_report_draws_the_composite_plots(sweep_dir):
    report = sweep_dir / "report"
    for name in FIGURES:
        image = matplotlib.image.imread(report / f"{name}.png")
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05  # not blank


def test_sweep_and_trials_are_tracked_in_mlflow(sweep_dir, summary):
    client = MlflowClient(f"sqlite:///{sweep_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("distlap-peft-methods")
    runs = collections.defaultdict(list)
    for run in client.search_runs([experiment.experiment_id]):
        runs[run.data.tags[KIND_TAG]].append(run)
    (sweep,), trials, subsets = runs["sweep"], runs["trial"], runs["subset"]
    assert len(trials) == 6 and all(r.info.status == "FINISHED" for r in trials)
    assert all(r.data.tags["mlflow.parentRunId"] == sweep.info.run_id for r in trials)
    assert {r.data.metrics["tuned_params_pct"] for r in trials} == set(summary.tuned_params_pct)
    assert sorted(r.data.tags[SUBSET_TAG] for r in subsets) == ["all"] * 6  # laplace: true
    assert any(a.path == "report" for a in client.list_artifacts(sweep.info.run_id))
