"""Retries by distlap's rules, a store fault stopping the sweep, recorded results never recomputed."""

from __future__ import annotations

import errno
import json
import signal
from types import SimpleNamespace

import optuna
import pytest
from ray.tune.experiment.trial import Trial

from distlap import names
from distlap.config import ConfigError
from distlap.finetune.train import TrainingFailed
from distlap.sweep import recovery
from distlap.sweep.settings import SweepConfig, resolve
from distlap.sweep.study import load_study, storage


class _RayTaskError(Exception):
    """What Ray raises for an exception in a trial: the original travels as ``cause``."""

    def __init__(self, cause):
        super().__init__(str(cause))
        self.cause = cause


def _trial(error, failures=1):
    return SimpleNamespace(
        run_metadata=SimpleNamespace(num_failures=failures),
        pickled_error_file=None,
        get_pickled_error=lambda: error,
        get_error=lambda: None,
    )


@pytest.fixture
def sigusr1(monkeypatch):
    """Record SIGUSR1 (Ray Tune's 'stop gracefully') instead of acting on it."""
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: received.append(a[0]))
    recovery.reset()
    yield received
    signal.signal(signal.SIGUSR1, previous)
    recovery.reset()


def test_deterministic_failures_are_not_retried_store_faults_do_not_count(tmp_path, sigusr1):
    cfg = resolve(SweepConfig(output_dir=str(tmp_path), max_failures=2))
    with recovery.failure_policy(cfg):
        should_recover = Trial.should_recover
        assert not should_recover(_trial(_RayTaskError(TrainingFailed("non-finite training loss"))))
        assert not should_recover(_trial(_RayTaskError(ConfigError("data.classes: bad"))))
        assert should_recover(_trial(_RayTaskError(RuntimeError("worker died")), failures=2))
        assert not should_recover(_trial(_RayTaskError(RuntimeError("worker died")), failures=3))
        assert sigusr1 == [] and recovery.first_fault() is None
        full = _trial(_RayTaskError(OSError(errno.ENOSPC, "No space left on device")), failures=3)
        assert should_recover(full)  # resumed later, whatever its count of failures
        assert full.run_metadata.num_failures == 2  # a full disk is not the trial's failure
        assert sigusr1 == [signal.SIGUSR1] and recovery.first_fault().store == "output folder"
        should_recover(_trial(OSError(errno.ENOSPC, "No space left on device")))
        assert sigusr1 == [signal.SIGUSR1]  # the sweep is stopped once
    assert Trial.should_recover is not should_recover  # Ray's own again after the sweep


def test_the_error_is_read_where_tune_just_wrote_it(tmp_path, sigusr1):
    """Tune writes the error pickle into the trial's local folder; the sweep's storage gets it later."""
    import cloudpickle

    cfg = resolve(SweepConfig(output_dir=str(tmp_path)))
    local = tmp_path / "error.pkl"
    local.write_bytes(cloudpickle.dumps(_RayTaskError(OSError(errno.EROFS, "Read-only file system"))))
    trial = _trial(None)
    trial.pickled_error_file = str(local)
    with recovery.failure_policy(cfg):
        assert Trial.should_recover(trial) and recovery.first_fault().store == "output folder"


def _record(cfg, trial_id, status, value):
    folder = cfg.out / names.TRIALS_DIR / trial_id
    folder.mkdir(parents=True)
    metrics = {cfg.search.metric: value} if value is not None else {}
    (folder / names.TRIAL_FILE).write_text(json.dumps({"status": status, "metrics": metrics}))


def test_a_recorded_result_is_told_never_recomputed(tmp_path):
    """After every Ray trial ended, an Optuna trial left RUNNING gets its recorded result, or FAIL."""
    cfg = resolve(SweepConfig(output_dir=str(tmp_path)))
    study = optuna.create_study(storage=storage(cfg.search.storage), study_name=cfg.search.study_name)
    for ray_id in ("done", "lost"):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr(names.TRIAL_TAG, ray_id)
    _record(cfg, "done", "ok", 0.25)
    _record(cfg, "lost", "failed", None)
    assert recovery.recorded_metrics(cfg, "done") == {cfg.search.metric: 0.25}
    assert recovery.recorded_metrics(cfg, "lost") is None
    assert recovery.recorded_metrics(cfg, "never") is None
    recovery.reconcile(cfg)
    done, lost = load_study(cfg.search).trials
    assert (done.state, done.value) == (optuna.trial.TrialState.COMPLETE, 0.25)
    assert lost.state == optuna.trial.TrialState.FAIL and "without a result" in lost.user_attrs[names.ERROR]


def test_tune_logs_no_traceback_for_a_store_fault(tmp_path, caplog):
    import logging

    cfg = resolve(SweepConfig(output_dir=str(tmp_path)))
    tune_log = logging.getLogger("ray.tune.execution.tune_controller")
    with recovery.failure_policy(cfg), caplog.at_level(logging.ERROR):
        for error in (OSError(errno.ENOSPC, "No space left on device"), RuntimeError("a bug")):
            try:
                raise _RayTaskError(error)
            except _RayTaskError:
                tune_log.exception("Trial task failed")
    assert [r.exc_info[1].cause.args for r in caplog.records] == [("a bug",)]


def test_tunes_own_resume_hint_is_dropped_for_distlaps(tmp_path, caplog):
    """Stopped, Tune suggests ``Tuner.restore(...)``; a distlap user resumes with ``--resume`` (which
    distlap prints), so Tune's hint is dropped and its other warnings are kept."""
    import logging

    cfg = resolve(SweepConfig(output_dir=str(tmp_path)))
    tune_log = logging.getLogger("ray.tune.tune")
    with recovery.failure_policy(cfg), caplog.at_level(logging.WARNING):
        tune_log.warning("Experiment has been interrupted.\nResume experiment with: Tuner.restore(path='x')")
        tune_log.warning("Trials did not complete")
    assert [r.getMessage() for r in caplog.records] == ["Trials did not complete"]
    tune_log.warning("Resume experiment with: Tuner.restore(path='x')")  # outside a sweep: untouched
    assert len(caplog.records) == 2


def test_a_failed_state_copy_to_a_full_disk_is_one_line(tmp_path, caplog):
    """Ray's syncer logs a failed copy's traceback as text; a disk fault becomes one line, anything else
    is kept whole."""
    import logging

    from distlap.sweep import ray_compat

    cfg = resolve(SweepConfig(output_dir=str(tmp_path)))
    sync_log = logging.getLogger(ray_compat.SYNC_LOGGER)
    traceback = "Last sync command failed:\nTraceback (most recent call last):\n  File x\n"
    full, other = traceback + "OSError: [Errno 28] Error writing bytes", traceback + "ValueError: bad path"
    with recovery.failure_policy(cfg), caplog.at_level(logging.WARNING):
        sync_log.warning(full)
        sync_log.warning(other)
    assert [r.getMessage() for r in caplog.records] == [
        f"Ray could not copy its sweep state into {cfg.out}: [Errno 28] Error writing bytes",
        other,
    ]
