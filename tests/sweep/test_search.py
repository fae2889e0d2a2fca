"""The Optuna side of a sweep: trials tagged with their Ray trial and MLflow run, orphans adopted."""

import optuna
import pytest
from mlflow import MlflowClient
from ray.tune.search import Searcher

from distlap.names import ERROR, RUN_ID, SEED, TRIAL_TAG
from distlap.sweep.search import StudySearch, TrialSeededTPE, sampler
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
    assert {k: c[k] for k in ("train.prior_precision", "peft.rank")} == {
        k: b[k] for k in ("train.prior_precision", "peft.rank")
    }  # adopted, not asked
    study = load_study(cfg.search)
    assert len(study.trials) == 2
    assert [t.user_attrs[TRIAL_TAG] for t in study.trials] == ["ray_a", "ray_c"]
    assert [t.user_attrs[RUN_ID] for t in study.trials] == [a[RUN_ID], c[RUN_ID]]
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_run(c[RUN_ID]).data.tags[TRIAL_TAG] == "ray_c"
    # b's run named the dead Ray trial's folder in its params; it is deleted, c starts a new one
    assert c[RUN_ID] != b[RUN_ID] and client.get_run(b[RUN_ID]).info.lifecycle_stage == "deleted"

    resumed.on_trial_complete("ray_a", result={cfg.search.metric: 0.5})
    with pytest.raises(RuntimeError), TrialRun(cfg.tracking.uri, c[RUN_ID]):
        raise RuntimeError("non-finite training loss")
    resumed.on_trial_complete("ray_c", error=True)
    states = [(t.state, t.value) for t in load_study(cfg.search).trials]
    assert states == [(optuna.trial.TrialState.COMPLETE, 0.5), (optuna.trial.TrialState.FAIL, None)]
    assert load_study(cfg.search).trials[1].user_attrs[ERROR] == "RuntimeError: non-finite training loss"
    assert load_study(cfg.search).metric_names == [cfg.search.metric]  # the dashboard's objective name


def _point(suggestion: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in suggestion.items() if k != RUN_ID))


def test_resumed_search_never_replays_a_configuration(tmp_path):
    """The crash-then-resume case of issue 15: the driver's saved searcher state knows trial a; b was
    asked after it, then the driver died. The resumed searcher adopts b for its next Ray trial and
    must not ask b's point again for the one after (a sampler stream restored from the old pickle
    did: the report then showed one configuration with seeds [0, 0]); the study stops at num_samples."""
    cfg = resolve(SweepConfig(output_dir=str(tmp_path), search={"num_samples": 4}))
    tracker = SweepTracker.open(cfg.tracking.uri, "exp", cfg.search.study_name, run_name="s")
    first = StudySearch(cfg.search, tracker)
    a = first.suggest("ray_a")
    first.save(tmp_path / "searcher.pkl")
    b = first.suggest("ray_b")

    resumed = StudySearch(cfg.search, tracker)
    resumed.restore(tmp_path / "searcher.pkl")
    c, d, e = (resumed.suggest(f"ray_{x}") for x in "cde")
    assert _point(c) == _point(b)  # adopted
    assert len({_point(a), _point(b), _point(d), _point(e)}) == 4  # nothing asked twice
    assert resumed.suggest("ray_f") == Searcher.FINISHED  # never more than num_samples trials
    assert len(load_study(cfg.search).trials) == 4


def test_trial_seeded_tpe_draws_depend_on_the_trial_number_only():
    """Two samplers of one seed agree trial by trial, whatever either drew before; numbers differ -> draws
    differ. (Optuna's own TPESampler draws from one stream, so its n-th draw depends on its history.)"""
    dist = {"x": optuna.distributions.FloatDistribution(1e-3, 1e3, log=True)}

    def draws(numbers, seed=0):
        study = optuna.create_study(sampler=TrialSeededTPE(seed))
        out = {}
        for n in range(max(numbers) + 1):
            trial = study.ask(dist)
            study.tell(trial, 1.0)
            out[n] = trial.params["x"]
        return [out[n] for n in numbers]

    assert draws([0, 1, 2]) == draws([0, 1, 2])
    assert len(set(draws([0, 1, 2, 3]))) == 4
    assert draws([0]) != draws([0], seed=1)


