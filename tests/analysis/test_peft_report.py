"""The PEFT-methods report on a sweep folder written the way the sweep writes it (config.yaml, optuna.db,
trials/<id>/trial_result.json, mlflow.db), without running any training; its parts on synthetic trial
frames are tested in tests/analysis/test_peft_tables.py."""

import json
import math

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from analysis.collect import ReportError
from analysis.peft_methods import build_peft_report, main
from analysis.peft_tables import ACC, TRIAL_COLUMNS, load_peft_trials
from distlap.config import to_yaml
from distlap.names import METHOD
from distlap.sweep.search import distribution
from distlap.sweep.settings import SweepConfig, TrackingConfig, trial_config
from distlap.sweep.space import SearchConfig, SearchParam
from distlap.sweep.study import storage
from distlap.sweep.tracking import SweepTracker

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
