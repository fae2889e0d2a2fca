"""The Ray internals of distlap.sweep.ray_compat, checked against the installed Ray.

Each check names the Ray version and what moved, so that an upgrade fails here, loudly, instead of the
sweep quietly printing Ray's deduplicated lines or retrying trials by Ray's own rules. The checks read
Ray itself (attributes, signatures, the source lines that call the hooks); the tests after them run
the hooks.
"""

from __future__ import annotations

import importlib
import inspect
import re
from types import SimpleNamespace

import pytest
import ray

WRITTEN_FOR = "2.60"  # the Ray whose internals distlap.sweep.ray_compat was written against


def _moved(what: str, used_by: str) -> str:
    return (
        f"Ray {ray.__version__} (distlap.sweep.ray_compat was written for Ray {WRITTEN_FOR}): {what}. "
        f"Used by {used_by}: adapt distlap/sweep/ray_compat.py to this Ray"
    )


def _get(dotted: str, used_by: str):
    """``package.module:attr.attr`` from the installed Ray, or a failure naming what is gone."""
    module_name, _, attrs = dotted.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        pytest.fail(_moved(f"module {module_name} is gone ({err})", used_by), pytrace=False)
    for attr in filter(None, attrs.split(".")):
        if not hasattr(obj, attr):
            pytest.fail(_moved(f"{dotted} is gone ({attr!r} not found)", used_by), pytrace=False)
        obj = getattr(obj, attr)
    return obj


def _parameters(fn) -> list[str] | None:
    """The parameter names of ``fn``; None if it is absent or not callable."""
    return list(inspect.signature(fn).parameters) if callable(fn) else None


def _expect(condition: bool, what: str, used_by: str) -> None:
    if not condition:
        pytest.fail(_moved(what, used_by), pytrace=False)


PRINTER = "the progress view's printing of trial lines (replace_log_printer)"
RETRIES = "distlap's retry rules (retry_decision, failures, forgive_failure)"
ERRORS = "the failed-trial message and the store-fault check (trial_error, failure_message)"


def test_the_worker_output_dispatcher():
    dispatcher = _get("ray._private.ray_logging:global_worker_stdstream_dispatcher", PRINTER)
    for method, params in (("add_handler", ["name", "handler"]), ("remove_handler", ["name"])):
        found = _parameters(getattr(dispatcher, method, None))
        _expect(found == params, f"expected dispatcher.{method}{tuple(params)}, found {found}", PRINTER)
    _expect(isinstance(getattr(dispatcher, "handlers", None), list), "dispatcher.handlers (a list)", PRINTER)
    _expect(hasattr(getattr(dispatcher, "_lock", None), "__enter__"), "dispatcher._lock (a lock)", PRINTER)
    fresh = type(dispatcher)()  # the same class, so the real one is left alone
    fresh.add_handler("x", print)
    _expect(fresh.handlers == [("x", print)], "dispatcher.handlers holds (name, handler) pairs", PRINTER)
    fresh.remove_handler("x")
    _expect(fresh.handlers == [], "dispatcher.remove_handler(name) removes by name", PRINTER)


def test_ray_registers_its_printer_under_the_name_distlap_replaces():
    from distlap.sweep import ray_compat

    source = inspect.getsource(_get("ray._private.worker", PRINTER))
    registered = re.findall(r"add_handler\(\s*\"([^\"]+)\"", source)
    _expect(
        ray_compat.LOG_PRINTER in registered,
        f"ray._private.worker registers its printer as {registered}, not {ray_compat.LOG_PRINTER!r}",
        PRINTER,
    )


def test_the_log_records_keys():
    printer = _get("ray._private.worker:print_to_stdstream", PRINTER)
    source = inspect.getsource(printer) + inspect.getsource(
        _get("ray._private.worker:print_worker_logs", PRINTER)
    )
    for key in ("pid", "ip", "is_err", "lines", "task_name"):
        _expect(
            re.search(rf"[\[(]\"{key}\"", source) is not None, f"Ray's log records have no {key!r}", PRINTER
        )


def test_the_autoscaler_filter():
    fn = _get("ray._private.worker:filter_autoscaler_events", PRINTER)
    found = _parameters(fn)
    _expect(found == ["lines"], f"expected filter_autoscaler_events(lines), found {found}", PRINTER)


def test_tune_asks_should_recover_when_a_trial_fails():
    trial = _get("ray.tune.experiment.trial:Trial", RETRIES)
    should_recover = getattr(trial, "should_recover", None)
    _expect(
        inspect.isfunction(should_recover) and _parameters(should_recover) == ["self"],
        f"expected Trial.should_recover(self), a plain method; found {should_recover!r}",
        RETRIES,
    )
    _expect(
        "self.run_metadata.num_failures" in inspect.getsource(should_recover),
        "Trial.should_recover no longer counts self.run_metadata.num_failures",
        RETRIES,
    )
    failure = _get("ray.tune.execution.tune_controller:TuneController._process_trial_failure", RETRIES)
    _expect(
        "trial.should_recover()" in inspect.getsource(failure),
        "TuneController._process_trial_failure no longer asks trial.should_recover()",
        RETRIES,
    )


