"""The PEFT-methods report: tables, trends and figures on synthetic trial frames (numbers checked by
hand or against numpy), and the whole report on a sweep folder written the way the sweep writes it
(config.yaml, optuna.db, trials/<id>/trial_result.json, mlflow.db) without running any training."""

import json
import math

import matplotlib.image as mpimg
import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from analysis.collect import ReportError
from analysis.peft_figures import (
    accuracy_per_param_figure,
    accuracy_vs_params_figure,
    ece_vs_params_figure,
    time_per_epoch_figure,
    write_figures,
)
from analysis.peft_methods import build_peft_report, main, trends
from analysis.peft_tables import (
    ACC,
    COLUMNS,
    ECE,
    MAP,
    TRIAL_COLUMNS,
    consolidated_tables,
    load_peft_trials,
    method_summary,
    numeric_tables,
    setting_file,
    table_captions,
)
from distlap.config import to_yaml
from distlap.names import METHOD
from distlap.sweep.search import distribution
from distlap.sweep.settings import SweepConfig, TrackingConfig, trial_config
from distlap.sweep.space import SearchConfig, SearchParam
from distlap.sweep.study import storage
from distlap.sweep.tracking import SweepTracker

A = ("org/vit-tiny", "cifar10", 1)
B = ("org/vit-small", "cifar100", 10)
TITLE_A, TITLE_B = "vit-tiny (CIFAR-10, 1 epoch)", "vit-small (CIFAR-100, 10 epochs)"
# (method, setting, seed, accuracy, ece, tuned params %, time per epoch)
ROWS_A = [
    ("norm", A, 0, 0.940, 0.050, 0.20, 10.0),
    ("norm", A, 1, 0.950, 0.070, 0.20, 12.0),
    ("lora", A, 0, 0.960, 0.070, 5.0, 15.0),
    ("lora", A, 1, 0.962, 0.074, 5.0, 16.0),
    ("hybrid", A, 0, 0.930, 0.080, 0.19, 11.0),
    ("hybrid", A, 1, 0.932, 0.082, 0.19, 11.5),
]
ROWS_B = [
    ("norm", B, 0, 0.893, 0.048, 0.27, 1524.0),
    ("lora", B, 0, 0.908, 0.060, 2.82, 2011.0),
    ("hybrid", B, 0, 0.880, 0.070, 0.26, 1848.0),
]
FIGURE_PX = (450, 800)  # analysis.figures.save: 8 x 4.5 in at 100 dpi (height, width)


def frame(rows, status="ok") -> pd.DataFrame:
    """A load_peft_trials-like frame (hybrid first, to check the tables reorder)."""
    out = [
        {
            "trial_id": f"t{i}",
            "status": status,
            METHOD: m,
            "backbone.name": s[0],
            "data.dataset": s[1],
            "train.epochs": s[2],
            "seed": seed,
            ACC: acc,
            ECE: ece,
            MAP["nll"]: 0.3,
            MAP["brier"]: 0.1,
            "tuned_params": 100,
            "tuned_params_pct": pct,
            "time_per_epoch_s": t,
        }
        for i, (m, s, seed, acc, ece, pct, t) in enumerate(rows)
    ]
    trials = pd.DataFrame(out, columns=TRIAL_COLUMNS)
    return trials.sort_values(METHOD, kind="stable").reset_index(drop=True)


# --- tables --------------------------------------------------------------------------------------


def test_tables_have_exactly_the_five_columns_and_method_order():
    tables = consolidated_tables(frame(ROWS_A + ROWS_B))
    assert list(tables) == [(A[0], A[1]), (B[0], B[1])]
    for table in tables.values():
        assert list(table.columns) == COLUMNS
        assert COLUMNS == ["Method", "Tuned Params %", "Acc@1", "ECE", "Time/Epoch (s)"]
        assert list(table["Method"]) == ["Norm", "LoRA", "Hybrid"]


