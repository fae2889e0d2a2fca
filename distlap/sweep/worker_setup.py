"""What Ray runs first in every worker of a sweep (``runtime_env``'s ``worker_process_setup_hook``).

It imports nothing but the standard library: Ray runs the hook in every worker it starts (idle pool
workers included) before the worker's first task, so a hook that imported distlap's driver pulled torch,
transformers and laplace-torch into each of them. Two actors under such a ``ray.init`` were ready after
8.8 s instead of 1.3 s on the quiet 2-core machine (33-36 s instead of 4-6 s under load). A whole smoke
sweep on the quiet machine is no faster (34 s either way): its trials import what they use anyway; the
gain is in workers that need none of it and on a loaded machine.
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