def test_where_tune_keeps_a_trials_error():
    trial = _get("ray.tune.experiment.trial:Trial", ERRORS)
    _expect(
        isinstance(inspect.getattr_static(trial, "pickled_error_file", None), property),
        "Trial.pickled_error_file is no longer a property",
        ERRORS,
    )
    for method in ("get_pickled_error", "get_error"):
        found = _parameters(getattr(trial, method, None))
        _expect(found == ["self"], f"expected Trial.{method}(self), found {found}", ERRORS)


@pytest.mark.parametrize("name", ["TUNE_LOGGERS", "SYNC_LOGGER", "AUTH_LOGGER"])
def test_the_loggers_are_the_modules_that_log(name):
    from distlap.sweep import ray_compat

    loggers = getattr(ray_compat, name)
    for logger in (loggers,) if isinstance(loggers, str) else loggers:
        source = inspect.getsource(_get(logger, f"the quiet console (ray_compat.{name})"))
        _expect("getLogger(__name__)" in source, f"{logger} logs under another name", f"ray_compat.{name}")


# --- the hooks, run -----------------------------------------------------------------------------------


def test_the_printer_is_replaced_and_put_back():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from distlap.sweep import ray_compat

    assert ray_compat.replace_log_printer(print) is None  # no Ray printer (Ray not started): nothing changes
    assert all(name != ray_compat.LOG_PRINTER for name, _ in dispatcher.handlers)
    rays, ours = (lambda data: None), (lambda data: None)
    dispatcher.add_handler(ray_compat.LOG_PRINTER, rays)
    try:
        assert ray_compat.replace_log_printer(ours) is rays
        assert (ray_compat.LOG_PRINTER, ours) in dispatcher.handlers
        assert (ray_compat.LOG_PRINTER, rays) not in dispatcher.handlers
        ray_compat.restore_log_printer(rays)
        assert [h for name, h in dispatcher.handlers if name == ray_compat.LOG_PRINTER] == [rays]
    finally:
        dispatcher.remove_handler(ray_compat.LOG_PRINTER)


def test_retry_decision_is_asked_inside_the_block_only():
    from ray.tune.experiment.trial import Trial

    from distlap.sweep import ray_compat

    original = Trial.should_recover
    asked = []
    with ray_compat.retry_decision(lambda trial: asked.append(trial) or False):
        assert Trial.should_recover("t") is False and asked == ["t"]
    assert Trial.should_recover is original
    trial = SimpleNamespace(run_metadata=SimpleNamespace(num_failures=2))
    ray_compat.forgive_failure(trial)
    assert ray_compat.failures(trial) == 1


def _failed(error, pickled_error_file=None):
    return SimpleNamespace(
        pickled_error_file=pickled_error_file, get_pickled_error=lambda: error, get_error=lambda: None
    )


def test_the_failure_message_is_the_errors_last_line():
    from distlap.sweep import ray_compat

    error = RuntimeError("ray::ImplicitFunc.train()\n  File ...\nTrialFailed: non-finite training loss")
    assert ray_compat.failure_message(_failed(error)) == "TrialFailed: non-finite training loss"
    assert ray_compat.failure_message(_failed(None)) == "unknown error"
    assert ray_compat.failure_message(_failed(RuntimeError(""))) == "unknown error"


def test_the_failure_message_is_there_when_tune_calls_back(tmp_path):
    """When Tune's on_trial_error callbacks run, the error pickle is in the trial's local folder and not
    yet in the sweep's storage: the message is read from the local one."""
    import cloudpickle

    from distlap.sweep import ray_compat

    local = tmp_path / "error.pkl"
    local.write_bytes(cloudpickle.dumps(RuntimeError("Traceback ...\nTrialFailed: non-finite training loss")))
    assert ray_compat.failure_message(_failed(None, str(local))) == "TrialFailed: non-finite training loss"


def test_the_error_is_read_where_tune_just_wrote_it(tmp_path):
    import cloudpickle

    from distlap.sweep import ray_compat

    local = tmp_path / "error.pkl"
    local.write_bytes(cloudpickle.dumps(OSError(28, "No space left on device")))
    found = ray_compat.trial_error(_failed(None, str(local)))
    assert isinstance(found, OSError) and found.errno == 28
    assert isinstance(ray_compat.trial_error(_failed(ValueError("x"))), ValueError)  # the storage's copy
    local.write_bytes(b"not a pickle")
    assert ray_compat.trial_error(_failed(None, str(local))) is None


@pytest.mark.slow
def test_a_local_ray_prints_through_the_printer_distlap_replaces():
    """The live check of the name: a started Ray registers its printer where distlap looks for it."""
    from distlap.sweep import ray_compat

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=True)
    try:
        previous = ray_compat.replace_log_printer(print)
        _expect(
            previous is not None, f"a started Ray has no printer named {ray_compat.LOG_PRINTER!r}", PRINTER
        )
        ray_compat.restore_log_printer(previous)
    finally:
        ray.shutdown()
