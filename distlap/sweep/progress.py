"""What a sweep prints: one progress view instead of Ray Tune's tables, and closing lines that say where
everything is and how to look at it.

- :func:`quiet_start` (before ``ray.init``) drops the start-up messages nobody can act on: Ray's
  notice that a new local Ray uses token authentication (it still does),
  Optuna's "new study created", MLflow's "creating database tables" and Tune's INFO lines.
- :class:`ProgressView` is a Ray Tune callback (run Tune with ``verbose=0``): a line when a trial starts,
  fails or finishes, and a status line (trials done / running / failed / to start, the current best
  with its Δ_ECE interval, elapsed time and an estimate of the time left) at each of those and every
  ``every_s`` seconds. It also takes over Ray's printing of the trials' output: every trial line as it
  came, one line per layer subset, without Ray's ``(pid=...)`` prefix and without Ray's deduplication
  (which hid subset lines as "[repeated 2x across cluster]"); at the end it waits for the trials' last
  lines, so they come before the summary.
- :func:`closing_lines`: the output folder's contents and the exact ``mlflow ui``, ``optuna-dashboard``,
  ``optuna trials`` and report commands, with the URL of the sweep's MLflow runs table.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

import optuna
from ray import tune

from distlap import names
from distlap.sweep import ray_compat
from distlap.sweep.kinds import report_command
from distlap.sweep.settings import SweepConfig, sqlite_path
from distlap.sweep.tracking import experiment_id, view_key

_TRIAL_LINE = re.compile(r"^\[(?P<trial>[0-9A-Za-z_]+)\] (?:\[distlap\] )?(?P<text>.*)$")
_DROPPED = ("Checkpoint successfully created at",)  # Tune's note on every report with a checkpoint
_DONE = "stage: done"
MLFLOW_PORT, DASHBOARD_PORT = 5000, 8080  # the defaults of `mlflow ui` and `optuna-dashboard`


def quiet_start(address: str | None) -> None:
    """Before ``ray.init``: keep only the start-up messages a user can act on."""
    if address is None:
        # A new local Ray turns token authentication on and says so in a warning that asks nothing of
        # the user (the token is made and used for them). Authentication stays on; the note goes.
        logging.getLogger(ray_compat.AUTH_LOGGER).setLevel(logging.ERROR)
    # Tune's output engine: with verbose=0 the legacy one prints nothing; the new one still prints a
    # config box, the results folder and a TensorBoard hint. ProgressView prints the progress instead.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow.store.db.utils", "alembic", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe_params(params: dict) -> str:
    """``λ=43.12, r=4`` (labels from :mod:`distlap.names`; the MLflow run id left out)."""
    shown = {k: v for k, v in params.items() if k != names.RUN_ID}
    return ", ".join(
        f"{names.PARAMS[k].label if k in names.PARAMS else k}={_value(v)}" for k, v in shown.items()
    )


def best_line(metric: str, result: dict, trial_id: str, params: dict) -> str:
    """``best bayes/val/nll = 1.632 (trial fb8f7661: λ=43.12, r=4; Δ_ECE -0.0049, 95% CI [...])``."""
    delta = names.delta("bayes", "test", "ece")
    low, high = names.interval(delta)
    interval = ""
    if all(isinstance(result.get(k), int | float) for k in (delta, low, high)):
        interval = f"; {delta} {result[delta]:+.4f}, 95% CI [{result[low]:+.4f}, {result[high]:+.4f}]"
    return f"best {metric} = {result[metric]:.4f} (trial {trial_id}: {describe_params(params)}{interval})"


def time_left(durations: list[float], ages: list[float], to_start: int, concurrency: int) -> float | None:
    """Seconds left: trials to start take the mean finished trial's time, running ones what remains of
    it; spread over ``concurrency`` slots. None before any trial has finished."""
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    work = to_start * mean + sum(max(mean - age, 0.0) for age in ages)
    return work / max(concurrency, 1)


class ProgressView(tune.Callback):
    """Ray Tune callback: the sweep's progress as a few readable lines (see the module docstring)."""

    def __init__(
        self, cfg: SweepConfig, concurrency: int, *, log: Callable[[str], None] = print, every_s=60.0
    ):
        self.metric, self.direction = cfg.search.metric, cfg.search.direction
        self.num_samples, self.concurrency, self.log, self.every_s = (
            cfg.search.num_samples,
            concurrency,
            log,
            every_s,
        )
        self._setup_state()

    def _setup_state(self) -> None:
        self._lock = threading.Lock()
        self._start = self._last_status = time.monotonic()
        self._started: dict[str, float] = {}
        self._ended: dict[str, str] = {}  # trial id -> TERMINATED | ERROR, before Tune itself says so
        self._where: dict[str, tuple] = {}  # trial id -> (pid, ip) of the process its lines come from
        self._done_lines: set[str] = set()
        self._last_line = time.monotonic()
        self._previous_printer: Callable | None = None
        self._last_news = ""

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment state
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k != "log"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, log=print)
        self._setup_state()

    # --- Tune's events -----------------------------------------------------------------------------

    def setup(self, **info) -> None:
        self._start = self._last_status = time.monotonic()
        self._attach()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._started[trial.trial_id] = time.monotonic()
        self._say(f"[{trial.trial_id}] started: {describe_params(trial.config)}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        value = (trial.last_result or {}).get(self.metric)
        shown = f"{self.metric} = {value:.4f}" if isinstance(value, int | float) else "no objective"
        self._ended[trial.trial_id] = "TERMINATED"
        took = _clock(time.monotonic() - self._started.get(trial.trial_id, self._start))
        self._say(f"[{trial.trial_id}] completed after {took}: {shown}")
        self._status(trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended[trial.trial_id] = "ERROR"
        self._say(f"[{trial.trial_id}] FAILED: {ray_compat.failure_message(trial)}")
        self._status(trials)

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self._last_status >= self.every_s:
            self._status(trials)

    def on_experiment_end(self, trials, **info) -> None:
        # only trials that completed in this run: a resumed sweep's earlier trials print nothing now
        self._drain({tid for tid, status in self._ended.items() if status == "TERMINATED"})
        self._detach()
        self._status(trials, if_changed=True)

    # --- the status line ---------------------------------------------------------------------------

    def status_line(self, trials, now: float | None = None) -> str:
        """``[sweep] 1:05 elapsed | 1 of 4 done, 2 running, 0 failed, 1 to start | best ... | about 0:50
        left``: the trials by state, the best so far with its interval, and the estimated time left."""
        now = time.monotonic() if now is None else now
        by_status: dict[str, list] = {}
        for trial in trials:
            by_status.setdefault(self._ended.get(trial.trial_id, trial.status), []).append(trial)
        done, failed = by_status.get("TERMINATED", []), by_status.get("ERROR", [])
        running = by_status.get("RUNNING", [])
        to_start = max(self.num_samples - len(done) - len(failed) - len(running), 0)
        parts = [
            f"{_clock(now - self._start)} elapsed",
            f"{len(done)} of {self.num_samples} done, {len(running)} running, {len(failed)} failed, "
            f"{to_start} to start",
        ]
        best = self._best(done)
        parts.append(
            best_line(self.metric, best.last_result, best.trial_id, best.config) if best else "no best yet"
        )
        durations = [_duration(t) for t in done if _duration(t) is not None]
        ages = [now - self._started.get(t.trial_id, now) for t in running]
        left = time_left(durations, ages, to_start, self.concurrency)
        if to_start or running:
            parts.append(
                f"about {_clock(left)} left" if left is not None else "time left: after the first trial"
            )
        return "[sweep] " + " | ".join(parts)

    def _best(self, done: list):
        scored = [t for t in done if isinstance((t.last_result or {}).get(self.metric), int | float)]
        if not scored:
            return None
        pick = min if self.direction == "min" else max
        return pick(scored, key=lambda t: t.last_result[self.metric])

    def _status(self, trials, *, if_changed: bool = False) -> None:
        """Print the status line (with ``if_changed``: only if more than the elapsed time changed)."""
        self._last_status = time.monotonic()
        line = self.status_line(trials)
        news = line.split(" | ", 1)[-1]
        if not (if_changed and news == self._last_news):
            self._last_news = news
            self._say(line)

    def _say(self, line: str, stream=None) -> None:
        with self._lock:
            if stream is None:
                self.log(line)
            else:
                print(line, file=stream, flush=True)

    # --- the trials' own lines ---------------------------------------------------------------------

    def _attach(self) -> None:
        """Print the trials' output ourselves, in place of Ray's printer (absent with Ray Client)."""
        self._previous_printer = ray_compat.replace_log_printer(self.worker_lines)

    def _detach(self) -> None:
        if self._previous_printer is not None:
            ray_compat.restore_log_printer(self._previous_printer)
            self._previous_printer = None

    def worker_lines(self, data: dict) -> None:
        """One batch of a worker's output (Ray's log record): trial lines as they are, Tune's
        checkpoint notes dropped, anything else (warnings, tracebacks) kept with its process id."""
        self._last_line = time.monotonic()
        stream = sys.stderr if data.get("is_err") else sys.stdout
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its periodic status report; only its events are news
            lines = [f"(autoscaler) {line}" for line in ray_compat.autoscaler_events(lines)]
        for line in lines:
            match = _TRIAL_LINE.match(line)
            if match:
                self._origin(match["trial"], data, stream)
                text = match["text"]
                if text.startswith(_DONE):
                    self._done_lines.add(match["trial"])
                self._say(f"[{match['trial']}] {text}", stream)
            elif line.startswith("(autoscaler)"):
                self._say(line, stream)
            elif line.strip() and not line.startswith(_DROPPED):
                self._say(f"({data.get('task_name') or 'worker'}, pid {data.get('pid')}) {line}", stream)

    def _origin(self, trial: str, data: dict, stream) -> None:
        """``[<trial>] runs in pid N on IP``, once per trial process (again after a retry elsewhere)."""
        where = (data.get("pid"), data.get("ip"))
        if self._where.get(trial) != where:
            self._where[trial] = where
            self._say(f"[{trial}] runs in pid {where[0]} on {where[1]}", stream)

    def _drain(self, finished: set[str], timeout_s: float = 10.0, quiet_s: float = 0.5) -> None:
        """Wait (at most ``timeout_s``) for the last lines of the ``finished`` trials, then for a moment
        without output, so the trials' lines come before the summary."""
        if self._previous_printer is None:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            waiting = finished - self._done_lines
            if not waiting and time.monotonic() - self._last_line >= quiet_s:
                return
            time.sleep(0.1)


def _duration(trial) -> float | None:
    result = trial.last_result or {}
    value = result.get(names.WALL_TIME, result.get("time_total_s"))
    return float(value) if isinstance(value, int | float) else None


# --- the closing lines -----------------------------------------------------------------------------


def runs_url(base: str, experiment_id: str | None, view: str) -> str:
    """The MLflow UI's runs table of the sweep, in the "Model training" mode (not the GenAI overview),
    with the sweep's shared view (its runs in tree order, the key metrics as columns)."""
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    return (
        f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={quote(view, safe='')}"
        "&workflowType=machine_learning"
    )


def _outputs(cfg: SweepConfig) -> list[tuple[str, str]]:
    items = [
        (names.SUMMARY_FILE, "one row per trial: settings, objective, key metrics, MLflow run id"),
        (f"{names.REPORT_DIR}/", "report.html, tables and figures (also on the sweep's MLflow run)"),
        (f"{names.TRIALS_DIR}/", "per trial: config, results JSON, adapter, reliability diagrams"),
        (f"{names.RAY_DIR}/", "Ray Tune's experiment state and fine-tuning checkpoints"),
        (names.CONFIG_FILE, "the sweep's config (what --resume reads)"),
    ]
    for uri, what in ((cfg.tracking.uri, "MLflow runs"), (cfg.search.storage, "the Optuna study")):
        path = sqlite_path(uri) if uri else None
        if path is not None:
            items.append((path.name, what))
    return [(name, what) for name, what in items if (cfg.out / name.rstrip("/")).exists()]


def closing_lines(cfg: SweepConfig, experiment_id: str | None) -> list[str]:
    """Where everything is and the exact commands to look at it (the sweep's last lines)."""
    lines = [f"[sweep] everything is in {cfg.out}:"]
    lines += [f"          {name:<14} {what}" for name, what in _outputs(cfg)]
    uri, study = cfg.tracking.uri, cfg.search.study_name
    # Commands are quoted for a shell (a folder may be named "k9 #1 {a} it's"); Optuna runs str.format
    # on a storage URL (distlap.sweep.study.storage), so its braces are doubled.
    storage = shlex.quote(cfg.search.storage.replace("{", "{{").replace("}", "}}"))
    if uri.startswith(("http://", "https://")):
        lines.append(f"[sweep] MLflow: open {runs_url(uri.rstrip('/'), experiment_id, view_key(study))}")
    else:
        base = f"http://127.0.0.1:{MLFLOW_PORT}"
        lines += [
            f"[sweep] MLflow:  mlflow ui --backend-store-uri {shlex.quote(uri)}",
            f"           then open {runs_url(base, experiment_id, view_key(study))}",
        ]
    lines += [
        f"[sweep] Optuna:  optuna-dashboard {storage}",
        f"           then open http://127.0.0.1:{DASHBOARD_PORT}/ (study {study!r})",
        f"[sweep]          optuna trials --storage {storage} --study-name {shlex.quote(study)}",
        f"[sweep] report:  {report_command(cfg)}",
    ]
    return lines


def print_closing(cfg: SweepConfig, log: Callable[[str], None] = print, wall_s: float | None = None) -> None:
    """The sweep's wall time (start-up, trials and report), then :func:`closing_lines` with the
    experiment's id read from MLflow."""
    if wall_s is not None:
        log(f"[sweep] finished in {_clock(wall_s)} (start-up, trials and report)")
    for line in closing_lines(cfg, experiment_id(cfg.tracking.uri, cfg.tracking.experiment)):
        log(line)
