"""What a finished sweep's stores hold against what its trials wrote: every write there once.

:func:`audit` reads the MLflow and Optuna stores themselves (and, for metric rows, MLflow's database
tables) and compares them with the sweep's output folder, whose files each trial writes itself
(``trial_result.json``, ``layer_wise_results.json``, its plots): one sweep run; ``search.num_samples``
Optuna trials and trial runs, one per Ray trial and linked both ways; under each trial that wrote its
layer-wise results one subset run per subset; every metric the trial recorded (final values, epoch
rows, each subset's metrics) on its run; the artifacts (``summary.csv``, ``config.yaml``,
``layer_wise_results.json``, the reliability diagrams). ``lost`` lists what is missing, ``duplicated``
what is there more than once (runs, Optuna trials, metric rows at one step). :func:`lock_errors`
counts SQLite's busy errors ("database is locked") in a text: the console log, Ray's error files and
the stores' error messages. The load benchmark (``benchmarks/store_load.py``) prints the counts.
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy
from mlflow import MlflowClient
from mlflow.entities import ViewType

from distlap import names
from distlap.names import ERROR, KIND_TAG, RUN_ID, SUBSET_TAG, SWEEP_TAG, TRIAL_TAG
from distlap.sweep.settings import SweepConfig, load_sweep_config
from distlap.sweep.study import load_study
from distlap.sweep.tracking import literal

# SQLite's busy errors and PostgreSQL's lock failures, as their drivers word them.
LOCKED = re.compile(
    r"database is locked|database table is locked|SQLITE_BUSY|could not obtain lock|deadlock detected|"
    r"lock timeout",
    re.IGNORECASE,
)


@dataclass
class Audit:
    """The findings: one line per lost or duplicated item, lock errors seen, trials that failed."""

    trials: int
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    locked_errors: int = 0
    failed: int = 0
    checked: collections.Counter = field(default_factory=collections.Counter)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.locked_errors)


def lock_errors(text: str) -> int:
    """How often ``text`` mentions a lock the stores could not get (:data:`LOCKED`)."""
    return len(LOCKED.findall(text))


def audit(out: Path, console: str = "") -> Audit:
    """Compare the stores of the finished sweep in ``out`` with its trials' files (module doc);
    ``console`` is the sweep's console output, searched for lock errors."""
    cfg = load_sweep_config(out / names.CONFIG_FILE)
    found = Audit(trials=cfg.search.num_samples)
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = _runs(client, experiment.experiment_id, cfg.search.study_name) if experiment else []
    by_kind = collections.defaultdict(list)
    for run in runs:
        by_kind[run.data.tags.get(KIND_TAG)].append(run)
    _count(found, "sweep run", [cfg.search.study_name], [cfg.search.study_name] * len(by_kind["sweep"]))
    links = _check_optuna(found, cfg)  # Ray trial id -> the MLflow run id Optuna holds
    folders = sorted(p.name for p in (out / names.TRIALS_DIR).glob("*") if p.is_dir())
    ray_ids = [*links, *(f for f in folders if f not in links)]  # a trial lost by Optuna still ran
    trial_runs = _check_trial_runs(found, by_kind["trial"], ray_ids)
    for ray_id in ray_ids:
        run = trial_runs.get(ray_id)
        if run is not None and ray_id in links and links[ray_id] != run.info.run_id:
            found.lost.append(
                f"link of optuna trial of {ray_id} to its run ({links[ray_id]} is no trial run)"
            )
        _check_trial(found, client, cfg, ray_id, run, by_kind["subset"])
    for sweep_run in by_kind["sweep"][:1]:
        _check_artifacts(found, client, sweep_run.info.run_id, [names.SUMMARY_FILE, names.CONFIG_FILE])
    _check_metric_rows(found, cfg, [r.info.run_id for r in runs])
    texts = [console, *(p.read_text(errors="replace") for p in (out / names.RAY_DIR).rglob("error.txt"))]
    texts += [r.data.tags.get(ERROR, "") for r in runs]
    texts += [str(t.user_attrs.get(ERROR, "")) for t in load_study(cfg.search).trials]
    found.locked_errors = sum(lock_errors(text) for text in texts)
    return found


