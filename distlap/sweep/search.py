"""The Optuna side of a sweep: a persistent study and the Ray Tune searcher that feeds it.

:class:`StudySearch` is Ray's ``OptunaSearch`` (TPE, or a grid) over an ``RDBStorage`` study, with three
additions:

- every Optuna trial carries the user attributes ``ray_trial_id`` and ``mlflow_run_id``; the MLflow
  trial run is created here, by the driver, and its id travels to the trial in its config
  (:data:`RUN_ID`), so a trial that dies before logging anything still has a run to mark FAILED;
- a failed trial's message (the MLflow ``error`` tag) is copied to the Optuna trial's ``error`` attribute;
- after a killed driver, Optuna trials the restored Ray experiment does not know (asked after its last
  saved state) are adopted by the next new Ray trials instead of being asked again (with a new MLflow
  run; the dead one is deleted), and the study never
  grows past ``num_samples`` trials, so a resumed sweep ends with exactly ``num_samples`` Optuna trials.
  One driver per study;
- with ``search.seeds``, each configuration Optuna proposes runs once per training seed: its first trial
  takes the first seed and enqueues the configuration again for the others (the Optuna user attribute
  ``seed``, also the trial's ``seed`` param), so every seed of a configuration is its own Optuna trial,
  and a repeat is never proposed as a new configuration.

TPE draws trial n's random numbers from a generator seeded with (``seed``, n) (:class:`TrialSeededTPE`),
not from one stream: the Ray searcher's saved state (its pickled sampler) is older than the study after
a killed driver, and a stream restored from it replays the start-up points of the trials asked since,
so a resumed sweep ran one configuration twice. Trial numbers are never reused, so neither are draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from distlap.names import ERROR, RUN_ID, SEED, TRIAL_TAG
from distlap.sweep.space import SearchConfig, SearchParam
from distlap.sweep.stores import OPTUNA, StoreError, masked
from distlap.sweep.study import load_study, storage
from distlap.sweep.tracking import SweepTracker


def distribution(param: SearchParam) -> BaseDistribution:
    if param.kind == "choice":
        return CategoricalDistribution(param.values)
    return FloatDistribution(param.low, param.high, log=param.kind == "loguniform")


# Trials that count towards num_samples: asked ones (points_to_evaluate wait in the study until asked).
_ASKED = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """Optuna's TPE with the random state of trial n a function of (``seed``, n) alone.

    The suggestion for trial n then depends only on the study's history and n: restoring an old pickle
    of the sampler cannot rewind it, and a trial asked again after a crash gets a new number and new
    draws. Each trial gets a fresh ``TPESampler`` (it keeps no state but its random stream).
    """

    def __init__(self, seed: int, n_startup_trials: int = 10):
        self.seed, self.n_startup_trials = seed, n_startup_trials
        self._current: tuple[int, optuna.samplers.TPESampler] | None = None

    def _tpe(self, trial: optuna.trial.FrozenTrial) -> optuna.samplers.TPESampler:
        if self._current is None or self._current[0] != trial.number:
            seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup_trials)
            self._current = (trial.number, tpe)
        return self._current[1]

    def infer_relative_search_space(self, study, trial):
        return self._tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._tpe(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing: each trial's draws are fixed by (seed, trial number) by design."""