def test_cells_are_mean_and_sample_std_over_seeds():
    trials = frame(ROWS_A)
    table = consolidated_tables(trials)[(A[0], A[1])].set_index("Method")
    norm = trials[trials[METHOD] == "norm"]
    acc, ece = 100 * norm[ACC].to_numpy(), norm[ECE].to_numpy()
    assert table.loc["Norm", "Acc@1"] == f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f}%" == "94.50 ± 0.71%"
    assert table.loc["Norm", "ECE"] == f"{ece.mean():.3f} ± {ece.std(ddof=1):.3f}" == "0.060 ± 0.014"
    assert table.loc["LoRA", "Tuned Params %"] == "5.00 ± 0.00"
    assert table.loc["Hybrid", "Time/Epoch (s)"] == "11.2 ± 0.4"  # 3 significant digits of the smallest mean
    num = numeric_tables(trials)[(A[0], A[1])].set_index("Method")
    np.testing.assert_allclose(
        num.loc["Norm", ["Acc@1", "Acc@1_std"]].astype(float), [acc.mean(), acc.std(ddof=1)]
    )
    np.testing.assert_allclose(num.loc["LoRA", "Acc@1 / Tuned Params %"], np.mean([96.0 / 5, 96.2 / 5]))
    assert num.loc["Norm", "n_seeds"] == 2 and num.loc["Norm", "seeds"] == "0, 1"


def test_one_seed_shows_no_std_and_csv_layout():
    trials = frame(ROWS_B)
    table = consolidated_tables(trials)[(B[0], B[1])]
    assert table.iloc[0].tolist() == ["Norm", "0.27", "89.30%", "0.048", "1524"]
    num = numeric_tables(trials)[(B[0], B[1])]
    assert list(num.columns[:11]) == [
        "Method",
        "n_seeds",
        "seeds",
        "Tuned Params %",
        "Tuned Params %_std",
        "Acc@1",
        "Acc@1_std",
        "ECE",
        "ECE_std",
        "Time/Epoch (s)",
        "Time/Epoch (s)_std",
    ]
    assert num["Acc@1_std"].isna().all()
    assert table_captions(trials)[(B[0], B[1])].startswith(f"{TITLE_B}: mean ± std over 1 seed (0)")


def test_only_present_methods_and_ok_trials():
    failed = frame([("hybrid", A, 0, math.nan, math.nan, 0.19, 11.0)], status="failed")
    trials = pd.concat([frame(ROWS_A[:4]), failed], ignore_index=True)
    table = consolidated_tables(trials)[(A[0], A[1])]
    assert list(table["Method"]) == ["Norm", "LoRA"]


def test_several_epochs_split_a_backbone_dataset_pair():
    five = [(m, (A[0], A[1], 5), seed, acc + 0.01, ece, pct, t) for m, _, seed, acc, ece, pct, t in ROWS_A]
    trials = frame(ROWS_A + five)
    keys = list(consolidated_tables(trials))
    assert keys == [(A[0], A[1], 1), (A[0], A[1], 5)]
    assert list(method_summary(trials).drop_duplicates("title")["title"]) == [
        TITLE_A,
        "vit-tiny (CIFAR-10, 5 epochs)",
    ]
    assert setting_file(keys[1]) == "table_org-vit-tiny_cifar10_5ep.csv"
    assert (
        setting_file(("google/vit-base-patch16-224", "fashion_mnist"))
        == "table_google-vit-base-patch16-224_fashion-mnist.csv"
    )


# --- trends --------------------------------------------------------------------------------------

WINNERS_A = (
    f"{TITLE_A}: highest accuracy LoRA (96.10% vs 94.50% for Norm, 1.60 pp higher, above the seed "
    "std of 0.71 pp); lowest ECE Norm (0.060 vs 0.072 for LoRA, 0.012 lower, within seed noise, "
    "std 0.014)."
)


