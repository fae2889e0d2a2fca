import multiprocessing as mp

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from distlap import names
from distlap.names import ERROR as ERROR_TAG
from distlap.names import KIND_TAG, SUBSET_TAG, TRIAL_TAG
from distlap.sweep.tracking import (
    DESCRIPTION_CHARS,
    SweepTracker,
    TrialRun,
    describe_metrics,
    flatten,
    provenance_tags,
    retry_locked,
)


def _result(subsets=("layer_0", "all")) -> dict:
    metrics = {key: 0.05 for split in ("val", "test") for key in names.scores("subset", split).values()}
    delta = names.delta("subset", "test")
    low, high = names.interval(delta)
    metrics.update({delta: 0.01, low: -0.01, high: 0.03, names.SUBSET_TIME: 1.5})
    return {"subsets": {name: {"blocks": [0], "metrics": metrics} for name in subsets}}


@pytest.fixture
def tracker(tmp_path) -> SweepTracker:
    return SweepTracker.open(
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "exp",
        "sweep-1",
        run_name="sweep",
        artifact_location=str(tmp_path / "art"),
        params={"search.num_samples": 2},
        tags={"git_commit": "abc"},
    )


def _runs(tracker: SweepTracker, kind: str):
    client = MlflowClient(tracker.uri)
    return client.search_runs([tracker.experiment_id], f"tags.`{KIND_TAG}` = '{kind}'", max_results=1000)


def test_runs_are_found_again_not_duplicated(tracker):
    again = SweepTracker.open(tracker.uri, "exp", "sweep-1", run_name="sweep")
    assert again == tracker
    run_id = tracker.trial_run("t_1", run_name="trial-000", params={"peft.rank": 4})
    assert tracker.trial_run("t_1", run_name="trial-000", params={"peft.rank": 4}) == run_id
    assert tracker.find_trial_run("t_1") == run_id and tracker.find_trial_run("t_2") is None
    run = MlflowClient(tracker.uri).get_run(run_id)
    assert run.info.status == "SCHEDULED"
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == tracker.parent_run_id
    assert run.data.params == {"peft.rank": "4"}
    assert len(_runs(tracker, "sweep")) == 1 and len(_runs(tracker, "trial")) == 1


def test_trial_run_status_and_error(tracker):
    client = MlflowClient(tracker.uri)
    run_id = tracker.trial_run("t_1", run_name="trial-000", params={})
    with pytest.raises(RuntimeError), TrialRun(tracker.uri, run_id):
        raise RuntimeError("non-finite training loss")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert tracker.error_message(run_id) == "RuntimeError: non-finite training loss"
    with TrialRun(tracker.uri, run_id) as run:  # a retry: RUNNING again, the old error cleared
        assert client.get_run(run_id).info.status == "RUNNING"
        run.log_history([{"epoch": 1, "train/loss": 1.0}, {"epoch": 2, "train/loss": 0.5}])
        run.log(metrics={"bayes/val/nll": 0.4, "best_subset": "all"}, params={"trial.seed": 0})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and ERROR_TAG not in run.data.tags
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [1.0, 0.5]
    assert run.data.metrics["bayes/val/nll"] == 0.4 and "best_subset" not in run.data.metrics
    tracker.mark_failed(run_id, "worker died")  # the driver never overrides a run the trial ended
    assert client.get_run(run_id).info.status == "FINISHED"
    other = tracker.trial_run("t_2", run_name="trial-001", params={})
    tracker.mark_failed(other, "worker died")
    assert client.get_run(other).info.status == "FAILED" and tracker.error_message(other) == "worker died"


def test_subset_runs_are_grandchildren_with_plots(tracker, tmp_path):
    client = MlflowClient(tracker.uri)
    run_id = tracker.trial_run("t_1", run_name="trial-000", params={})
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "reliability_all.png").write_bytes(b"\x89PNG")
    with TrialRun(tracker.uri, run_id) as run:
        ids = run.log_subsets(_result(), plots)
        assert run.log_subsets(_result(), plots) == ids  # idempotent on a retry
    assert len(_runs(tracker, "subset")) == 2
    sub = client.get_run(ids["all"])
    assert sub.data.tags[MLFLOW_PARENT_RUN_ID] == run_id and sub.data.tags[SUBSET_TAG] == "all"
    assert sub.data.tags[TRIAL_TAG] == "t_1" and sub.info.status == "FINISHED"
    assert sub.data.metrics["subset/test/delta_ece"] == 0.01 and sub.data.metrics["subset/test/ece"] == 0.05
    assert [a.path for a in client.list_artifacts(ids["all"])] == ["reliability_all.png"]
    assert client.list_artifacts(ids["layer_0"]) == []