def _runs(client: MlflowClient, experiment_id: str, sweep_id: str) -> list:
    """Every active run of the sweep (a trial run restarted afresh deletes its old one, by design)."""
    runs, token = [], None
    query = f"tags.`{SWEEP_TAG}` = {literal(sweep_id)}"
    while True:
        page = client.search_runs(
            [experiment_id], query, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _count(found: Audit, what: str, expected: list[str], present: list[str], of: str = "") -> None:
    """Each expected key once in ``present``: missing ones are lost, repeats and strangers duplicated."""
    seen = collections.Counter(present)
    found.checked[what] += len(expected)
    what = f"{what} of {of}" if of else what
    found.lost += [f"{what} {key}" for key in expected if not seen[key]]
    found.duplicated += [f"{what} {key} x{seen[key]}" for key in expected if seen[key] > 1]
    found.duplicated += [
        f"{what} {key} (not expected) x{n}" for key, n in seen.items() if key not in expected
    ]


def _check_optuna(found: Audit, cfg: SweepConfig) -> dict[str, str]:
    """num_samples Optuna trials, each finished, one per Ray trial; returns {Ray trial id: MLflow run id}."""
    trials = load_study(cfg.search).trials
    ray_ids = [str(t.user_attrs.get(TRIAL_TAG)) for t in trials]
    found.checked["optuna trial"] += cfg.search.num_samples
    distinct = list(dict.fromkeys(ray_ids))
    found.lost += [f"optuna trial #{i}" for i in range(len(distinct), cfg.search.num_samples)]
    found.duplicated += [
        f"optuna trial of ray trial {k} x{n}" for k, n in collections.Counter(ray_ids).items() if n > 1
    ]
    found.duplicated += [f"optuna trial beyond num_samples: {k}" for k in distinct[cfg.search.num_samples :]]
    for t in trials:
        result = _json(cfg.out / names.TRIALS_DIR / str(t.user_attrs.get(TRIAL_TAG)) / names.TRIAL_FILE)
        if result.get("status") == "ok" and (not t.state.is_finished() or t.value is None):
            found.lost.append(f"optuna result of trial {t.number} (state {t.state.name})")
        found.failed += t.state.name == "FAIL"
    return {ray_id: str(t.user_attrs.get(RUN_ID)) for ray_id, t in zip(ray_ids, trials)}


def _check_trial_runs(found: Audit, runs: list, ray_ids: list[str]) -> dict:
    _count(found, "trial run", ray_ids, [r.data.tags.get(TRIAL_TAG) for r in runs])
    return {r.data.tags.get(TRIAL_TAG): r for r in runs}


def _check_trial(found: Audit, client: MlflowClient, cfg: SweepConfig, ray_id: str, run, subset_runs) -> None:
    """The trial run's metrics and artifacts, and its subset runs', against the trial's own files."""
    folder = cfg.out / names.TRIALS_DIR / ray_id
    result, layerwise = _json(folder / names.TRIAL_FILE), _json(folder / names.LAYERWISE_FILE)
    if run is None:
        return  # counted lost; what it should hold is lost with it
    expected = {(k, 0) for k, v in result.get("metrics", {}).items() if _number(v)}
    for row in result.get("history", []):
        expected |= {(k, int(row["epoch"])) for k, v in row.items() if k != "epoch" and _number(v)}
    _check_metrics(found, client, run, expected)
    if result.get("status") == "ok" and run.info.status != "FINISHED":
        found.lost.append(f"status FINISHED of trial run {ray_id} (is {run.info.status})")
    subsets = layerwise.get("subsets", {})
    if not subsets:
        return
    _check_artifacts(found, client, run.info.run_id, [names.LAYERWISE_FILE, "plots/reliability_map.png"])
    mine = [r for r in subset_runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
    _count(found, "subset run", list(subsets), [r.data.tags.get(SUBSET_TAG) for r in mine], of=ray_id)
    for r in mine:
        row = subsets.get(r.data.tags.get(SUBSET_TAG), {})
        _check_metrics(found, client, r, {(k, 0) for k, v in row.get("metrics", {}).items() if _number(v)})
        _check_artifacts(found, client, r.info.run_id, [f"reliability_{r.data.tags.get(SUBSET_TAG)}.png"])


def _check_metrics(found: Audit, client: MlflowClient, run, expected: set[tuple[str, int]]) -> None:
    """Each (key, step) on the run: final values from the run's latest metrics, epoch rows from the
    history of their keys."""
    found.checked["metric"] += len(expected)
    latest = run.data.metrics
    steps: dict[str, set[int]] = {}
    for key, step in sorted(expected):
        if step == 0:
            if key not in latest:
                found.lost.append(f"metric {key} of run {run.info.run_name}")
            continue
        if key not in steps:
            steps[key] = {m.step for m in client.get_metric_history(run.info.run_id, key)}
        if step not in steps[key]:
            found.lost.append(f"metric {key} step {step} of run {run.info.run_name}")


def _check_artifacts(found: Audit, client: MlflowClient, run_id: str, paths: list[str]) -> None:
    found.checked["artifact"] += len(paths)
    listed: set[str] = set()
    for folder in {str(Path(p).parent) for p in paths}:
        listed |= {a.path for a in client.list_artifacts(run_id, None if folder == "." else folder)}
    found.lost += [f"artifact {p} of run {run_id}" for p in paths if p not in listed]


def _check_metric_rows(found: Audit, cfg: SweepConfig, run_ids: list[str]) -> None:
    """No metric row twice: one row per (run, key, step), read from MLflow's own tables."""
    if not run_ids or cfg.tracking.uri.startswith(("http://", "https://")):
        return  # a tracking server's tables are not ours to read
    engine = sqlalchemy.create_engine(cfg.tracking.uri, poolclass=sqlalchemy.pool.NullPool)
    query = sqlalchemy.text(
        "SELECT run_uuid, key, step, COUNT(*) FROM metrics WHERE run_uuid IN :ids "
        "GROUP BY run_uuid, key, step HAVING COUNT(*) > 1"
    ).bindparams(sqlalchemy.bindparam("ids", expanding=True))
    try:
        with engine.connect() as conn:
            rows = conn.execute(query, {"ids": run_ids}).all()
    finally:
        engine.dispose()
    found.duplicated += [f"metric {key} step {step} of run {run} x{n}" for run, key, step, n in rows]


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
