"""MLflow as the report's source and destination.

A sweep's MLflow tree (:mod:`distlap.sweep.tracking`): a parent run tagged ``distlap.kind=sweep`` whose params
are the flattened sweep config; one child run per trial (``distlap.kind=trial``, tag ``ray_trial_id``,
the searched settings and the trial config as params, the trial's metrics, ``layer_wise_results.json``
as an artifact); a grandchild per layer subset. :func:`load_mlflow` rebuilds
:class:`~analysis.collect.SweepData` from it (``mlflow.search_runs`` over the parent's children, the
results artifacts), so a report can be made where only the tracking server is reachable;
:func:`report_run` / :func:`log_report` attach the report to the parent run.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from analysis.collect import ReportError, SweepData, check_has_results, open_study, read_json, trial_frame
from distlap import names
from distlap.names import ERROR, KIND_TAG, LAYERWISE_FILE, RUN_ID, SEED, SWEEP_TAG, TRIAL_ID, TRIAL_TAG
from distlap.sweep.settings import sqlite_path
from distlap.sweep.space import SearchConfig, SearchParam
from distlap.sweep.tracking import retry_locked

REPORT_ARTIFACTS = names.REPORT_DIR
_STATUS = {"FINISHED": "ok", "FAILED": "failed", "KILLED": "failed"}  # else RUNNING/SCHEDULED: unfinished
_SPACE = re.compile(r"search\.space\.(.+)\.kind")


def parse_value(text: str | None):
    """An MLflow param string back to its value ("4" -> 4, "None" -> None, "[1, 2]" -> [1, 2])."""
    if text is None or text == "None":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _client(uri: str) -> MlflowClient:
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise ReportError(f"no MLflow database at {uri}")  # MLflow would create an empty one
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise ReportError(f"no MLflow experiment {experiment!r} at {client.tracking_uri}; it has {names}")
    return found.experiment_id


def parent_run(
    client: MlflowClient, experiment_id: str, *, sweep_id: str | None = None, run_id: str | None = None
) -> Run:
    """The sweep's parent run: ``run_id``, or the newest sweep run (of ``sweep_id`` if given)."""
    if run_id is not None:
        run = client.get_run(run_id)
        if run.data.tags.get(KIND_TAG) != "sweep":
            raise ReportError(
                f"MLflow run {run_id} is not a sweep's parent run (tag {KIND_TAG}="
                f"{run.data.tags.get(KIND_TAG)!r}, expected 'sweep')"
            )
        return run
    query = f"tags.`{KIND_TAG}` = 'sweep'" + (f" and tags.`{SWEEP_TAG}` = '{sweep_id}'" if sweep_id else "")
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        which = f" for sweep {sweep_id!r}" if sweep_id else ""
        raise ReportError(
            f"no sweep run{which} in MLflow experiment {experiment_id} at {client.tracking_uri}"
        )
    return runs[0]


def search_config(params: dict[str, str]) -> SearchConfig:
    """The sweep's search settings from its parent run's (flattened) params."""
    space = {}
    for key in params:
        match = _SPACE.fullmatch(key)
        if match:
            name = match.group(1)
            space[name] = {
                f: parse_value(params.get(f"search.space.{name}.{f}")) for f in SearchParam.model_fields
            }
    fields = [f for f in SearchConfig.model_fields if f not in ("space", "points_to_evaluate")]
    return SearchConfig(
        space=space, **{f: parse_value(params[f"search.{f}"]) for f in fields if f"search.{f}" in params}
    )