def test_trends_consistent_rankings():
    assert trends(frame(ROWS_A + ROWS_B)) == [
        WINNERS_A,
        f"{TITLE_B}: highest accuracy LoRA (90.80% vs 89.30% for Norm, 1.50 pp higher, one seed, noise not "
        "measured); lowest ECE Norm (0.048 vs 0.060 for LoRA, 0.012 lower, one seed, noise not measured).",
        "Accuracy ranking LoRA > Norm > Hybrid in every setting (consistent across scales).",
        "ECE ranking (lowest first) Norm < LoRA < Hybrid in every setting (consistent across scales).",
        "Tuned Params % per method across settings: Norm 0.20–0.27%, LoRA 2.82–5.00%, Hybrid 0.19–0.26%.",
        # Acc@1 / % per trial, then the mean: Hybrid 93.1/0.19 = 490.0 and 88.0/0.26 = 338.5
        "Accuracy per tuned parameter (Acc@1 points per Tuned Params %) is highest for Hybrid in every "
        "setting: Norm 330.7–472.5, LoRA 19.2–32.2, Hybrid 338.5–490.0.",
    ]


def test_trends_inconsistent_ranking():
    rows_b = [("norm", B, 0, 0.915, 0.048, 0.27, 1524.0), *ROWS_B[1:]]
    lines = trends(frame(ROWS_A + rows_b))
    assert lines[2] == (
        f"Accuracy ranking differs across settings: LoRA > Norm > Hybrid in {TITLE_A}; "
        f"Norm > LoRA > Hybrid in {TITLE_B}."
    )
    assert lines[3] == (
        "ECE ranking (lowest first) Norm < LoRA < Hybrid in every setting (consistent across scales)."
    )
    assert lines[1].startswith(f"{TITLE_B}: highest accuracy Norm (91.50% vs 90.80% for LoRA, 0.70 pp higher")


def test_trends_one_setting():
    assert trends(frame(ROWS_A)) == [
        WINNERS_A,
        f"Only one setting ({TITLE_A}): accuracy ranking LoRA > Norm > Hybrid, ECE ranking (lowest first) "
        "Norm < LoRA < Hybrid; no cross-setting comparison.",
        "Tuned Params % per method: Norm 0.20%, LoRA 5.00%, Hybrid 0.19%.",
        f"Accuracy per tuned parameter (Acc@1 points per Tuned Params %) is highest for Hybrid in {TITLE_A}: "
        "Norm 472.5, LoRA 19.2, Hybrid 490.0.",
    ]


def test_trends_one_method_and_accuracy_within_noise():
    only = trends(frame(ROWS_A[:2]))[0]
    assert only == f"{TITLE_A}: only Norm ran (Acc@1 94.50%, ECE 0.060); no comparison."
    close = [
        ("norm", A, 0, 0.950, 0.05, 0.2, 10.0),
        ("norm", A, 1, 0.960, 0.05, 0.2, 10.0),
        ("lora", A, 0, 0.955, 0.06, 5.0, 10.0),
        ("lora", A, 1, 0.957, 0.06, 5.0, 10.0),
    ]
    assert (
        "highest accuracy LoRA (95.60% vs 95.50% for Norm, 0.10 pp higher, within seed noise, std 0.71 pp)"
    ) in trends(frame(close))[0]


# --- figures -------------------------------------------------------------------------------------


def test_figures_plot_one_point_or_bar_per_setting_and_method(tmp_path):
    summary = method_summary(frame(ROWS_A + ROWS_B))
    for draw in (accuracy_vs_params_figure, ece_vs_params_figure):
        fig = draw(summary)
        assert [len(ax.containers) for ax in fig.axes] == [3, 3]  # one panel per dataset
        assert fig.axes[0].get_xscale() == "log"
        markers = [{c.lines[0].get_marker() for c in ax.containers} for ax in fig.axes]
        assert markers == [{"o"}, {"s"}]  # marker = backbone
    fig = accuracy_vs_params_figure(summary)
    np.testing.assert_allclose(
        sorted(c.lines[0].get_ydata()[0] for c in fig.axes[0].containers), [93.1, 94.5, 96.1]
    )
    for draw in (time_per_epoch_figure, accuracy_per_param_figure):
        assert [len(ax.patches) for ax in draw(summary).axes] == [3, 3]
    paths = write_figures(summary, tmp_path)
    assert sorted(paths) == [
        "accuracy_per_tuned_param",
        "accuracy_vs_tuned_params",
        "ece_vs_tuned_params",
        "time_per_epoch",
    ]
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert mpimg.imread(path).shape[:2] == FIGURE_PX


