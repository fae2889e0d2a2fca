"""distlap.sweep.worker_setup: the hook Ray runs in every worker of a sweep: standard library only, and
it keeps every unraisable exception's report but Ray's SystemExit from a SIGTERM."""

import subprocess
import sys

import pytest

from distlap.sweep.worker_setup import WORKER_SETUP, quiet_worker


def test_the_hook_imports_no_heavy_library():
    """Ray runs it in every worker it starts: importing distlap's driver there cost each idle worker
    torch, transformers and laplace-torch (two actors ready after 8.8 s instead of 1.3 s on 2 quiet cores)."""
    code = (
        f"import importlib, sys; importlib.import_module({WORKER_SETUP.rsplit('.', 1)[0]!r}); "
        "heavy = ('torch', 'ray', 'transformers', 'laplace', 'mlflow', 'optuna'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]"
    assert WORKER_SETUP == "distlap.sweep.worker_setup.quiet_worker"


_WORKER_SCRIPT = """
import os, signal, time, weakref
import ray
from distlap.sweep import driver

class Thing:
    pass

@ray.remote
def stopped_in_a_callback():
    # Ray's SIGTERM handler raises SystemExit; inside a weakref callback Python can only report it.
    thing = Thing()
    ref = weakref.ref(thing, lambda _: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.2)))
    del thing  # the callback runs here (``ref`` is still alive)
    return "went on"

class Broken:
    def __del__(self):
        raise ValueError("a real fault in __del__")

@ray.remote
def other_fault():
    Broken()
    return "went on"

driver._connect(None)
print(ray.get(stopped_in_a_callback.remote()), ray.get(other_fault.remote()), flush=True)
time.sleep(2)  # let Ray forward the workers' output
ray.shutdown()
"""


@pytest.mark.slow
def test_a_worker_stopped_in_a_weakref_callback_prints_no_traceback(tmp_path):
    """The sweep's Ray (``driver._connect``) runs :func:`quiet_worker` in its workers: Ray's SystemExit
    from a SIGTERM that lands in a weakref callback is not printed (CI once failed on that traceback),
    other faults are."""
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER_SCRIPT], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "went on went on" in out
    assert "ValueError: a real fault in __del__" in out  # other exceptions are still reported
    assert "SystemExit" not in out and "sigterm_handler" not in out, out[-3000:]


def test_quiet_worker_keeps_every_unraisable_but_system_exit(capsys, monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    quiet_worker()

    class Raises:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    Raises(SystemExit(1))
    assert capsys.readouterr().err == ""
    Raises(ValueError("kept"))
    assert "ValueError: kept" in capsys.readouterr().err
