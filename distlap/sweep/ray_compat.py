"""The Ray internals distlap relies on, in one room (written against Ray 2.60).

Nothing here is Ray's public API, so an upgrade may move any of it without a deprecation; each is
checked against the installed Ray by ``tests/sweep/test_ray_compat.py``, which names the Ray version
and what moved. Elsewhere distlap reaches them only through this module.

- Ray's printer of the workers' output (``ray._private``): :func:`replace_log_printer` routes the
  workers' log records to a handler of distlap's (the progress view prints trial lines itself) and
  :func:`restore_log_printer` puts Ray's back; :func:`autoscaler_events` keeps the events of the
  autoscaler's periodic report.
- Ray Tune's retry decision: inside :func:`retry_decision` Tune asks a function of distlap's whether
  a failed trial is retried (``Trial.should_recover``, the one place its controller asks);
  :func:`failures` and :func:`forgive_failure` read and lower the trial's count of failures.
- A failed trial's exception: :func:`trial_error` reads it where Tune has just written it, and
  :func:`failure_message` says it in one line.
- The loggers of Tune's failure reports (:data:`TUNE_LOGGERS`), of Ray's copy of the sweep state into
  the output folder (:data:`SYNC_LOGGER`, which logs a failed copy's traceback as text) and of Ray's
  token notice (:data:`AUTH_LOGGER`), named after the modules that log them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from ray._private import ray_logging
from ray._private.worker import filter_autoscaler_events
from ray.tune.experiment.trial import Trial

LOG_PRINTER = "ray_print_logs"  # the name ray._private.worker registers its printer under
# Where Ray Tune logs a failed trial's traceback, a failed save of its state, and its resume hint.
TUNE_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state", "ray.tune.tune")
SYNC_LOGGER = "ray.train._internal.syncer"  # copies the sweep state (experiment, checkpoints) to storage
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"  # a new local Ray's token notice

LogRecord = dict  # one batch of a worker's output: pid, ip, is_err, lines, task_name (Ray's keys)


def replace_log_printer(handler: Callable[[LogRecord], None]) -> Callable[[LogRecord], None] | None:
    """Send the workers' log records to ``handler`` instead of Ray's printer, and return Ray's printer;
    None, changing nothing, where Ray prints none (Ray Client, ``log_to_driver=False``)."""
    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    with dispatcher._lock:
        found = [h for name, h in dispatcher.handlers if name == LOG_PRINTER]
    if not found:
        return None
    dispatcher.remove_handler(LOG_PRINTER)
    dispatcher.add_handler(LOG_PRINTER, handler)
    return found[0]


def restore_log_printer(printer: Callable[[LogRecord], None]) -> None:
    """Put ``printer`` (what :func:`replace_log_printer` returned) back in place of distlap's handler."""
    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    dispatcher.remove_handler(LOG_PRINTER)
    dispatcher.add_handler(LOG_PRINTER, printer)


def autoscaler_events(lines: list[str]) -> list[str]:
    """The events among the lines of the autoscaler's periodic status report (the rest is no news)."""
    try:
        return list(filter_autoscaler_events(lines))
    except Exception:  # noqa: BLE001 -- Ray's filter asks the cluster which autoscaler runs; no answer: none
        return []


@contextlib.contextmanager
def retry_decision(decide: Callable[[Trial], bool]) -> Iterator[None]:
    """Inside this block Ray Tune retries a failed trial if and only if ``decide(trial)`` (Tune's own
    rule: failures so far <= ``max_failures``); Tune's rule again afterwards."""
    original = Trial.should_recover
    Trial.should_recover = decide
    try:
        yield
    finally:
        Trial.should_recover = original


def failures(trial: Trial) -> int:
    """How many times ``trial`` has failed so far, the one that Tune is handling included."""
    return trial.run_metadata.num_failures


def forgive_failure(trial: Trial) -> None:
    """Take back the failure Tune has just counted for ``trial`` (it was not the trial's)."""
    trial.run_metadata.num_failures -= 1


def trial_error(trial: Trial) -> BaseException | None:
    """The exception Tune just recorded for ``trial``: its local error pickle (the copy in the sweep's
    storage is only synced later), else the storage's copy; None if there is none or it is unreadable."""
    import cloudpickle

    try:
        if trial.pickled_error_file and os.path.isfile(trial.pickled_error_file):
            with open(trial.pickled_error_file, "rb") as f:
                return cloudpickle.load(f)
        return trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 - an unreadable error file (e.g. a full disk) is no error class
        return None


def failure_message(trial: Trial) -> str:
    """Why ``trial`` failed, in one line: the last line of its error (:func:`trial_error`; for an error
    raised in a Ray task, the original exception's ``Class: message``)."""
    error = trial_error(trial)
    lines = str(error).strip().splitlines() if error else []
    return lines[-1] if lines else "unknown error"