@contextlib.contextmanager
def _tracking(uri: str):
    """``mlflow.search_runs`` reads the global tracking URI: point it at ``uri`` for a moment."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def load_mlflow(uri: str, experiment: str, run_id: str | None = None) -> SweepData:
    """The sweep under ``run_id`` (default: the newest sweep) of ``experiment`` at tracking URI ``uri``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per trial otherwise
    client = _client(uri)
    experiment_id = _experiment_id(client, experiment)
    parent = parent_run(client, experiment_id, run_id=run_id)
    params = parent.data.params
    search = search_config(params)
    notes, study = [], None
    try:
        study = open_study(search)
    except ReportError as err:  # a storage this machine cannot reach: the report goes on without Optuna views
        notes.append(f"Optuna views left out: {err}")
    with _tracking(uri):
        runs = mlflow.search_runs(
            [experiment_id],
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}' and tags.`{KIND_TAG}` = 'trial'",
            order_by=["attributes.start_time ASC"],
        )
    trials = _trial_frame(runs, search, study)
    output_dir = parse_value(params.get("output_dir"))
    data = SweepData(
        name=parse_value(params.get("name")) or parent.info.run_name,
        source=f"MLflow {uri}, experiment {experiment!r}, run {parent.info.run_id}",
        search=search,
        trials=trials,
        results=_results(client, trials),
        study=study,
        output_dir=Path(output_dir) if output_dir else None,
        tracking_uri=uri,
        experiment=experiment,
        parent_run_id=parent.info.run_id,
        notes=notes,
    )
    return check_has_results(data)


def _trial_frame(runs: pd.DataFrame, search: SearchConfig, study) -> pd.DataFrame:
    """The trial runs as :class:`SweepData`'s ``trials`` rows (Optuna numbers from the study if read)."""
    numbers = {t.user_attrs.get(RUN_ID): t.number for t in study.trials} if study is not None else {}
    rows = []
    for _, run in runs.iterrows():
        number = numbers.get(run["run_id"])
        if number is None:
            match = re.search(r"(\d+)$", str(run.get("tags.mlflow.runName", "")))
            number = int(match.group(1)) if match else None
        metrics = {k.removeprefix("metrics."): v for k, v in run.items() if k.startswith("metrics.")}
        rows.append(
            {
                names.OPTUNA_TRIAL: number,
                TRIAL_ID: run[f"tags.{TRIAL_TAG}"],
                names.STATUS: _STATUS.get(run.status, "unfinished"),  # MLflow's run status
                **{p: parse_value(run.get(f"params.{p}")) for p in search.space},
                SEED: parse_value(run.get(f"params.{SEED}")),
                names.OBJECTIVE: metrics.get(search.metric),
                RUN_ID: run["run_id"],
                ERROR: run.get(f"tags.{ERROR}"),
                **metrics,
            }
        )
    return trial_frame(rows)


def _results(client: MlflowClient, trials: pd.DataFrame) -> dict[str, dict]:
    """Each trial run's ``layer_wise_results.json`` artifact (absent while the trial runs)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for trial_id, run_id in zip(trials[TRIAL_ID], trials[RUN_ID]):
            try:
                path = client.download_artifacts(run_id, LAYERWISE_FILE, str(Path(tmp) / run_id))
            except Exception:  # noqa: BLE001 -- MLflow raises several types for a missing artifact
                continue
            result = read_json(Path(path))
            if result is not None:
                results[trial_id] = result
    return results


def report_run(data: SweepData) -> str:
    """The id of the sweep's parent run, which the report is logged to."""
    if data.parent_run_id:
        return data.parent_run_id
    if not data.tracking_uri or not data.experiment:
        raise ReportError("the sweep names no MLflow tracking URI and experiment")
    client = _client(data.tracking_uri)
    experiment_id = _experiment_id(client, data.experiment)
    return parent_run(client, experiment_id, sweep_id=data.search.study_name).info.run_id


def log_report(uri: str, run_id: str, report_dir: Path) -> None:
    """Attach every file of ``report_dir`` to run ``run_id`` under ``report/``."""
    retry_locked(_client(uri).log_artifacts)(run_id, str(report_dir), REPORT_ARTIFACTS)


def attach_report(uri: str, run_id: str, report_dir: Path, log) -> None:
    """:func:`log_report`, saying what happened; a failure only logs (the report on disk stands)."""
    try:
        log_report(uri, run_id, report_dir)
    except Exception as err:  # noqa: BLE001 -- the files are the report; MLflow holds a copy of them
        log(f"[report] logging to MLflow run {run_id} failed: {err}")
        return
    log(f"[report] logged to MLflow run {run_id} under {REPORT_ARTIFACTS}/")