def test_helpers():
    assert flatten({"peft": {"rank": 8, "target_modules": None}, "n": [1, 2]}) == {
        "peft.rank": 8,
        "peft.target_modules": None,
        "n": [1, 2],
    }
    tags = provenance_tags(
        {"git_commit": "abc", "git_dirty": True, "device": "cpu", "packages": {"torch": "2.14.1"}}
    )
    assert tags == {
        "git_commit": "abc",
        "git_dirty": "True",
        "device": "cpu",
        "version.torch": "2.14.1",
        "mlflow.source.git.commit": "abc",
    }
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert retry_locked(flaky, first_wait_s=0.001)() == "ok" and len(calls) == 3
    with pytest.raises(ValueError, match="other"):
        retry_locked(lambda: (_ for _ in ()).throw(ValueError("other")))()


def _trial_process(uri: str, run_id: str, n_subsets: int) -> None:
    with TrialRun(uri, run_id) as run:
        for epoch in range(1, 11):
            run.log(metrics={"train/loss": 1.0 / epoch}, step=epoch)
        run.log_subsets(_result([f"layer_{i}" for i in range(n_subsets)]))


@pytest.mark.slow
def test_concurrent_writers_lose_nothing(tracker):
    """Four trial processes write one SQLite file at once (plus this driver): every write lands."""
    n_trials, n_subsets = 4, 12
    run_ids = [
        tracker.trial_run(f"t_{i}", run_name=f"trial-{i:03d}", params={"i": i}) for i in range(n_trials)
    ]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_trial_process, args=(tracker.uri, r, n_subsets)) for r in run_ids]
    for p in procs:
        p.start()
    extra = [tracker.trial_run(f"u_{i}", run_name=f"late-{i}", params={}) for i in range(5)]
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n_trials
    client = MlflowClient(tracker.uri)
    for run_id in run_ids:
        assert client.get_run(run_id).info.status == "FINISHED"
        assert len(client.get_metric_history(run_id, "train/loss")) == 10
    subsets = _runs(tracker, "subset")
    assert len(subsets) == n_trials * n_subsets
    assert all(len(r.data.metrics) == 14 for r in subsets)
    assert len(_runs(tracker, "trial")) == n_trials + len(extra)


def test_a_sweep_named_with_a_quote_is_found_and_an_interrupted_one_is_killed(tmp_path):
    """The sweep id (by default the output folder's name) goes into MLflow's search filters quoted
    safely; interrupted trial and subset runs end KILLED, not RUNNING."""
    from distlap.sweep.tracking import literal

    assert (literal("a'b"), literal('a"b'), literal("ab")) == ('"a\'b"', "'a\"b'", "'ab'")
    with pytest.raises(ValueError, match="both"):
        literal("a'\"b")
    tracker = SweepTracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "it's #1", run_name="s")
    assert SweepTracker.open(tracker.uri, "exp", "it's #1", run_name="s") == tracker
    run_id = tracker.trial_run("t_1", run_name="trial-000", params={})
    assert tracker.find_trial_run("t_1") == run_id
    with TrialRun(tracker.uri, run_id) as run:
        client = run.client
        client.create_run(tracker.experiment_id, tags={MLFLOW_PARENT_RUN_ID: run_id, KIND_TAG: "subset"})
        tracker.kill_unfinished()
        assert {r.info.status for r in _runs(tracker, "trial") + _runs(tracker, "subset")} == {"KILLED"}
    # the runs table's shared view filters on the same quoted id, and finds the sweep's runs
    import json

    from distlap.sweep.tracking import SHARED_VIEW, view_key

    key = tracker.share_view([], [])  # MLflow refuses the sweep id itself in a tag name
    assert (
        key == view_key("it's #1") == "it_s__1-" + key.rsplit("-", 1)[1] and view_key("a-1.b_c") == "a-1.b_c"
    )
    view = json.loads(MlflowClient(tracker.uri).get_experiment(tracker.experiment_id).tags[SHARED_VIEW + key])
    assert view["searchFilter"] == 'tags.`distlap.sweep` = "it\'s #1"'
    assert MlflowClient(tracker.uri).search_runs([tracker.experiment_id], view["searchFilter"])


