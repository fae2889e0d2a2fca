"""The sweep report, built from the session's shared smoke sweep (``python sweeps/layerwise.py
--smoke-test``, 4 trials: configurations A and B, each with seeds 0 and 1; tests/conftest.py), read back
from its files and MLflow."""

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from scipy import stats

from analysis import aggregate
from analysis.collect import ReportError, load_folder
from analysis.mlflow_io import load_mlflow
from analysis.optuna_views import optuna_figures
from analysis.report import build_report, main, write_report
from distlap import names

DELTA = names.delta("subset", "test")
VAL_DELTA = names.delta("subset", "val")
LOW, HIGH = names.interval(DELTA)
TEST = names.scores("subset", "test")

ROOT = Path(__file__).resolve().parents[2]
FILES = [
    "lead_table.csv",
    "summary_table.csv",
    "subset_ranking.csv",
    "trials.csv",
    "analysis_summary.json",
    "report.html",
    "shapley.png",
    "best_k.png",
    "delta_ece_ranked.png",
    "delta_ece_sequential.png",
    "ece_comparison.png",
    "answer_by_setting.png",
    "reliability_map.png",
    "reliability_all.png",
    "reliability_best_layer.png",
    "optuna_history.png",
    "optuna_contour.png",
    "optuna_importances.png",
]
FIGURE_PX = (450, 800)  # analysis.figures: 8 x 4.5 in at 100 dpi (height, width)
RELIABILITY_PX = (520, 420)  # distlap.plots.reliability_diagram: 4.2 x 5.2 in at 100 dpi
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep_dir(smoke_sweep) -> Path:
    """The session's shared smoke sweep (tests/conftest.py): 4 trials, configurations A and B x seeds 0, 1."""
    return smoke_sweep.out


@pytest.fixture(scope="module")
def report(sweep_dir) -> Path:
    return build_report(sweep_dir, log=lambda msg: None)


@pytest.fixture(scope="module")
def results(sweep_dir) -> dict[int, dict]:
    """Each trial's layer_wise_results.json and its settings, by Optuna trial number."""
    trials = pd.read_csv(sweep_dir / "summary.csv")
    return {
        int(t.optuna_trial): {
            "json": json.loads((sweep_dir / "trials" / t.trial_id / "layer_wise_results.json").read_text()),
            "config": (t["train.prior_precision"], t["peft.rank"]),
            "trial_id": t.trial_id,
        }
        for _, t in trials.iterrows()
    }


def copy_sweep(src: Path, dst: Path) -> Path:
    """The sweep's records without the bulky parts (adapters, Ray state, MLflow artifacts)."""
    bulky = shutil.ignore_patterns("adapter", "ray_results", "mlartifacts", "plots", "report")
    return Path(shutil.copytree(src, dst, ignore=bulky))


def _summary(report: Path) -> dict:
    return json.loads((report / "analysis_summary.json").read_text())


def test_every_file_is_written_and_logged_to_mlflow(report, sweep_dir):
    assert sorted(p.name for p in report.iterdir()) == sorted(FILES)
    found = _summary(report)
    assert found["figures"]["optuna_importances"] == "optuna_importances.png"  # 4 finished trials
    run_id = found["mlflow"]["parent_run_id"]
    client = MlflowClient(f"sqlite:///{sweep_dir / 'mlflow.db'}")
    assert client.get_run(run_id).data.tags["distlap.kind"] == "sweep"
    assert sorted(Path(a.path).name for a in client.list_artifacts(run_id, "report")) == sorted(FILES)


def test_ranking_follows_the_json_results(report, results):
    """Reference configuration = best mean validation objective; its subsets ranked by the mean over its
    seeds of the VALIDATION Δ_ECE in each trial's layer_wise_results.json (test where the results carry
    none, and ``ranked_on`` says so), reported with their test Δ_ECE."""
    found = _summary(report)
    ref = found["reference_config"]
    seeds = [r["json"] for r in results.values() if r["trial_id"] in ref["trial_ids"]]
    assert len(seeds) == ref["n_seeds"] >= 1
    subsets = list(seeds[0]["subsets"])
    mean = {n: np.mean([s["subsets"][n]["metrics"][DELTA] for s in seeds]) for n in subsets}
    on_val = all(VAL_DELTA in s["subsets"][n]["metrics"] for s in seeds for n in subsets)
    key = VAL_DELTA if on_val else DELTA
    by = {n: np.mean([s["subsets"][n]["metrics"][key] for s in seeds]) for n in subsets}
    ranked = pd.read_csv(report / "subset_ranking.csv")
    assert set(ranked.subset) == set(mean) and (ranked.configuration == ref["configuration"]).all()
    assert [by[s] for s in ranked.subset] == pytest.approx(sorted(by.values(), reverse=True), abs=1e-6)
    assert ranked[DELTA].tolist() == pytest.approx([mean[s] for s in ranked.subset])
    assert ranked["rank"].tolist() == list(range(1, len(mean) + 1))
    assert (
        set(ranked["ranked_on"]) == {"validation"}
        if on_val
        else ranked["ranked_on"].iloc[0].startswith("test")
    )
    layers = ranked[ranked.kind == "layer"]
    assert found["best_single_layer"]["subset"] == layers.subset.iloc[0]
    assert found["all"][DELTA] == pytest.approx(mean["all"])


