"""What Ray runs first in every worker of a sweep (``runtime_env``'s ``worker_process_setup_hook``).

It imports nothing but the standard library: Ray runs the hook in every worker it starts (idle pool
workers included) before the worker's first task, so a hook that imported distlap's driver pulled torch,
transformers and laplace-torch into each of them. On 2 cores two actors then took 55 s to be ready
instead of 4 s (``ray.init`` with and without that hook, one run each on a loaded machine); the trials
import what they use themselves.
"""

from __future__ import annotations

import sys


def quiet_worker() -> None:
    """In a Ray worker: keep Python's report of exceptions it cannot raise, except ``SystemExit``.

    Ray's SIGTERM handler raises ``SystemExit`` wherever the worker is; inside a weakref callback or a
    ``__del__`` Python cannot raise it and prints "Exception ignored ... Traceback ... SystemExit: 1"
    instead (seen when Tune stops a finished trial's worker). What the worker does next is unchanged;
    only that traceback, which no one can act on, is not printed. Any other exception still is.
    """
    default = sys.__unraisablehook__

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            default(unraisable)

    sys.unraisablehook = hook


# The hook as Ray takes it: a dotted name the workers import themselves (not a pickled function).
WORKER_SETUP = f"{__name__}.{quiet_worker.__name__}"
