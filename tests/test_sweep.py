"""The sweep: searcher bookkeeping and checkpoint restore in-process; whole sweeps as the user runs them
(``python sweeps/layerwise.py`` in a subprocess, each with its own local Ray)."""

import collections
import functools
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from distlap import metrics, sweep_cli
from distlap.config import load_config
from distlap.search import RUN_ID_KEY, StudySearch, load_study
from distlap.sweep_config import SweepConfig, load_sweep_config, resolve
from distlap.sweep_trial import map_metrics, restore_fine_tuned, save_fine_tuned, trial_metrics
from distlap.tracking import KIND_TAG, TRIAL_TAG, SweepTracker, TrialRun
from distlap.train import predict
from distlap.trial import fine_tune

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "layerwise.py"


def _script_main():
    """``main(argv)`` of sweeps/layerwise.py."""
    from analysis.report import build_report

    return functools.partial(sweep_cli.main, "layerwise", build_report)


# --- in-process ----------------------------------------------------------------------------------

def test_restored_checkpoint_is_the_fine_tuned_model(fake_fmnist_dir, tiny_vit_dir, tmp_path):
    cfg = load_config(overrides=[f"data.path={fake_fmnist_dir}", f"backbone.name={tiny_vit_dir}",
                                 "data.classes=[5,6,7,8,9]", "train.epochs=1", "train.batch_size=32",
                                 "peft.method=hybrid"])
    ft = fine_tune(cfg, log=lambda m: None)
    save_fine_tuned(ft, tmp_path)
    back = restore_fine_tuned(cfg, tmp_path)
    loader = ft.loader("test")
    assert torch.allclose(predict(ft.model, loader, ft.device)[0],
                          predict(back.model, loader, back.device)[0])
    assert back.tuned == ft.tuned and back.train.history == ft.train.history
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(back.model) == trainable(ft.model)  # what Laplace will see
    # peft_methods without Laplace reports the MAP predictive itself and the method's costs
    m = map_metrics(back, wall_time_s=1.0)
    probs, labels = predict(back.model, back.loader("test"), back.device)
    assert m["map/test/accuracy"] == pytest.approx((probs.argmax(-1) == labels).float().mean().item())
    assert m["map/test/nll"] == pytest.approx(metrics.negative_log_likelihood(probs, labels))
    assert {"map/val/ece", "map/test/brier", "tuned_params", "time_per_epoch_s"} <= set(m)
    assert (m["tuned_params"], m["tuned_params_pct"]) == (ft.tuned.trainable, ft.tuned.pct)


def test_trial_metrics_vocabulary():
    split = {"accuracy": 0.8, "ece": 0.05, "mce": 0.2, "nll": 0.6, "brier": 0.3}
    def row(d: float) -> dict:
        return {"val": split, "test": split, "delta_ece": {"estimate": d, "low": d - 1, "high": d + 1}}
    result = {"map": {"val": split, "test": split}, "prior_precision": 3.0,
              "subsets": {"layer_0": row(0.02), "all": row(0.01)}, "timing": {"fit_s": 1.0, "eval_s": 2.0}}

    class FT:  # the two fields trial_metrics reads
        tuned = type("T", (), {"trainable": 10, "pct": 1.5})()
        train = type("R", (), {"time_per_epoch_s": 0.5})()
    m = trial_metrics(FT(), result, wall_time_s=9.0)
    assert m["bayes/val/nll"] == 0.6 and m["map/test/ece"] == 0.05
    assert (m["delta_ece"], m["best_subset"], m["prior_precision"]) == (0.01, "layer_0", 3.0)
    assert {"tuned_params_pct", "time_per_epoch_s", "laplace_fit_s", "laplace_eval_s",
            "wall_time_s"} <= set(m)


