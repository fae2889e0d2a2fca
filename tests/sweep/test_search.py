"""The Optuna side of a sweep: trials tagged with their Ray trial and MLflow run, orphans adopted."""

import optuna
import pytest
from mlflow import MlflowClient

from distlap.names import ERROR, RUN_ID, TRIAL_TAG
from distlap.sweep.search import StudySearch, sampler
from distlap.sweep.settings import SweepConfig, resolve
from distlap.sweep.space import SearchConfig
from distlap.sweep.study import load_study
from distlap.sweep.tracking import SweepTracker, TrialRun


def test_study_search_tags_trials_and_adopts_orphans(tmp_path):
    """Optuna trials carry the Ray trial id and MLflow run id; one asked after the driver's last saved
    state (then killed) is adopted on resume instead of asked again; failures reach Optuna as FAIL."""
    cfg = resolve(SweepConfig(output_dir=str(tmp_path), search={"num_samples": 3}))
    tracker = SweepTracker.open(cfg.tracking.uri, "exp", cfg.search.study_name, run_name="s")
    first = StudySearch(cfg.search, tracker)
    a = first.suggest("ray_a")
    assert set(a) == {"train.prior_precision", "peft.rank", RUN_ID}
    first.save(tmp_path / "searcher.pkl")  # the driver's last saved state knows ray_a only
    b = first.suggest("ray_b")  # ... then it asks ray_b and is killed

    resumed = StudySearch(cfg.search, tracker)
    resumed.restore(tmp_path / "searcher.pkl")
    c = resumed.suggest("ray_c")
    assert {k: c[k] for k in ("train.prior_precision", "peft.rank", RUN_ID)} == b  # adopted, not asked
    study = load_study(cfg.search)
    assert len(study.trials) == 2
    assert [t.user_attrs[TRIAL_TAG] for t in study.trials] == ["ray_a", "ray_c"]
    assert [t.user_attrs[RUN_ID] for t in study.trials] == [a[RUN_ID], c[RUN_ID]]
    assert MlflowClient(cfg.tracking.uri).get_run(c[RUN_ID]).data.tags[TRIAL_TAG] == "ray_c"

    resumed.on_trial_complete("ray_a", result={cfg.search.metric: 0.5})
    with pytest.raises(RuntimeError), TrialRun(cfg.tracking.uri, c[RUN_ID]):
        raise RuntimeError("non-finite training loss")
    resumed.on_trial_complete("ray_c", error=True)
    states = [(t.state, t.value) for t in load_study(cfg.search).trials]
    assert states == [(optuna.trial.TrialState.COMPLETE, 0.5), (optuna.trial.TrialState.FAIL, None)]
    assert load_study(cfg.search).trials[1].user_attrs[ERROR] == "RuntimeError: non-finite training loss"
    assert load_study(cfg.search).metric_names == [cfg.search.metric]  # the dashboard's objective name


def test_grid_ends_without_a_study_stop_warning(recwarn):
    """Optuna's GridSampler calls study.stop() after the last point, which outside Study.optimize only
    raises (Ray logged it as a warning); the sweep's own grid ends on num_samples instead."""
    space = SearchConfig(sampler="grid", space={"peft.rank": {"kind": "choice", "values": [2, 4]}})
    study = optuna.create_study(sampler=sampler(space))
    for _ in range(2):
        trial = study.ask()
        trial.suggest_categorical("peft.rank", [2, 4])
        study.tell(trial, 1.0)  # raised RuntimeError("`Study.stop` is supposed to be invoked ...") at the end
    assert sorted(t.params["peft.rank"] for t in study.trials) == [2, 4]