def test_seed_aggregation_and_confidence_intervals(report, results):
    table = pd.read_csv(report / "summary_table.csv")
    assert {DELTA, LOW, HIGH, "ci_method", f"{DELTA}_std", "n_seeds", *TEST.values()} <= set(table.columns)
    assert (table[LOW] <= table[DELTA]).all() and (table[DELTA] <= table[HIGH]).all()
    assert sorted(table.groupby("configuration").n_seeds.first()) == [2, 2]
    for _, row in table.iterrows():
        config = (row["train.prior_precision"], row["peft.rank"])
        runs = [r["json"]["subsets"][row.subset] for r in results.values() if r["config"] == config]
        assert row.n_seeds == len(runs)
        deltas = [r["metrics"][DELTA] for r in runs]
        assert row[DELTA] == pytest.approx(np.mean(deltas))
        assert row[TEST["ece"]] == pytest.approx(np.mean([r["metrics"][TEST["ece"]] for r in runs]))
        if len(runs) == 1:  # the paired bootstrap interval of the one run
            assert (row[LOW], row[HIGH]) == pytest.approx((runs[0]["metrics"][LOW], runs[0]["metrics"][HIGH]))
            assert np.isnan(row[f"{DELTA}_std"])
            continue
        assert row[f"{DELTA}_std"] == pytest.approx(np.std(deltas, ddof=1))
        test_sets = {r["json"]["inference"]["test_set"] for r in results.values() if r["config"] == config}
        var = np.var(deltas, ddof=1) / len(runs)
        if len(test_sets) == 1:  # one shared test set: + the mean within-seed variance (a bound)
            z = stats.norm.ppf(0.975)
            var += np.mean([((r["metrics"][HIGH] - r["metrics"][LOW]) / (2 * z)) ** 2 for r in runs])
        assert ("crossed" if len(test_sets) == 1 else "nested") in row.ci_method
        half = stats.t.ppf(0.975, len(runs) - 1) * np.sqrt(var)
        assert (row[LOW], row[HIGH]) == pytest.approx((row[DELTA] - half, row[DELTA] + half), abs=1e-9)


def test_findings(report, sweep_dir):
    found = _summary(report)
    study = optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    best = found["optuna_best"]
    assert best["optuna_trial"] == study.best_trial.number
    assert best["objective"] == pytest.approx(study.best_value)
    assert best["params"] == study.best_params
    cmp = found["all_vs_best_single_layer"]
    assert "paired" in cmp["method"]  # the trials saved their replicates
    assert cmp["cis_separate"] is (cmp["low"] > 0 or cmp["high"] < 0)
    assert cmp["difference"] == pytest.approx(
        found["all"][DELTA] - found["best_single_layer"][DELTA], abs=1e-6
    )
    assert found["trials"] == {
        "planned": 4,
        "started": 4,
        "with_results": 4,
        "not_started": 0,
        "by_status": {"ok": 4},
        "missing": [],
        "complete": True,
    }
    assert len(found["cost"]["per_trial"]) == 4 and found["cost"]["mean_per_trial"][names.FIT_TIME] > 0
    assert found["best_group"]["subset"] in {"early", "mid", "late"}


def test_html_embeds_every_image(report):
    page = (report / "report.html").read_text(encoding="utf-8")
    pngs = sorted(report.glob("*.png"))
    for png in pngs:
        assert f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" in page, png.name
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "http://" not in page and "https://" not in page and "<script" not in page  # opens offline
    assert "not drawn" not in page and "Subsets ranked by Δ_ECE" in page


def test_pngs_are_images_of_the_expected_size(report):
    for png in report.glob("*.png"):
        image = mpimg.imread(png)
        expected = RELIABILITY_PX if png.name.startswith("reliability") else FIGURE_PX
        assert image.shape[:2] == expected, png.name
        assert image[..., :3].std() > 0.05, f"{png.name} is blank"


def test_report_from_mlflow_matches_the_folder(report, sweep_dir, tmp_path):
    uri = f"sqlite:///{sweep_dir / 'mlflow.db'}"
    assert (
        main(
            [
                "--tracking-uri",
                uri,
                "--experiment",
                "distlap-layerwise",
                "--report-dir",
                str(tmp_path),
                "--no-mlflow",
            ]
        )
        == 0
    )
    numeric = ["n_seeds", "rank", DELTA, LOW, HIGH, TEST["ece"], TEST["nll"]]
    columns = ["configuration", "subset", *numeric]
    from_folder, from_mlflow = (pd.read_csv(d / "summary_table.csv")[columns] for d in (report, tmp_path))
    pd.testing.assert_frame_equal(from_mlflow, from_folder)
    assert load_mlflow(uri, "distlap-layerwise").study is not None