def test_study_search_tags_trials_and_adopts_orphans(tmp_path):
    """Optuna trials carry the Ray trial id and MLflow run id; one asked after the driver's last saved
    state (then killed) is adopted on resume instead of asked again; failures reach Optuna as FAIL."""
    cfg = resolve(SweepConfig(output_dir=str(tmp_path), search={"num_samples": 3}))
    tracker = SweepTracker.open(cfg.tracking.uri, "exp", cfg.search.study_name, run_name="s")
    first = StudySearch(cfg.search, tracker)
    a = first.suggest("ray_a")
    assert set(a) == {"train.prior_precision", "peft.rank", RUN_ID_KEY}
    first.save(tmp_path / "searcher.pkl")             # the driver's last saved state knows ray_a only
    b = first.suggest("ray_b")                         # ... then it asks ray_b and is killed

    resumed = StudySearch(cfg.search, tracker)
    resumed.restore(tmp_path / "searcher.pkl")
    c = resumed.suggest("ray_c")
    assert {k: c[k] for k in ("train.prior_precision", "peft.rank", RUN_ID_KEY)} == b  # adopted, not asked
    study = load_study(cfg.search)
    assert len(study.trials) == 2
    assert [t.user_attrs["ray_trial_id"] for t in study.trials] == ["ray_a", "ray_c"]
    assert [t.user_attrs[RUN_ID_KEY] for t in study.trials] == [a[RUN_ID_KEY], c[RUN_ID_KEY]]
    assert MlflowClient(cfg.tracking.uri).get_run(c[RUN_ID_KEY]).data.tags[TRIAL_TAG] == "ray_c"

    resumed.on_trial_complete("ray_a", result={cfg.search.metric: 0.5})
    with pytest.raises(RuntimeError), TrialRun(cfg.tracking.uri, c[RUN_ID_KEY]):
        raise RuntimeError("non-finite training loss")
    resumed.on_trial_complete("ray_c", error=True)
    states = [(t.state, t.value) for t in load_study(cfg.search).trials]
    assert states == [(optuna.trial.TrialState.COMPLETE, 0.5), (optuna.trial.TrialState.FAIL, None)]
    assert load_study(cfg.search).trials[1].user_attrs["error"] == "RuntimeError: non-finite training loss"


def test_bad_input_fails_before_ray_starts(tmp_path, capsys):
    import ray

    main = _script_main()
    assert main(["search.metric=bayes/test/nll", f"--output={tmp_path / 'a'}"]) == 2
    assert "search.metric: 'bayes/test/nll' is not a validation-split objective" in capsys.readouterr().err
    assert main(["--resume", f"--output={tmp_path / 'empty'}"]) == 2
    assert "holds no sweep" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.yaml").write_text("name: x\n")
    assert main(["--smoke-test", f"--output={tmp_path / 'taken'}"]) == 2
    assert "already holds a sweep; continue it with --resume" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "sweeps" / "configs" / "peft_methods.yaml"), f"--output={tmp_path / 'c'}"]) == 2
    assert "kind=peft_methods: this config is for sweeps/peft_methods.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--resume"])  # needs --output
    for address in ("ray://127.0.0.1:1", "127.0.0.1:1", "nonsense"):
        assert main(["--smoke-test", f"--output={tmp_path / 'b'}", f"--address={address}"]) == 2
        assert f"cannot reach the Ray cluster at --address {address!r}" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- whole sweeps (subprocesses) -----------------------------------------------------------------

