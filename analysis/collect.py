"""A sweep's results in one place: :class:`SweepData`, read from a sweep output folder.

The folder (``python sweeps/layerwise.py --output DIR``) holds ``config.yaml`` (the resolved
:class:`~distlap.sweep.settings.SweepConfig`), ``optuna.db`` (the study: the sweep's own count of trials,
their state, searched parameters and objective) and ``trials/<ray trial id>/`` with
``layer_wise_results.json`` (the layer subsets) and, once the trial finished, ``trial_result.json``
(the trial's metrics) and ``config.yaml``. ``summary.csv`` is only written at the sweep's end, so it
is not read here: a running or interrupted sweep reports what its trials have written so far.
:mod:`analysis.mlflow_io` builds the same :class:`SweepData` from MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd

from distlap import names
from distlap.config import ConfigError
from distlap.names import CONFIG_FILE, LAYERWISE_FILE, SEED, TRIAL_FILE, TRIALS_DIR
from distlap.sweep.settings import SweepConfig, load_sweep_config, sqlite_path, sqlite_url
from distlap.sweep.space import SearchConfig
from distlap.sweep.study import load_study, summarize

TRIAL_KEYS = (
    names.OPTUNA_TRIAL,
    names.TRIAL_ID,
    names.STATUS,
    SEED,
    names.OBJECTIVE,
    names.RUN_ID,
    names.ERROR,
)


class ReportError(RuntimeError):
    """The report cannot be made: not a sweep, unreadable study or MLflow experiment, no results yet."""


@dataclass
class SweepData:
    """What a report is made from, whichever source it came from.

    ``trials``: one row per trial the sweep knows of (also failed and unfinished ones): ``optuna_trial``,
    ``trial_id`` (Ray's), ``status`` (ok | failed | pruned | unfinished), the searched settings under
    their dotted names, ``seed``, ``objective``, ``mlflow_run_id``, ``error`` and the trial's metrics
    (``map/test/ece``, ``wall_time_s``, ...). ``results``: ``layer_wise_results.json`` per trial id.
    """

    name: str
    source: str
    search: SearchConfig
    trials: pd.DataFrame
    results: dict[str, dict]
    study: optuna.Study | None = None
    output_dir: Path | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    parent_run_id: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def config_params(self) -> list[str]:
        """The searched settings that define a configuration; repeats differ only in the seed."""
        return [p for p in self.search.space if p != SEED]

    def missing(self) -> pd.DataFrame:
        """Known trials without layer-wise results, with the reason (``status``, ``error``)."""
        rows = self.trials[~self.trials[names.TRIAL_ID].isin(self.results)]
        return rows[[names.OPTUNA_TRIAL, names.TRIAL_ID, names.STATUS, names.ERROR]].reset_index(drop=True)

    @property
    def not_started(self) -> int:
        return max(0, self.search.num_samples - len(self.trials))


def load_folder(path: str | Path) -> SweepData:
    """Read the sweep output folder ``path``; :class:`ReportError` if it is not one or has no results."""
    out = Path(path).expanduser().resolve()
    cfg = folder_config(out)
    study = open_study(cfg.search)
    trials = _with_trial_files(summarize(cfg), out / TRIALS_DIR, cfg)
    results = {tid: read_json(out / TRIALS_DIR / tid / LAYERWISE_FILE) for tid in trials[names.TRIAL_ID]}
    data = SweepData(
        name=cfg.name,
        source=f"sweep folder {out}",
        search=cfg.search,
        trials=trials,
        results={tid: r for tid, r in results.items() if r is not None},
        study=study,
        output_dir=out,
        tracking_uri=cfg.tracking.uri,
        experiment=cfg.tracking.experiment,
    )
    return check_has_results(data)


def folder_config(out: Path) -> SweepConfig:
    """The config saved in the sweep folder ``out``, pointing at ``out`` (output folder, and its Optuna
    and MLflow SQLite files when the folder was moved); :class:`ReportError` if ``out`` is no sweep."""
    cfg = _sweep_config(out)
    search = cfg.search.model_copy(update={"storage": _local_sqlite(cfg.search.storage, out)})
    tracking = cfg.tracking.model_copy(update={"uri": _local_sqlite(cfg.tracking.uri, out)})
    return cfg.model_copy(update={"search": search, "tracking": tracking, "output_dir": str(out)})


def check_has_results(data: SweepData) -> SweepData:
    if not data.results:
        states = data.trials[names.STATUS].value_counts().to_dict() if len(data.trials) else {}
        raise ReportError(
            f"no trial of sweep {data.name!r} ({data.source}) has layer-wise results yet "
            f"({data.search.num_samples} planned, {len(data.trials)} started: "
            f"{states or 'none'}); run the report again once a trial has finished"
        )
    return data


def _sweep_config(out: Path) -> SweepConfig:
    hint = (
        "pass the --output folder of `python sweeps/layerwise.py` (it holds config.yaml, optuna.db, "
        "mlflow.db and trials/), or --tracking-uri URI --experiment NAME"
    )
    if not out.is_dir():
        raise ReportError(f"{out}: no such folder; {hint}")
    if (out / TRIAL_FILE).is_file() or (out / LAYERWISE_FILE).is_file():
        raise ReportError(
            f"{out} is one trial's folder, not a sweep output folder; {hint} "
            f"(for a sweep's trial that is {out.parent.parent})"
        )
    if not (out / CONFIG_FILE).is_file():
        raise ReportError(f"{out} is not a sweep output folder (no {CONFIG_FILE}); {hint}")
    try:
        return load_sweep_config(out / CONFIG_FILE)
    except ConfigError as err:
        raise ReportError(
            f"{out / CONFIG_FILE} is not a sweep config ({str(err).splitlines()[-1].strip()}); {hint}"
        ) from None


def _local_sqlite(url: str | None, out: Path) -> str | None:
    """A SQLite URL whose file is gone but whose namesake sits in ``out``: the folder was moved."""
    file = sqlite_path(url) if url else None
    if file is not None and not file.is_file() and (out / file.name).is_file():
        return sqlite_url(out / file.name)
    return url


def open_study(search: SearchConfig) -> optuna.Study:
    """The sweep's Optuna study, never creating an empty SQLite file for a missing one."""
    storage = search.storage or ""
    file = sqlite_path(storage)
    if file is not None and not file.is_file():
        raise ReportError(f"the sweep's Optuna study is missing: no file {file}")
    try:
        return load_study(search)
    except Exception as err:  # noqa: BLE001 - KeyError (no such study), SQLAlchemy (unreachable database)
        raise ReportError(
            f"cannot read the Optuna study {search.study_name!r} at {storage}: {type(err).__name__}: {err}"
        ) from None


def _with_trial_files(trials: pd.DataFrame, trials_dir: Path, cfg: SweepConfig) -> pd.DataFrame:
    """Add each trial's seed and its full metrics (``trial_result.json``) to the sweep's summary rows."""
    rows = []
    for row in trials.to_dict("records"):
        result = read_json(trials_dir / str(row[names.TRIAL_ID]) / TRIAL_FILE) or {}
        seed = row.get(SEED, (result.get("config") or {}).get(SEED, cfg.trial.seed))
        rows.append({**row, SEED: seed, **result.get("metrics", {})})
    return trial_frame(rows)


def trial_frame(rows: list[dict]) -> pd.DataFrame:
    """:class:`SweepData`'s ``trials`` table; it has the key columns even before any trial started."""
    frame = pd.DataFrame(rows)
    return frame.reindex(columns=[*TRIAL_KEYS, *(c for c in frame.columns if c not in TRIAL_KEYS)])


def read_json(path: Path) -> dict | None:
    """The JSON in ``path``, or None when absent or half-written (a trial still writing it)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
