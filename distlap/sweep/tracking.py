"""MLflow tracking of a sweep: a parent run per sweep, a child run per trial, a grandchild per layer subset.

Runs are made and found through ``MlflowClient`` with explicit run ids and tags, never the fluent
active-run stack (it does not travel to Ray workers). ``mlflow.parentRunId`` nests the runs in the UI;
the tags ``distlap.sweep``, ``ray_trial_id`` and ``distlap.subset`` make every lookup idempotent, so a
resumed sweep or a retried trial reopens its run instead of adding a duplicate. SQLite writers stay
few: the driver creates the sweep and trial runs, each trial process logs its own run and its subsets
(the Ray subset tasks log nothing), and a write that meets "database is locked" is retried.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from distlap.names import ERROR, KIND_TAG, SUBSET_TAG, SWEEP_TAG, TRIAL_TAG

_BATCH = 100  # MLflow accepts at most 100 params or tags per log_batch


def retry_locked(fn: Callable, *, attempts: int = 8, first_wait_s: float = 0.2) -> Callable:
    """Retry ``fn`` while SQLite answers "database is locked" (several processes write one file)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # MLflow wraps sqlite3.OperationalError in its own exception types
                if "database is locked" not in str(err) or attempt == attempts - 1:
                    raise
                time.sleep(first_wait_s * 2**attempt)

    return wrapper


class _Client:
    """``MlflowClient`` whose every call is retried on a locked SQLite database."""

    def __init__(self, uri: str):
        self._client = MlflowClient(tracking_uri=uri)

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        return retry_locked(attr) if callable(attr) else attr


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"peft": {"rank": 8}} -> {"peft.rank": 8}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def provenance_tags(prov: dict) -> dict[str, str]:
    """``distlap.provenance.provenance()`` -> MLflow tags (git commit and dirty flag, versions, device)."""
    tags = {key: str(value) for key, value in prov.items() if key != "packages"}
    tags.update({f"version.{name}": str(version) for name, version in prov.get("packages", {}).items()})
    if prov.get("git_commit"):
        tags["mlflow.source.git.commit"] = prov["git_commit"]
    return tags


