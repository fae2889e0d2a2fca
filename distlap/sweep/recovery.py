"""How a sweep survives failures without fabricating or losing a result.

- :func:`failure_policy`: while the tuner runs, Ray Tune's retry decision
  (:func:`~distlap.sweep.ray_compat.retry_decision`) follows distlap's rules. A store fault is not the
  trial's failure: it is not counted, and the sweep stops (the trial continues on ``--resume``). A
  deterministic failure -- a non-finite loss with this configuration and seed, a bad setting, data set
  or backbone -- is not retried: it would fail the same way. Anything else (a worker lost with its
  node, an out-of-memory kill) is retried up to ``max_failures`` times, the value of the config being
  run, so ``--resume max_failures=N`` applies to the restored trials too. Meanwhile Tune's logs drop a store
  fault's traceback and Tune's own ``Tuner.restore(...)`` hint (distlap prints one line and ``--resume``).
- :func:`stop_sweep`: the first store fault ends the sweep the way Ctrl-C does (Ray Tune's own SIGUSR1
  handler: running trials are stopped and saved as unfinished), and the driver prints one message.
- :func:`replaying`: a trial whose result is already recorded (``trial_result.json`` says ok; Ray's
  saved state can be older than a trial's end when the driver was killed) reports that result again
  instead of computing the trial a second time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Iterator

from ray import tune

from distlap import names
from distlap.config import ConfigError
from distlap.finetune.backbones import BackboneError
from distlap.finetune.data import DataError
from distlap.finetune.train import TrainingFailed
from distlap.sweep import ray_compat
from distlap.sweep.settings import SweepConfig
from distlap.sweep.stores import DISK_ERRNOS, StoreError, store_fault
from distlap.sweep.tracking import TrialRun

DETERMINISTIC = (TrainingFailed, ConfigError, DataError, BackboneError)
_FAULTS: list[StoreError] = []


def reset() -> None:
    """Forget the faults of an earlier sweep in this process."""
    _FAULTS.clear()


def first_fault() -> StoreError | None:
    return _FAULTS[0] if _FAULTS else None


def stop_sweep(fault: StoreError) -> None:
    """Record ``fault`` and, the first time, end the tuning loop as Ctrl-C would (state saved)."""
    _FAULTS.append(fault)
    if len(_FAULTS) > 1:
        return
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
        raise fault  # no Tune loop to stop gracefully here: the error ends it
    os.kill(os.getpid(), signal.SIGUSR1)


def on_fault(cfg: SweepConfig, error: BaseException) -> bool:
    """If a store is at fault in ``error``, stop the sweep and return True (the searcher and the
    callbacks call this; it is picklable with ``functools.partial``)."""
    fault = store_fault(error, cfg)
    if fault is None:
        return False
    stop_sweep(fault)
    return True


def is_deterministic(error: BaseException | None) -> bool:
    """The trial would fail the same way again (same configuration, same seed)."""
    while error is not None:
        if isinstance(error, DETERMINISTIC):
            return True
        error = getattr(error, "cause", None) or error.__cause__
    return False


@contextlib.contextmanager
def failure_policy(cfg: SweepConfig) -> Iterator[None]:
    """Ray Tune decides retries by distlap's rules (module docstring) inside this block."""

    def should_recover(trial) -> bool:
        error = ray_compat.trial_error(trial)
        fault = store_fault(error, cfg) if error is not None else None
        if fault is not None:
            ray_compat.forgive_failure(trial)  # not the trial's failure
            stop_sweep(fault)
            return True
        if is_deterministic(error):
            return False
        return ray_compat.failures(trial) <= cfg.max_failures

    quiet = _QuietTune(cfg)
    loggers = [logging.getLogger(name) for name in (*ray_compat.TUNE_LOGGERS, ray_compat.SYNC_LOGGER)]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        with ray_compat.retry_decision(should_recover):
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class _QuietTune(logging.Filter):
    """Tune logs a failed trial's whole traceback, and its own resume hint (``Tuner.restore(...)``) when
    the sweep is stopped; distlap prints one line for a store fault and its own ``--resume`` command.
    Ray's copy of its sweep state into the output folder logs its traceback as text: a full, read-only or
    failing disk there is said in one line (the fault stops the sweep where a store meets it)."""

    def __init__(self, cfg: SweepConfig):
        super().__init__()
        self.cfg = cfg

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Tuner.restore(" in message:
            return False
        if record.name == ray_compat.SYNC_LOGGER:
            disk = _DISK_ERROR.search(message)
            if disk and int(disk["errno"]) in DISK_ERRNOS:
                record.msg = f"Ray could not copy its sweep state into {self.cfg.out}: {disk[0]}"
                record.args = ()
            return True
        error = record.exc_info[1] if record.exc_info else None
        return error is None or store_fault(error, self.cfg) is None


_DISK_ERROR = re.compile(r"\[Errno (?P<errno>\d+)\][^\n]*")


def replaying(trainable: Callable) -> Callable:
    """``trainable``, unless the trial's result is already recorded: then that result is reported."""

    @functools.wraps(trainable)
    def trial(config: dict, sweep: SweepConfig) -> None:
        quiet_store_logs()
        trial_id = tune.get_context().get_trial_id()
        metrics = recorded_metrics(sweep, trial_id)
        if metrics is None:
            return trainable(config, sweep)
        with TrialRun(sweep.tracking.uri, config[names.RUN_ID]):
            pass  # FINISHED, in case the driver died before the trial process closed its run
        print(f"[{trial_id}] stage: done earlier (its recorded result is reported again)", flush=True)
        tune.report(metrics)

    return trial


def recorded_metrics(sweep: SweepConfig, trial_id: str) -> dict | None:
    """The metrics of a trial that finished ok, from its ``trial_result.json``; None otherwise."""
    path = sweep.out / names.TRIALS_DIR / trial_id / names.TRIAL_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = record.get("status") == "ok" and sweep.search.metric in record.get("metrics", {})
    return record["metrics"] if ok else None


def reconcile(cfg: SweepConfig) -> None:
    """After every Ray trial has ended: an Optuna trial still RUNNING (its result was computed but not
    told, e.g. the driver died in between) is told its recorded result, or FAIL if it has none."""
    import optuna

    from distlap.sweep.study import load_study

    study = load_study(cfg.search)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        metrics = recorded_metrics(cfg, str(trial.user_attrs.get(names.TRIAL_TAG)))
        if metrics is not None:
            study.tell(trial.number, metrics[cfg.search.metric])
        else:
            message = "its Ray trial ended without a result (see its error file under ray_results/)"
            study._storage.set_trial_user_attr(trial._trial_id, names.ERROR, message)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def quiet_store_logs() -> None:
    """MLflow logs a full traceback for every database error before raising it; the raised error is
    what distlap reports (one line naming the store)."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
