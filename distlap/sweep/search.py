"""The Optuna side of a sweep: a persistent study and the Ray Tune searcher that feeds it.

:class:`StudySearch` is Ray's ``OptunaSearch`` (TPE, or a grid) over an ``RDBStorage`` study, with three
additions:

- every Optuna trial carries the user attributes ``ray_trial_id`` and ``mlflow_run_id``; the MLflow
  trial run is created here, by the driver, and its id travels to the trial in its config
  (:data:`RUN_ID`), so a trial that dies before logging anything still has a run to mark FAILED;
- a failed trial's message (the MLflow ``error`` tag) is copied to the Optuna trial's ``error`` attribute;
- after a killed driver, Optuna trials the restored Ray experiment does not know (asked after its last
  saved state) are adopted by the next new Ray trials instead of being asked again, so a resumed
  sweep ends with exactly ``num_samples`` Optuna trials. One driver per study.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from distlap.names import ERROR, RUN_ID, TRIAL_TAG
from distlap.sweep.space import SearchConfig, SearchParam
from distlap.sweep.study import load_study, storage
from distlap.sweep.tracking import SweepTracker


def distribution(param: SearchParam) -> BaseDistribution:
    if param.kind == "choice":
        return CategoricalDistribution(param.values)
    return FloatDistribution(param.low, param.high, log=param.kind == "loguniform")


class _Grid(optuna.samplers.GridSampler):
    """The grid without its ``study.stop()`` after the last point: outside ``Study.optimize`` that only
    raises (Ray logged it as a warning); the sweep's ``num_samples`` (the grid's size) ends it."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def sampler(cfg: SearchConfig) -> optuna.samplers.BaseSampler:
    """TPE, or a grid: Optuna trial n takes grid point n (a fixed order), so each point runs once."""
    if cfg.sampler == "grid":
        return _Grid({n: list(p.values) for n, p in cfg.space.items()}, seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed)


def _has_trials(cfg: SearchConfig) -> bool:
    try:
        return bool(load_study(cfg).trials)
    except KeyError:  # no such study yet
        return False


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that tags its trials, creates their MLflow runs and adopts orphaned trials."""

    def __init__(self, cfg: SearchConfig, tracker: SweepTracker):
        # A study that already has trials (a resumed sweep whose Ray state was never saved) got its
        # points_to_evaluate the first time; enqueueing them again would duplicate them.
        fresh = not _has_trials(cfg)
        super().__init__(
            space={name: distribution(p) for name, p in cfg.space.items()},
            metric=cfg.metric,
            mode=cfg.direction,
            points_to_evaluate=[dict(p) for p in cfg.points_to_evaluate] if fresh else None,
            sampler=sampler(cfg),
            study_name=cfg.study_name,
            storage=storage(cfg.storage),
        )
        self._tracker = tracker
        # The dashboard then names the objective (not "Objective 0"); the call is "experimental".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._ot_study.set_metric_names([cfg.metric])

    def suggest(self, trial_id: str) -> dict | None:
        orphan = self._orphan()
        if orphan is not None:
            self._ot_trials[trial_id] = optuna.Trial(self._ot_study, orphan._trial_id)
            params = dict(orphan.params)
        else:
            params = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        old_ray_id = ot_trial.user_attrs.get(TRIAL_TAG)
        ot_trial.set_user_attr(TRIAL_TAG, trial_id)
        run_id = ot_trial.user_attrs.get(RUN_ID) or (old_ray_id and self._tracker.find_trial_run(old_ray_id))
        if run_id:
            self._tracker.adopt(run_id, trial_id)
        else:
            run_id = self._tracker.trial_run(trial_id, run_name=f"trial-{ot_trial.number:03d}", params=params)
        ot_trial.set_user_attr(RUN_ID, run_id)
        return {**params, RUN_ID: run_id}

    def _orphan(self) -> optuna.trial.FrozenTrial | None:
        """A RUNNING Optuna trial that no Ray trial of this (possibly restored) experiment owns."""
        owned = {t._trial_id for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return next((t for t in running if t._trial_id not in owned), None)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Nothing: no pruner is used, and the fine-tuning checkpoint's report has no objective yet."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if error and ot_trial is not None and trial_id not in self._completed_trials:
            run_id = ot_trial.user_attrs.get(RUN_ID)
            message = run_id and self._tracker.error_message(run_id)
            ot_trial.set_user_attr(ERROR, message or "the trial's worker died; see the Ray error file")
        super().on_trial_complete(trial_id, result=result, error=error)
