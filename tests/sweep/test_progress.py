"""The sweep's console: the progress view's lines (status, best with its interval, time left), the
trials' own lines (every one, no deduplication, no Ray noise) and the closing lines with the commands."""

import logging
from types import SimpleNamespace

from ray import cloudpickle

from distlap import names
from distlap.sweep.progress import (
    ProgressView,
    best_line,
    closing_lines,
    describe_params,
    print_closing,
    quiet_start,
    runs_url,
    time_left,
)
from distlap.sweep.settings import SweepConfig, resolve
from distlap.sweep.tracking import view_key

DELTA = names.delta("bayes", "test", "ece")
LOW, HIGH = names.interval(DELTA)


def _cfg(tmp_path, **kw) -> SweepConfig:
    return resolve(SweepConfig(output_dir=str(tmp_path / "sweep"), search={"num_samples": 4}, **kw))


def _trial(tid, status, value=None, **params):
    result = {} if value is None else {"bayes/val/nll": value, DELTA: 0.01, LOW: -0.02, HIGH: 0.04}
    result[names.WALL_TIME] = 100.0
    return SimpleNamespace(trial_id=tid, status=status, last_result=result, config=params)


def test_helpers():
    assert (
        describe_params({"train.prior_precision": 43.1171, "peft.rank": 4, names.RUN_ID: "x"})
        == "λ=43.12, r=4"
    )
    assert time_left([], [], 3, 2) is None
    # two to start at 100 s each, one running for 40 s of its 100 s, two slots: (200 + 60) / 2
    assert time_left([90.0, 110.0], [40.0], 2, 2) == 130.0
    line = best_line("bayes/val/nll", {"bayes/val/nll": 1.5, DELTA: 0.01, LOW: -0.02, HIGH: 0.04}, "t1", {})
    assert (
        line
        == "best bayes/val/nll = 1.5000 (trial t1: ; bayes/test/delta_ece +0.0100, 95% CI [-0.0200, +0.0400])"
    )


def test_status_line_counts_states_best_and_time_left(tmp_path):
    view = ProgressView(_cfg(tmp_path), concurrency=2, log=lambda line: None)
    now = view._start + 200
    view._started = {"c": now - 40}
    trials = [
        _trial("a", "TERMINATED", 1.6, **{"peft.rank": 4}),
        _trial("b", "TERMINATED", 1.4, **{"peft.rank": 8}),
        _trial("c", "RUNNING"),
        _trial("d", "ERROR"),
    ]
    line = view.status_line(trials, now=now)
    assert line.startswith("[sweep] 3:20 elapsed | 2 of 4 done, 1 running, 1 failed, 0 to start | ")
    assert (
        "best bayes/val/nll = 1.4000 (trial b: r=8; bayes/test/delta_ece +0.0100, 95% CI [-0.0200, +0.0400])"
        in line
    )
    assert line.endswith("| about 0:30 left")  # the running trial: 100 s mean - 40 s, over 2 slots
    assert "no best yet" in view.status_line([_trial("c", "RUNNING")], now=now)


def test_trial_lines_are_all_printed_without_ray_noise(tmp_path, capsys):
    view = ProgressView(_cfg(tmp_path), concurrency=2)
    subset = "[a03eb0d7] [distlap]     layer_0: test ECE 0.0368, delta_ece +0.0280 [-0.0412, +0.0936]"
    view.worker_lines(
        {
            "pid": 7,
            "ip": "10.0.0.2",
            "is_err": False,
            "lines": [subset, subset, "[a03eb0d7] stage: done, x = 1"],
        }
    )
    view.worker_lines(
        {"pid": 7, "is_err": False, "lines": ["Checkpoint successfully created at: Checkpoint(...)"]}
    )
    view.worker_lines(
        {"pid": "autoscaler", "is_err": False, "lines": ["======== Autoscaler status ========"]}
    )
    view.worker_lines(
        {"pid": 8, "task_name": "layerwise_trial", "is_err": True, "lines": ["Traceback: boom"]}
    )
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "[a03eb0d7] runs in pid 7 on 10.0.0.2",  # once per trial process, for a cluster's user
        "[a03eb0d7]     layer_0: test ECE 0.0368, delta_ece +0.0280 [-0.0412, +0.0936]",
        "[a03eb0d7]     layer_0: test ECE 0.0368, delta_ece +0.0280 [-0.0412, +0.0936]",  # not deduplicated
        "[a03eb0d7] stage: done, x = 1",
    ]
    assert err.splitlines() == ["(layerwise_trial, pid 8) Traceback: boom"]
    assert view._done_lines == {"a03eb0d7"}