def test_the_ui_sees_a_model_training_experiment_and_the_runs_as_a_tree(tracker, tmp_path):
    """Experiment kind and note; the shared view (this sweep, sorted by distlap.order, the columns);
    order tags and names sweep > trial-000 > trial-000/<subset>; every run describes its metrics; the
    MAP's reliability diagram on the trial run; each final metric logged once, curves once per epoch."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    from distlap.names import ORDER_TAG
    from distlap.sweep.tracking import EXPERIMENT_KIND, SHARED_VIEW, TRAINING, experiment_id

    client = MlflowClient(tracker.uri)
    tags = client.get_experiment(tracker.experiment_id).tags
    assert tags[EXPERIMENT_KIND] == TRAINING and "trial-000/layer_0" in tags[MLFLOW_RUN_NOTE]
    assert (
        experiment_id(tracker.uri, "exp") == tracker.experiment_id
        and experiment_id(tracker.uri, "no") is None
    )
    key = tracker.share_view(["peft.rank"], ["bayes/val/nll"])
    view = json.loads(client.get_experiment(tracker.experiment_id).tags[SHARED_VIEW + key])
    assert view["searchFilter"] == "tags.`distlap.sweep` = 'sweep-1'"
    assert view["orderByKey"] == f"tags.`{ORDER_TAG}`" and view["orderByAsc"] is True
    assert view["selectedColumns"][1:] == ["params.`peft.rank`", "metrics.`bayes/val/nll`"]

    run_id = tracker.trial_run("t_1", run_name="trial-000", params={})
    plots = tmp_path / "plots"
    plots.mkdir()
    for name in ("map", "layer_0"):
        (plots / f"reliability_{name}.png").write_bytes(b"\x89PNG")
    with TrialRun(tracker.uri, run_id) as run:
        run.log_history([{"epoch": e, names.EPOCH_TIME: 0.5 * e, names.TRAIN_LOSS: 1.0 / e} for e in (1, 2)])
        run.log(metrics={names.TIME_PER_EPOCH: 0.75, "bayes/val/nll": 0.4})
        ids = run.log_subsets(_result(("layer_0", "all")), plots)
    runs = {r.info.run_id: r for r in client.search_runs([tracker.experiment_id], max_results=100)}
    order = sorted(runs.values(), key=lambda r: r.data.tags[ORDER_TAG])
    assert [r.info.run_name for r in order] == ["sweep", "trial-000", "trial-000/layer_0", "trial-000/all"]
    assert [r.data.tags[ORDER_TAG] for r in order] == [
        "sweep-1",
        "sweep-1/trial-000",
        "sweep-1/trial-000/000",
        "sweep-1/trial-000/001",
    ]
    assert {r.data.tags["distlap.sweep"] for r in order} == {"sweep-1"}  # the view's filter finds them all
    note = runs[run_id].data.tags[MLFLOW_RUN_NOTE]
    assert "| `time_per_epoch_s` | fine-tuning time per epoch [s] (lower is better) |" in note
    assert "| `epoch/time_s` | time of the epoch [s] (lower is better) |" in note
    assert runs[ids["all"]].data.tags[MLFLOW_RUN_NOTE].startswith("Layer subset all: blocks [0].")
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/reliability_map.png"]
    assert [m.value for m in client.get_metric_history(run_id, names.TIME_PER_EPOCH)] == [0.75]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, names.EPOCH_TIME)] == [
        (1, 0.5),
        (2, 1.0),
    ]


def test_a_long_description_fits_mlflow_and_says_what_it_left_out():
    """A trial with shift and OOD metrics has ~100 keys: the description keeps what MLflow stores
    (8,000 characters) and counts the rest, instead of MLflow truncating it mid-row with a warning."""
    keys = [names.scores(p, "test")[s] for p in ("map", "subset", "temp", "lla") for s in ("ece", "nll")]
    short = describe_metrics(keys, "Trial")
    assert short.count("\n| `") == len(keys) and "more metrics" not in short
    many = [f"{k}_{i}" for i in range(40) for k in keys]
    text = describe_metrics(many, "Trial")
    assert len(text) <= DESCRIPTION_CHARS and text.endswith("more metrics (their meanings: distlap.names)")
    shown = text.count("\n| `")
    assert f"... and {len(many) - shown} more metrics" in text