def _sweep(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _runs(out: Path) -> dict[str, list]:
    cfg = load_sweep_config(out / "config.yaml")
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = collections.defaultdict(list)
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        runs[run.data.tags[KIND_TAG]].append(run)
    return runs


def _check_tree(out: Path, n_trials: int, n_subsets: int) -> pd.DataFrame:
    """Exactly one sweep run, n trial runs under it, n_subsets subset runs under each, one Optuna
    trial per trial run (and back), files in the output folder."""
    cfg = load_sweep_config(out / "config.yaml")
    runs = _runs(out)
    (sweep,) = runs["sweep"]
    assert sweep.data.tags["git_commit"] and sweep.data.tags["version.torch"] == "2.14.1"
    trials = {r.info.run_id: r for r in runs["trial"]}
    assert len(trials) == n_trials
    assert len({r.data.tags[TRIAL_TAG] for r in trials.values()}) == n_trials  # no duplicates
    assert all(r.data.tags["mlflow.parentRunId"] == sweep.info.run_id for r in trials.values())
    by_parent = collections.Counter(r.data.tags["mlflow.parentRunId"] for r in runs["subset"])
    ok_runs = [rid for rid, r in trials.items() if r.info.status == "FINISHED"]
    assert all(by_parent[rid] == n_subsets for rid in ok_runs)
    study = load_study(cfg.search)
    assert len(study.trials) == n_trials
    for t in study.trials:
        run = trials[t.user_attrs[RUN_ID_KEY]]
        assert run.data.tags[TRIAL_TAG] == t.user_attrs["ray_trial_id"]
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            assert run.data.metrics[cfg.search.metric] == pytest.approx(t.value)
            assert (out / "trials" / t.user_attrs["ray_trial_id"] / "layer_wise_results.json").is_file()
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == n_trials
    files = {p.name for p in out.iterdir()}
    assert {"config.yaml", "mlflow.db", "optuna.db", "ray_results", "trials", "summary.csv"} <= files
    return summary


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    start = time.perf_counter()
    proc = _sweep("--smoke-test", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - start < 180
    summary = _check_tree(out, n_trials=2, n_subsets=7)  # vit-mini: 3 blocks + early/mid/late/all
    assert (summary.status == "ok").all()
    runs = _runs(out)
    trial = runs["trial"][0]
    assert {"bayes/val/nll", "bayes/test/ece", "map/test/ece", "delta_ece", "tuned_params_pct",
            "time_per_epoch_s", "train/loss", "val/ece"} <= set(trial.data.metrics)
    assert trial.data.tags["git_commit"] and trial.data.tags["device"]
    subset = next(r for r in runs["subset"] if r.data.tags["distlap.subset"] == "all")
    client = MlflowClient(load_sweep_config(out / "config.yaml").tracking.uri)
    assert [a.path for a in client.list_artifacts(subset.info.run_id)] == ["reliability_all.png"]
    assert "stage: fine-tuning" in proc.stdout + proc.stderr  # progress names the stage
    assert (out / "report" / "report.html").is_file()  # the analysis report is written at the end


@pytest.mark.slow
def test_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    """lr=1e30 makes the loss non-finite: that trial is retried once (max_failures=1), then ends FAILED
    in MLflow (with the message) and FAIL in Optuna; the other trial completes, evaluating its subsets
    as Ray tasks in its child bundle (2 CPUs per trial on this 2-CPU Ray: any task escaping the trial's
    placement group would wait forever)."""
    out = tmp_path / "fail"
    proc = _sweep("--smoke-test", "--output", str(out), "max_failures=1", "resources.eval_tasks=1",
                  "search.space.train.lr={kind: choice, values: [0.002, 1.0e30]}",
                  "search.points_to_evaluate=[{train.lr: 1.0e30, train.prior_precision: 10.0, peft.rank: 2},"
                  " {train.lr: 0.002, train.prior_precision: 10.0, peft.rank: 2}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _check_tree(out, n_trials=2, n_subsets=7)
    assert list(summary.status) == ["failed", "ok"]
    assert "non-finite training loss" in summary.error[0]
    failed_id = summary.trial_id[0]
    assert (proc.stdout + proc.stderr).count(f"[{failed_id}] stage: fine-tuning") == 2  # one retry
    # the layer-wise engine's own line about Ray tasks
    assert re.search(rf"\[{summary.trial_id[1]}\] .*as Ray tasks", proc.stdout + proc.stderr)
    run = MlflowClient(load_sweep_config(out / "config.yaml").tracking.uri).get_run(summary.mlflow_run_id[0])
    assert run.info.status == "FAILED" and "non-finite training loss" in run.data.tags["error"]
    assert json.loads((out / "trials" / failed_id / "trial_result.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_exactly_n_trials(tmp_path):
    """Ctrl-C once a trial has finished and another is past its checkpoint; --resume keeps the finished
    trial, restores the checkpointed one without retraining and ends with exactly 3 trials."""
    out, log = tmp_path / "resume", tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--smoke-test", "--output", str(out),
                                 "search.num_samples=3"], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text()
        finished = set(_ids(text, "completed after"))
        checkpointed = set(_ids(text, "stage: Laplace fit")) - set(_ids(text, "stage: done")) - finished
        if finished and checkpointed:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert len(load_study(load_sweep_config(out / "config.yaml").search).trials) < 3 or \
        "unfinished" in set(pd.read_csv(out / "summary.csv").status)

    second = _sweep("--resume", "--output", str(out))
    assert second.returncode == 0, second.stderr[-3000:]
    summary = _check_tree(out, n_trials=3, n_subsets=7)
    assert (summary.status == "ok").all()
    resumed_log = second.stdout + second.stderr
    for trial_id in finished:
        assert f"[{trial_id}] stage" not in resumed_log  # finished trials are kept, not rerun
    for trial_id in checkpointed:
        assert f"[{trial_id}] stage: restored the fine-tuned adapter" in resumed_log
        assert f"[{trial_id}] stage: fine-tuning" not in resumed_log


def _ids(text: str, marker: str) -> list[str]:
    """Ray trial ids on lines with ``marker``: Tune's ``layerwise_trial_<id> completed after`` lines and
    our ``[<id>] stage: ...`` lines."""
    pattern = re.compile(rf"(?:layerwise_trial_(\w+)|\[(\w+)\]) {re.escape(marker)}")
    return [a or b for a, b in pattern.findall(text)]
