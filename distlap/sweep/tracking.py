"""MLflow tracking of a sweep: a parent run per sweep, a child run per trial, a grandchild per layer subset.

Runs are made and found through ``MlflowClient`` with explicit run ids and tags, never the fluent
active-run stack (it does not travel to Ray workers). ``mlflow.parentRunId`` nests the runs in the UI;
the tags ``distlap.sweep``, ``ray_trial_id`` and ``distlap.subset`` make every lookup idempotent, so a
resumed sweep or a retried trial reopens its run instead of adding a duplicate. SQLite writers stay
few: the driver creates the sweep and trial runs, each trial process logs its own run and its subsets
(the Ray subset tasks log nothing), and a write that meets "database is locked" is retried.

For the MLflow UI: the experiment is tagged as model training (``mlflow.experimentKind``), every run
carries ``distlap.order`` (sweep, then each trial followed by its subsets) and a description listing
each metric it logged with its meaning, subset runs are named ``trial-000/layer_0``, and
:meth:`SweepTracker.share_view` saves a shared view of the runs table (the sweep's runs in that order,
the searched settings and key metrics as columns) that :func:`distlap.sweep.progress.runs_url` opens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from distlap import names
from distlap.names import ERROR, KIND_TAG, ORDER_TAG, SUBSET_TAG, SWEEP_TAG, TRIAL_TAG

_BATCH = 100  # MLflow accepts at most 100 params or tags per log_batch
# MLflow's own tags: the UI's "Model training" mode (read by versions that honour it; 3.17 needs the
# URL's workflowType), and the prefix of a shared view of the runs table (``?viewStateShareKey=NAME``).
EXPERIMENT_KIND, TRAINING = "mlflow.experimentKind", "custom_model_development"
SHARED_VIEW = "mlflow.sharedViewState."
EXPERIMENT_NOTE = (
    "distlap sweeps. Each sweep is one run (params: the sweep config; metrics: `sweep/...` and "
    "`best/...`; artifacts: `summary.csv`, `config.yaml`, `report/`), with a child run per trial "
    "(`trial-000`, ...: the searched and all other trial settings, per-epoch curves `epoch/...`, final "
    "metrics, `layer_wise_results.json`, `plots/reliability_map.png`) and, under each trial, a run per "
    "layer subset (`trial-000/layer_0`, ...: `subset/...` metrics and the subset's reliability diagram). "
    "Every run's description lists its metrics with their meaning. The sweep prints the URL of a view "
    "of the runs table that shows them all at once."
)


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


def view_key(sweep_id: str) -> str:
    """The key of a sweep's shared view (the tag ``SHARED_VIEW + key``, ``?viewStateShareKey=key``): the
    sweep id if it is plain, else its letters, digits and ``_.-`` plus a hash of it (MLflow refuses a
    tag name holding ``#``, ``{``, a quote, ...; a sweep id is any folder's name)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", sweep_id)
    return safe if safe == sweep_id else f"{safe}-{hashlib.sha1(sweep_id.encode()).hexdigest()[:8]}"


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
        for key, value in ((EXPERIMENT_KIND, TRAINING), (MLFLOW_RUN_NOTE, EXPERIMENT_NOTE)):
            client.set_experiment_tag(experiment_id, key, value)
        run_id, created = _find_or_create(
            client, experiment_id, {SWEEP_TAG: sweep_id, KIND_TAG: "sweep"}, run_name=run_name
        )
        if created:
            _log(client, run_id, params=params, tags={**(tags or {}), ORDER_TAG: sweep_id})
        else:
            client.update_run(run_id, status="RUNNING")
        return cls(uri, experiment_id, run_id, sweep_id)

    def share_view(self, params: list[str], metrics: list[str]) -> str:
        """Save the runs table's view of this sweep as a shared view; returns its key
        (:func:`view_key` of the sweep id).

        The view (opened by ``?viewStateShareKey=KEY``) shows only this sweep's runs, sorted by
        ``distlap.order`` (a sort that is not by date lists child runs beside their parent instead of
        folded under it), with ``params`` and ``metrics`` as columns.
        """
        columns = [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics]
        view = {
            "searchFilter": f"tags.`{SWEEP_TAG}` = {literal(self.sweep_id)}",
            "orderByKey": f"tags.`{ORDER_TAG}`",
            "orderByAsc": True,
            "selectedColumns": ["attributes.`Duration`", *columns],
        }
        key = view_key(self.sweep_id)
        _Client(self.uri).set_experiment_tag(self.experiment_id, SHARED_VIEW + key, json.dumps(view))
        return key

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
            tags={MLFLOW_PARENT_RUN_ID: self.parent_run_id, ORDER_TAG: f"{self.sweep_id}/{run_name}"},
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
        _log(client, self.parent_run_id, metrics=metrics, tags={MLFLOW_RUN_NOTE: describe_metrics(metrics)})
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
        logged = self.client.get_run(self.run_id).data.metrics
        self.client.set_tag(self.run_id, MLFLOW_RUN_NOTE, describe_metrics(logged))
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
        """One grandchild run per layer subset of a ``run_layerwise`` result (named
        ``<trial run>/<subset>``: metrics, their meanings, the subset's reliability diagram); the MAP's
        reliability diagram goes to the trial run under ``plots/``."""
        trial = self.client.get_run(self.run_id)
        ray_trial_id, sweep = trial.data.tags.get(TRIAL_TAG, ""), trial.data.tags.get(SWEEP_TAG, "")
        order = trial.data.tags.get(ORDER_TAG, trial.info.run_name)
        run_ids = {}
        for i, (name, row) in enumerate(result["subsets"].items()):
            key = {MLFLOW_PARENT_RUN_ID: self.run_id, KIND_TAG: "subset", SUBSET_TAG: name}
            tags = {TRIAL_TAG: ray_trial_id, ORDER_TAG: f"{order}/{i:03d}", SWEEP_TAG: sweep}
            run_id, _ = _find_or_create(
                self.client, self.experiment_id, key, run_name=f"{trial.info.run_name}/{name}", tags=tags
            )
            _log(
                self.client,
                run_id,
                metrics=row["metrics"],
                params={"blocks": row["blocks"], "n_blocks": len(row["blocks"])},
                tags={
                    MLFLOW_RUN_NOTE: describe_metrics(
                        row["metrics"], f"Layer subset {name}: blocks {row['blocks']}."
                    )
                },
            )
            self._plot(run_id, plots_dir, name)
            self.client.set_terminated(run_id, status="FINISHED")
            run_ids[name] = run_id
        self._plot(self.run_id, plots_dir, "map", "plots")
        return run_ids

    def _plot(self, run_id: str, plots_dir: Path | None, name: str, artifact_path: str | None = None) -> None:
        png = plots_dir / f"reliability_{name}.png" if plots_dir else None
        if png is not None and png.is_file():
            self.client.log_artifact(run_id, str(png), artifact_path)


DESCRIPTION_CHARS = 7900  # MLflow keeps 8,000 characters of a run's description (and warns past them)


def describe_metrics(metrics: Iterable[str], heading: str = "") -> str:
    """A run's description: each metric key with its meaning from :mod:`distlap.names` (Markdown), as
    many rows as MLflow keeps, then how many more there are."""
    keys = sorted(metrics)
    lines = [
        *([heading, ""] if heading else []),
        *(["| metric | meaning |", "| --- | --- |"] if keys else []),
    ]
    size = sum(len(x) + 1 for x in lines)
    for i, key in enumerate(keys):
        try:
            meaning = names.describe(key).axis()
        except KeyError:
            meaning = ""
        row = f"| `{key}` | {meaning} |"
        size += len(row) + 1
        if size + 80 > DESCRIPTION_CHARS:
            lines.append(f"\n... and {len(keys) - i} more metrics (their meanings: distlap.names)")
            break
        lines.append(row)
    return "\n".join(lines)


def experiment_id(uri: str, experiment: str) -> str | None:
    """The id of ``experiment`` at ``uri``, or None if it cannot be read."""
    try:
        found = _Client(uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 -- only for a printed URL; a link to all experiments does instead
        return None
    return found.experiment_id if found is not None else None