# --- the whole report on a sweep folder ----------------------------------------------------------

SPACE = {"peft.method": ["norm", "lora", "hybrid"], "seed": [0, 1, 2]}  # a grid of 9 runs


def _sweep_folder(out, *, ok: bool = True, mlflow: bool = False):
    """What the sweep leaves: config.yaml, optuna.db, trial results; 4 ok, 1 failed, 1 running trial."""
    out.mkdir(parents=True)
    space = {k: SearchParam(kind="choice", values=v) for k, v in SPACE.items()}
    cfg = SweepConfig(
        kind="peft_methods",
        name="peft-test",
        output_dir=str(out),
        search=SearchConfig(
            space=space,
            metric="map/val/nll",
            sampler="grid",
            storage=f"sqlite:///{out / 'optuna.db'}",
            study_name="peft-test",
        ),
        tracking=TrackingConfig(uri=f"sqlite:///{out / 'mlflow.db'}", experiment="peft-test"),
    )
    (out / "config.yaml").write_text(to_yaml(cfg))
    study = optuna.create_study(study_name="peft-test", storage=storage(cfg.search.storage))
    dists = {k: distribution(p) for k, p in cfg.search.space.items()}
    trials = [
        ("norm", 0, "ok"),
        ("norm", 1, "ok"),
        ("lora", 0, "ok"),
        ("lora", 1, "ok"),
        ("hybrid", 0, "failed"),
        ("hybrid", 1, "running"),
    ]
    for i, (method, seed, status) in enumerate(trials):
        status = status if ok or status != "ok" else "failed"
        params, tid = {"peft.method": method, "seed": seed}, f"trial{i}"
        state = {
            "ok": optuna.trial.TrialState.COMPLETE,
            "failed": optuna.trial.TrialState.FAIL,
            "running": optuna.trial.TrialState.RUNNING,
        }[status]
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=dists,
                state=state,
                value=0.5 if status == "ok" else None,
                user_attrs={"ray_trial_id": tid},
            )
        )
        if status == "running":
            continue
        metrics = {
            "tuned_params": 10,
            "tuned_params_pct": 1.0 if method == "norm" else 4.0,
            "time_per_epoch_s": 2.0 + seed,
        }
        if status == "ok":
            metrics.update(
                {
                    f"map/{split}/{m}": v
                    for split in ("val", "test")
                    for m, v in (("accuracy", 0.8 + 0.01 * seed), ("ece", 0.05), ("nll", 0.6), ("brier", 0.3))
                }
            )
        result = {
            "status": status,
            "message": "" if status == "ok" else "non-finite loss",
            "metrics": metrics,
            "config": trial_config(cfg, params).model_dump(mode="json"),
            "provenance": {},
        }
        (out / "trials" / tid).mkdir(parents=True)
        (out / "trials" / tid / "trial_result.json").write_text(json.dumps(result))
    if mlflow:
        SweepTracker.open(
            cfg.tracking.uri,
            "peft-test",
            "peft-test",
            run_name="peft-test",
            artifact_location=str(out / "mlartifacts"),
        )
    return out