class _Grid(optuna.samplers.GridSampler):
    """The grid without its ``study.stop()`` after the last point: outside ``Study.optimize`` that only
    raises (Ray logged it as a warning); the sweep's ``num_samples`` (the grid's size) ends it."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def sampler(cfg: SearchConfig) -> optuna.samplers.BaseSampler:
    """TPE seeded per trial, or a grid: Optuna trial n takes grid point n (a fixed order), so each point
    runs once."""
    if cfg.sampler == "grid":
        return _Grid({n: list(p.values) for n, p in cfg.space.items()}, seed=cfg.seed)
    return TrialSeededTPE(cfg.seed, cfg.startup_trials())


def _has_trials(cfg: SearchConfig) -> bool:
    try:
        return bool(load_study(cfg).trials)
    except KeyError:  # no such study yet
        return False


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that tags its trials, creates their MLflow runs and adopts orphaned trials."""

    def __init__(
        self,
        cfg: SearchConfig,
        tracker: SweepTracker,
        on_fault: Callable[[BaseException], bool] | None = None,
    ):
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
        self._num_samples = cfg.num_samples
        self._seeds = cfg.seeds
        self._on_fault = on_fault  # True: a store failed and the sweep is stopping (picklable)
        # The dashboard then names the objective (not "Objective 0"); the call is "experimental".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._ot_study.set_metric_names([cfg.metric])

    def suggest(self, trial_id: str) -> dict | str | None:
        """The next configuration (an orphan's, or Optuna's), None while the sweep stops on a store fault."""
        try:
            return self._suggest(trial_id)
        except Exception as err:
            if self._on_fault is not None and self._on_fault(err):
                return None  # not asked: the trial is suggested again on --resume
            raise

    def _suggest(self, trial_id: str) -> dict | str | None:
        orphan = self._orphan()
        if orphan is not None:
            self._ot_trials[trial_id] = optuna.Trial(self._ot_study, orphan._trial_id)
            params = dict(orphan.params)
            self._discard_run(orphan)
        elif len(self._ot_study.get_trials(deepcopy=False, states=_ASKED)) >= self._num_samples:
            return Searcher.FINISHED  # the study is complete (trials the restored Ray state never knew)
        else:
            params = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        if self._seeds is not None:
            params = {**params, SEED: self._seed_of(ot_trial, params)}
        ot_trial.set_user_attr(TRIAL_TAG, trial_id)
        run_id = self._tracker.trial_run(trial_id, run_name=f"trial-{ot_trial.number:03d}", params=params)
        ot_trial.set_user_attr(RUN_ID, run_id)
        return {**params, RUN_ID: run_id}

    def _seed_of(self, ot_trial: optuna.Trial, params: dict) -> int:
        """A repeat's (or an adopted trial's) seed; a new configuration takes the first seed and queues
        itself for the others, unless a driver killed between the two already queued them."""
        seed = self._ot_study._storage.get_trial(ot_trial._trial_id).user_attrs.get(SEED)
        if seed is not None:
            return seed
        waiting = self._ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        queued = {t.user_attrs.get(SEED) for t in waiting if t.system_attrs.get("fixed_params") == params}
        for repeat in self._seeds[1:]:
            if repeat not in queued:
                self._ot_study.enqueue_trial(params, user_attrs={SEED: repeat})
        ot_trial.set_user_attr(SEED, self._seeds[0])
        return self._seeds[0]

    def _discard_run(self, orphan: optuna.trial.FrozenTrial) -> None:
        """The orphan's MLflow run (and its subset runs) is deleted: its Ray trial died with the driver,
        and the trial starts afresh under a new Ray trial id, in a new run (a run's params are fixed
        once logged, and they name the trial's folder)."""
        old_ray_id = orphan.user_attrs.get(TRIAL_TAG)
        run_id = orphan.user_attrs.get(RUN_ID) or (old_ray_id and self._tracker.find_trial_run(old_ray_id))
        if run_id:
            self._tracker.discard(run_id)

    def _orphan(self) -> optuna.trial.FrozenTrial | None:
        """A RUNNING Optuna trial that no Ray trial of this (possibly restored) experiment owns."""
        owned = {t._trial_id for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return next((t for t in running if t._trial_id not in owned), None)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Nothing: no pruner is used, and the fine-tuning checkpoint's report has no objective yet."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell Optuna (COMPLETE, or FAIL with the MLflow run's error message). A result the store did
        not take stops the sweep (OptunaSearch only logs it) instead of leaving the trial RUNNING."""
        try:
            self._complete(trial_id, result, error)
        except Exception as err:
            if self._on_fault is None or not self._on_fault(err):
                raise

    def _complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        state = self._ot_study._storage.get_trial(ot_trial._trial_id).state
        if state.is_finished():  # told by an earlier driver whose saved Ray state predates it
            self._completed_trials.add(trial_id)
            return
        if error:
            run_id = ot_trial.user_attrs.get(RUN_ID)
            message = run_id and self._tracker.error_message(run_id)
            ot_trial.set_user_attr(ERROR, message or "the trial's worker died; see the Ray error file")
        super().on_trial_complete(trial_id, result=result, error=error)
        if not self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            url = masked(self._ot_study._storage.url)
            raise StoreError(OPTUNA, url, f"trial {ot_trial.number}'s result was not saved")