def test_the_view_survives_tunes_pickling(tmp_path):
    view = ProgressView(_cfg(tmp_path), concurrency=3, log=lambda line: None)
    again = cloudpickle.loads(cloudpickle.dumps(view))
    assert again.concurrency == 3 and again.log is print and again._started == {}


def test_closing_lines_print_the_three_commands(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.out.mkdir(parents=True)
    for name in ("summary.csv", "mlflow.db", "optuna.db"):
        (cfg.out / name).write_text("")
    lines = closing_lines(cfg, "7")
    text = "\n".join(lines)
    assert lines[0] == f"[sweep] everything is in {cfg.out}:"
    assert "summary.csv" in text and "ray_results" not in text  # only what exists
    assert f"mlflow ui --backend-store-uri sqlite:///{cfg.out}/mlflow.db" in text
    url = "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=sweep&workflowType=machine_learning"
    assert url in text
    assert f"optuna-dashboard sqlite:///{cfg.out}/optuna.db" in text
    assert f"optuna trials --storage sqlite:///{cfg.out}/optuna.db --study-name sweep" in text
    assert lines[-1] == f"[sweep] report:  python analysis/report.py {cfg.out}"
    peft = _cfg(tmp_path, kind="peft_methods", tracking={"uri": "http://head:5000/"})
    text = "\n".join(closing_lines(peft, "3"))
    assert "mlflow ui" not in text
    assert (
        "open http://head:5000/#/experiments/3/runs?viewStateShareKey=sweep&workflowType=machine_learning"
        in text
    )
    assert text.endswith(f"python analysis/peft_methods.py {peft.out}")
    assert runs_url("http://h", None, "s") == "http://h/#/experiments?workflowType=machine_learning"


def test_closing_commands_are_quoted_for_a_shell(tmp_path):
    """A folder may be named anything (tests/faults: "k9 #1 {a} it's ü"); the printed commands still
    run as printed: shell-quoted, and the Optuna URL's braces doubled (Optuna str.formats it)."""
    import shlex

    cfg = resolve(SweepConfig(output_dir=str(tmp_path / "k9 #1 {a} it's ü"), search={"num_samples": 2}))
    lines = closing_lines(cfg, "1")
    optuna_trials = next(line for line in lines if "optuna trials" in line)
    argv = shlex.split(optuna_trials.split("]", 1)[1])
    assert argv[:2] == ["optuna", "trials"]
    assert argv[3] == cfg.search.storage.replace("{", "{{").replace("}", "}}")
    assert argv[5] == cfg.search.study_name == "k9 #1 {a} it's ü"
    mlflow = next(line for line in lines if "mlflow ui" in line)
    assert shlex.split(mlflow.split("MLflow:", 1)[1])[-1] == cfg.tracking.uri
    report = next(line for line in lines if "report:" in line)
    assert shlex.split(report.split("report:", 1)[1]) == ["python", "analysis/report.py", str(cfg.out)]
    assert f"viewStateShareKey={view_key(cfg.search.study_name)}&" in "\n".join(lines)  # share_view's key


def test_quiet_start(monkeypatch):
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    quiet_start(None)
    import os

    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert logging.getLogger("ray._private.authentication.authentication_token_setup").level == logging.ERROR


def test_the_end_waits_for_the_last_lines_of_trials_finished_in_this_run(tmp_path):
    import time

    view = ProgressView(_cfg(tmp_path), concurrency=2, log=lambda line: None)
    view._previous_printer = print  # as if attached to Ray's printer
    view._ended = {"a": "TERMINATED", "b": "ERROR"}
    view._done_lines, view._last_line = {"a"}, time.monotonic() - 1
    start = time.monotonic()
    view._drain({"a"}, timeout_s=5)
    assert time.monotonic() - start < 1  # its done line came: no wait
    start = time.monotonic()
    view._drain({"a", "c"}, timeout_s=0.5)  # c's never comes: wait no longer than the timeout
    assert 0.4 < time.monotonic() - start < 2


def test_the_sweep_ends_with_its_wall_time(tmp_path):
    """The first closing line is the time the whole sweep took (the README's budget is checked by it)."""
    cfg = _cfg(tmp_path)
    cfg.out.mkdir(parents=True)
    lines: list[str] = []
    print_closing(cfg, lines.append, wall_s=171.2)
    assert lines[0] == "[sweep] finished in 2:51 (start-up, trials and report)"
    assert lines[1] == f"[sweep] everything is in {cfg.out}:"