def test_partial_sweep_reports_what_exists_and_what_is_missing(sweep_dir, results, tmp_path):
    """One trial lost its results (and two planned trials never started): the rest is reported."""
    partial = copy_sweep(sweep_dir, tmp_path / "partial")
    lost = results[1]["trial_id"]  # one seed of the second configuration
    (partial / "trials" / lost / "layer_wise_results.json").unlink()
    cfg = yaml.safe_load((partial / "config.yaml").read_text())
    cfg["search"]["num_samples"] = 6
    (partial / "config.yaml").write_text(yaml.safe_dump(cfg))
    report = write_report(load_folder(partial), partial / "report", log_mlflow=False, log=lambda m: None)
    found = _summary(report)
    counts = found["trials"]
    assert counts["missing"] == [{"optuna_trial": 1, "trial_id": lost, "status": "ok", "error": None}]
    assert (counts["with_results"], counts["not_started"], counts["complete"]) == (3, 2, False)
    table = pd.read_csv(report / "summary_table.csv")
    lost_config = (
        table.configuration
        == table.configuration[table.trial_ids.str.contains(results[3]["trial_id"])].iloc[0]
    )
    assert (table.n_seeds[lost_config] == 1).all() and (table.n_seeds[~lost_config] == 2).all()
    assert not table.trial_ids.str.contains(lost).any()
    page = (report / "report.html").read_text(encoding="utf-8")
    assert "this report is partial" in page and lost in page and "2 of 6 planned trials not started" in page
    assert all((report / f).is_file() for f in FILES)


def test_no_results_yet_is_a_clear_error(sweep_dir, tmp_path):
    empty = copy_sweep(sweep_dir, tmp_path / "empty")
    for results_file in empty.glob("trials/*/layer_wise_results.json"):
        results_file.unlink()
    no_results = (
        r"no trial of sweep 'smoke' .* has layer-wise results yet \(4 planned, 4 started: {'ok': 4}\)"
    )
    with pytest.raises(ReportError, match=no_results):
        build_report(empty, log_mlflow=False)
    fresh = tmp_path / "fresh"  # interrupted before its first trial: an empty study
    fresh.mkdir()
    cfg = yaml.safe_load((sweep_dir / "config.yaml").read_text())
    cfg["search"]["storage"] = f"sqlite:///{fresh / 'optuna.db'}"
    (fresh / "config.yaml").write_text(yaml.safe_dump(cfg))
    optuna.create_study(study_name=cfg["search"]["study_name"], storage=cfg["search"]["storage"])
    with pytest.raises(ReportError, match=r"\(4 planned, 0 started: none\)"):
        build_report(fresh, log_mlflow=False)


def test_not_a_sweep_folder(tmp_path, sweep_dir):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "report.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"error: {tmp_path} is not a sweep output folder (no config.yaml); pass the --output folder of "
        "`python sweeps/layerwise.py` (it holds config.yaml, optuna.db, mlflow.db and trials/), "
        "or --tracking-uri URI --experiment NAME"
    )
    trial = next((sweep_dir / "trials").iterdir())
    with pytest.raises(ReportError, match="is one trial's folder, not a sweep output folder"):
        build_report(trial)
    with pytest.raises(ReportError, match="no such folder"):
        build_report(tmp_path / "nowhere")
    with pytest.raises(ReportError, match="no MLflow experiment 'nope'"):
        load_mlflow(f"sqlite:///{sweep_dir / 'mlflow.db'}", "nope")


def test_optuna_views_need_enough_trials(tmp_path):
    """On a study with enough finished trials every view is drawn; on too few it says why instead."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(
        lambda t: (
            np.log10(t.suggest_float("train.prior_precision", 1, 1e3, log=True)) ** 2
            + t.suggest_categorical("peft.rank", [2, 4, 8]) / 8
        ),
        n_trials=8,
    )
    views = optuna_figures(study, "bayes/val/nll", tmp_path)
    assert all(isinstance(p, Path) and mpimg.imread(p).shape[:2] == FIGURE_PX for p in views.values())
    few = optuna.create_study()
    few.optimize(lambda t: t.suggest_float("train.prior_precision", 1, 10), n_trials=2)
    views = optuna_figures(few, "bayes/val/nll", tmp_path / "few")
    assert isinstance(views["optuna_history"], Path)
    assert views["optuna_importances"] == "needs at least 4 finished trials (has 2)"
    assert views["optuna_contour"] == "needs at least 3 finished trials (has 2)"
    assert optuna_figures(None, "m", tmp_path)["optuna_contour"] == "the Optuna study could not be read"


def test_line_configs_one_per_rank_at_its_best_lambda():
    summary = pd.DataFrame(
        {"configuration": ["a", "b", "c"], "train.prior_precision": [1.0, 2.0, 3.0], "peft.rank": [2, 2, 4]}
    )  # ordered best objective first
    assert aggregate.line_configs(summary, ["train.prior_precision", "peft.rank"]) == ["a", "c"]
    assert aggregate.config_label({"train.prior_precision": 43.117, "peft.rank": 4}) == "λ=43.12, r=4"