def test_tpe_models_the_history_only_after_its_startup_trials():
    """With 4 finished trials, a startup of 4 makes TPE model them (its proposals differ from the random
    draws of the same seeds); a startup of 10 or 100 leaves it drawing at random (identical draws)."""
    dist = {"x": optuna.distributions.FloatDistribution(1e-3, 1e3, log=True)}

    def proposals(n_startup):
        study = optuna.create_study(sampler=TrialSeededTPE(0, n_startup))
        for x in (0.01, 2.5, 3.5, 500.0):
            trial = optuna.trial.create_trial(params={"x": x}, distributions=dist, value=(x - 3) ** 2)
            study.add_trial(trial)
        out = []
        for _ in range(4):
            trial = study.ask(dist)
            out.append(trial.params["x"])
            study.tell(trial, (trial.params["x"] - 3) ** 2)
        return out

    assert proposals(10) == proposals(100)  # random search: the history is not read
    assert proposals(4) != proposals(10)


def test_startup_is_half_the_configurations_counted_once_per_seed():
    assert SearchConfig(num_samples=12, seeds=[0, 1, 2]).startup_trials() == 6  # 4 configurations: 2
    assert SearchConfig(num_samples=12, seeds=[0, 1, 2], startup=1).startup_trials() == 3
    assert SearchConfig(num_samples=60).startup_trials() == 10  # Optuna's own default, capped there
    assert SearchConfig(num_samples=1).startup_trials() == 1


def test_points_to_evaluate_are_asked_first_and_count_once(tmp_path):
    """Enqueued points wait in the study until asked: they do not fill num_samples before that."""
    point = {"train.prior_precision": 10.0, "peft.rank": 4}
    cfg = resolve(
        SweepConfig(output_dir=str(tmp_path), search={"num_samples": 2, "points_to_evaluate": [point]})
    )
    tracker = SweepTracker.open(cfg.tracking.uri, "exp", cfg.search.study_name, run_name="s")
    search = StudySearch(cfg.search, tracker)
    first, second = search.suggest("a"), search.suggest("b")
    assert _point(first) == tuple(sorted(point.items())) and _point(second) != _point(first)
    assert search.suggest("c") == Searcher.FINISHED


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


def _config(suggestion: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in suggestion.items() if k not in (RUN_ID, SEED)))


def test_seeds_run_every_configuration_once_per_seed_and_survive_a_crash(tmp_path):
    """search.seeds=[0, 1, 2], 9 trials: three configurations (one a point to evaluate), each asked once
    and run with every seed exactly once, each seed its own Optuna trial and MLflow run. The driver dies
    after a new configuration was asked (its repeats queued): the resumed searcher adopts it with its
    seed and queues nothing twice."""
    point = {"train.prior_precision": 10.0, "peft.rank": 4}
    search = {"num_samples": 9, "seeds": [0, 1, 2], "points_to_evaluate": [point]}
    cfg = resolve(SweepConfig(output_dir=str(tmp_path), search=search))
    tracker = SweepTracker.open(cfg.tracking.uri, "exp", cfg.search.study_name, run_name="s")
    first = StudySearch(cfg.search, tracker)
    got = [first.suggest("ray_0")]
    first.save(tmp_path / "searcher.pkl")
    got += [first.suggest(f"ray_{i}") for i in (1, 2, 3)]  # ... then the driver is killed

    resumed = StudySearch(cfg.search, tracker)
    resumed.restore(tmp_path / "searcher.pkl")
    got += [resumed.suggest(f"ray_r{i}") for i in range(8)]  # 3 adopted orphans, then 5 new
    got = [g for g in got[:1] + got[4:] if g != Searcher.FINISHED]
    assert len(got) == 9 and _config(got[0]) == tuple(sorted(point.items()))
    runs: dict[tuple, list[int]] = {}
    for g in got:
        runs.setdefault(_config(g), []).append(g[SEED])
    assert sorted(sorted(s) for s in runs.values()) == [[0, 1, 2]] * 3
    study = load_study(cfg.search)
    asked = [t for t in study.trials if t.state != optuna.trial.TrialState.WAITING]
    assert len(asked) == 9 and sorted(t.user_attrs[SEED] for t in asked) == [0] * 3 + [1] * 3 + [2] * 3
    assert resumed.suggest("ray_end") == Searcher.FINISHED
    params = MlflowClient(cfg.tracking.uri).get_run(got[-1][RUN_ID]).data.params
    assert params[SEED] == str(got[-1][SEED])