def literal(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter: single-quoted, or double-quoted when it
    holds a single quote (MLflow's filter grammar has no escapes, so one holding both is refused)."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r}: MLflow cannot search for a name holding both ' and \"; rename it")


def _find_run(client: _Client, experiment_id: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{key}` = {literal(value)}" for key, value in tags.items())
    runs = client.search_runs([experiment_id], query, max_results=2)
    if len(runs) > 1:
        raise RuntimeError(f"MLflow holds several runs tagged {tags}; expected at most one")
    return runs[0].info.run_id if runs else None


def _find_or_create(
    client: _Client,
    experiment_id: str,
    key_tags: dict[str, str],
    *,
    run_name: str,
    tags: dict[str, str] | None = None,
) -> tuple[str, bool]:
    """The run carrying ``key_tags``, made (with ``tags`` too) if there is none; (run id, created)."""
    run_id = _find_run(client, experiment_id, key_tags)
    if run_id is not None:
        return run_id, False
    run = client.create_run(experiment_id, tags={**key_tags, **(tags or {})}, run_name=run_name)
    return run.info.run_id, True


def _log(
    client: _Client,
    run_id: str,
    *,
    metrics: dict[str, Any] | None = None,
    step: int = 0,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
) -> None:
    now = int(time.time() * 1000)
    metric_rows = [
        Metric(k, float(v), now, step)
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    param_rows = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    tag_rows = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    client.log_batch(run_id, metrics=metric_rows)
    for rows, kind in ((param_rows, "params"), (tag_rows, "tags")):
        for i in range(0, len(rows), _BATCH):
            client.log_batch(run_id, **{kind: rows[i : i + _BATCH]})


@dataclass(frozen=True)
class SweepTracker:
    """The driver's handle on a sweep's runs. Plain strings only: it is pickled with the searcher."""

    uri: str
    experiment_id: str
    parent_run_id: str
    sweep_id: str

    @classmethod
    def open(
        cls,
        uri: str,
        experiment: str,
        sweep_id: str,
        *,
        run_name: str,
        artifact_location: str | None = None,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> SweepTracker:
        """Create (or, on resume, reopen) the experiment and the sweep's parent run."""
        client = _Client(uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else client.create_experiment(experiment, artifact_location=artifact_location)
        )
        run_id, created = _find_or_create(
            client, experiment_id, {SWEEP_TAG: sweep_id, KIND_TAG: "sweep"}, run_name=run_name
        )
        if created:
            _log(client, run_id, params=params, tags=tags)
        else:
            client.update_run(run_id, status="RUNNING")
        return cls(uri, experiment_id, run_id, sweep_id)

    def _key(self, ray_trial_id: str) -> dict[str, str]:
        return {SWEEP_TAG: self.sweep_id, KIND_TAG: "trial", TRIAL_TAG: ray_trial_id}

    def find_trial_run(self, ray_trial_id: str) -> str | None:
        return _find_run(_Client(self.uri), self.experiment_id, self._key(ray_trial_id))

    def trial_run(self, ray_trial_id: str, *, run_name: str, params: dict[str, Any]) -> str:
        """The trial's child run (created SCHEDULED with the searched ``params``), found if it exists."""
        client = _Client(self.uri)
        run_id, created = _find_or_create(
            client,
            self.experiment_id,
            self._key(ray_trial_id),
            run_name=run_name,
            tags={MLFLOW_PARENT_RUN_ID: self.parent_run_id},
        )
        if created:
            _log(client, run_id, params=params)
            client.update_run(run_id, status="SCHEDULED")
        return run_id

    def discard(self, run_id: str) -> None:
        """Delete a trial run and its subset runs (a trial that restarts afresh gets a new run)."""
        client = _Client(self.uri)
        query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = {literal(run_id)}"
        for child in client.search_runs([self.experiment_id], query, max_results=1000):
            client.delete_run(child.info.run_id)
        client.delete_run(run_id)

    def kill_unfinished(self) -> None:
        """Trial and subset runs of this sweep still RUNNING or SCHEDULED (the sweep was interrupted)
        become KILLED; ``--resume`` marks them RUNNING again when their trial restarts."""
        client = _Client(self.uri)
        query = f"tags.`{SWEEP_TAG}` = {literal(self.sweep_id)} and tags.`{KIND_TAG}` = 'trial'"
        trials = [r.info.run_id for r in client.search_runs([self.experiment_id], query, max_results=10000)]
        for run_id in trials:
            child_query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = {literal(run_id)}"
            children = client.search_runs([self.experiment_id], child_query, max_results=1000)
            for run in [client.get_run(run_id), *children]:
                if run.info.status in ("RUNNING", "SCHEDULED"):
                    client.set_terminated(run.info.run_id, status="KILLED")

    def mark_failed(self, run_id: str, message: str) -> None:
        """FAILED with ``message``, unless the trial process already ended the run itself."""
        client = _Client(self.uri)
        run = client.get_run(run_id)
        if run.info.status in ("RUNNING", "SCHEDULED"):
            client.set_tag(run_id, ERROR, message)
            client.set_terminated(run_id, status="FAILED")

    def error_message(self, run_id: str) -> str | None:
        return _Client(self.uri).get_run(run_id).data.tags.get(ERROR)

    def finish(self, *, metrics: dict[str, Any], artifacts: Iterable[Path], status: str = "FINISHED") -> None:
        client = _Client(self.uri)
        _log(client, self.parent_run_id, metrics=metrics)
        for path in artifacts:
            client.log_artifact(self.parent_run_id, str(path))
        client.set_terminated(self.parent_run_id, status=status)


class TrialRun:
    """A trial process's handle on its run: ``with TrialRun(uri, run_id) as run: ...``.

    Entering marks the run RUNNING (again, on a retry); leaving marks it FINISHED, or FAILED with the
    exception's message in the ``error`` tag.
    """

    def __init__(self, uri: str, run_id: str):
        self.client = _Client(uri)
        self.run_id = run_id
        self.experiment_id = self.client.get_run(run_id).info.experiment_id

    def __enter__(self) -> TrialRun:
        if ERROR in self.client.get_run(self.run_id).data.tags:  # left by a failed earlier attempt
            self.client.delete_tag(self.run_id, ERROR)
        self.client.update_run(self.run_id, status="RUNNING")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.client.set_tag(self.run_id, ERROR, f"{type(exc).__name__}: {exc}"[:5000])
        self.client.set_terminated(self.run_id, status="FAILED" if exc is not None else "FINISHED")

    def log(
        self,
        *,
        metrics: dict[str, Any] | None = None,
        step: int = 0,
        params: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        _log(self.client, self.run_id, metrics=metrics, step=step, params=params, tags=tags)

    def log_history(self, history: list[dict[str, float]]) -> None:
        """Per-epoch rows (``epoch/train/loss``, ``epoch/val/ece``, ``epoch/time_s``, ...) at step = epoch."""
        for row in history:
            self.log(metrics={k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_subsets(self, result: dict, plots_dir: Path | None = None) -> dict[str, str]:
        """One grandchild run per layer subset of a ``run_layerwise`` result: metrics + reliability PNG."""
        ray_trial_id = self.client.get_run(self.run_id).data.tags.get(TRIAL_TAG, "")
        run_ids = {}
        for name, row in result["subsets"].items():
            key = {MLFLOW_PARENT_RUN_ID: self.run_id, KIND_TAG: "subset", SUBSET_TAG: name}
            run_id, _ = _find_or_create(
                self.client, self.experiment_id, key, run_name=name, tags={TRIAL_TAG: ray_trial_id}
            )
            _log(
                self.client,
                run_id,
                metrics=row["metrics"],
                params={"blocks": row["blocks"], "n_blocks": len(row["blocks"])},
            )
            png = plots_dir / f"reliability_{name}.png" if plots_dir else None
            if png is not None and png.is_file():
                self.client.log_artifact(run_id, str(png))
            self.client.set_terminated(run_id, status="FINISHED")
            run_ids[name] = run_id
        return run_ids