def test_load_peft_trials_reads_every_known_trial(tmp_path):
    trials = load_peft_trials(_sweep_folder(tmp_path / "sweep"))
    assert list(trials.columns[: len(TRIAL_COLUMNS)]) == TRIAL_COLUMNS
    assert list(trials["status"]) == ["ok"] * 4 + ["failed", "unfinished"]
    assert list(trials[METHOD]) == ["norm", "norm", "lora", "lora", "hybrid", "hybrid"]
    running = trials.iloc[5]
    assert running["seed"] == 1 and running["train.epochs"] == 3 and math.isnan(running[ACC])
    assert trials.iloc[4]["message"] == "non-finite loss" and trials.iloc[4]["tuned_params_pct"] == 4.0
    assert trials.iloc[1][ACC] == pytest.approx(0.81)


def test_build_peft_report_writes_every_file_and_logs_to_mlflow(tmp_path):
    out = _sweep_folder(tmp_path / "sweep", mlflow=True)
    logged = []
    report = build_peft_report(out, log=logged.append)
    csv = "table_distlap-vit-tiny-fmnist_fashion-mnist.csv"
    files = {p.name for p in report.iterdir()}
    assert files == {
        "peft_methods.md",
        "report.html",
        "trials.csv",
        csv,
        "accuracy_vs_tuned_params.png",
        "ece_vs_tuned_params.png",
        "time_per_epoch.png",
        "accuracy_per_tuned_param.png",
    }
    md = (report / "peft_methods.md").read_text()
    assert "### vit-tiny-fmnist (Fashion-MNIST, 3 epochs)" in md
    assert "| Method | Tuned Params % | Acc@1 | ECE | Time/Epoch (s) |" in md
    assert "| Norm | 1.00 ± 0.00 | 80.50 ± 0.71% | 0.050 ± 0.000 | 2.50 ± 0.71 |" in md
    assert (
        "- vit-tiny-fmnist (Fashion-MNIST, 3 epochs): accuracy tied between Norm and LoRA (80.50%); "
        "ECE tied between Norm and LoRA (0.050)."
    ) in md
    assert (
        "trial #4 trial4 (Hybrid, distlap/vit-tiny-fmnist, fashion_mnist, seed 0): failed (non-finite loss)"
    ) in md
    assert "trial #5 trial5 (Hybrid, distlap/vit-tiny-fmnist, fashion_mnist, seed 1): unfinished" in md
    assert "3 of 9 planned trials not started" in md
    assert "![accuracy_vs_tuned_params](accuracy_vs_tuned_params.png)" in md
    table = pd.read_csv(report / csv)
    assert list(table["Method"]) == ["Norm", "LoRA"] and list(table["n_seeds"]) == [2, 2]
    assert len(pd.read_csv(report / "trials.csv")) == 6
    assert '<img src="data:image/png;base64,' in (report / "report.html").read_text()
    assert any("logged to MLflow run" in line for line in logged)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("peft-test").experiment_id])[0]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "report")} >= {
        "report/peft_methods.md",
        f"report/{csv}",
    }


def test_report_without_mlflow_database_still_written(tmp_path):
    out = _sweep_folder(tmp_path / "sweep")
    logged = []
    report = build_peft_report(out, log=logged.append)
    assert (report / "report.html").is_file()
    assert any(line.startswith("[report] not logged to MLflow: no MLflow database") for line in logged)
    assert not (out / "mlflow.db").exists()  # not created by looking for it


def test_cli_exit_codes(tmp_path, capsys):
    assert main([str(_sweep_folder(tmp_path / "good")), "--no-mlflow"]) == 0
    assert main([str(_sweep_folder(tmp_path / "bad", ok=False)), "--no-mlflow"]) == 2
    assert "no trial of sweep 'peft-test'" in capsys.readouterr().err
    assert main([str(tmp_path / "absent")]) == 2
    with pytest.raises(ReportError, match="not a sweep output folder"):
        load_peft_trials(tmp_path)
    (tmp_path / "good" / "optuna.db").unlink()
    with pytest.raises(ReportError, match="Optuna study is missing"):
        load_peft_trials(tmp_path / "good")
