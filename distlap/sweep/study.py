"""A sweep's Optuna study, read without Ray: its storage, the study, and the sweep's summary table.

The study is the sweep's own count of its trials (state, searched settings, objective, and the user
attributes linking each to its Ray trial and MLflow run); :func:`summarize` joins it with each trial's
``trial_result.json`` into ``summary.csv``. Light on purpose: the report reads it without starting Ray.
"""

from __future__ import annotations

import json

import optuna
import pandas as pd

from distlap import names
from distlap.sweep.kinds import summary_metrics
from distlap.sweep.settings import SweepConfig
from distlap.sweep.space import SearchConfig

_STATUS = {
    optuna.trial.TrialState.COMPLETE: "ok",
    optuna.trial.TrialState.FAIL: "failed",
    optuna.trial.TrialState.PRUNED: "pruned",
}


def storage(url: str) -> optuna.storages.RDBStorage:
    """The study's storage; SQLite waits for a busy file instead of failing at once. Optuna runs
    ``str.format`` on the URL (a ``{SCHEMA_VERSION}`` template), so braces of a path are doubled."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    escaped = url.replace("{", "{{").replace("}", "}}")
    return optuna.storages.RDBStorage(escaped, engine_kwargs=engine_kwargs)


def load_study(cfg: SearchConfig) -> optuna.Study:
    """The sweep's study (read-only use: summaries, tests, the README's inspection commands)."""
    return optuna.load_study(study_name=cfg.study_name, storage=storage(cfg.storage))


def summarize(cfg: SweepConfig) -> pd.DataFrame:
    """One row per Optuna trial: number, Ray trial id, status, params, objective, key metrics, error.

    Built from the study (the sweep's own count of trials) and each trial's ``trial_result.json``.
    """
    rows, summary_keys = [], summary_metrics(cfg)
    for t in load_study(cfg.search).trials:
        ray_id = t.user_attrs.get(names.TRIAL_TAG)
        result_file = cfg.out / names.TRIALS_DIR / str(ray_id) / names.TRIAL_FILE
        metrics = json.loads(result_file.read_text())["metrics"] if result_file.is_file() else {}
        rows.append(
            {
                names.OPTUNA_TRIAL: t.number,
                names.TRIAL_ID: ray_id,
                names.STATUS: _STATUS.get(t.state, "unfinished"),
                **t.params,
                names.OBJECTIVE: t.value,
                **{m: metrics.get(m) for m in summary_keys},
                names.RUN_ID: t.user_attrs.get(names.RUN_ID),
                names.ERROR: t.user_attrs.get(names.ERROR),
            }
        )
    columns = [
        names.OPTUNA_TRIAL,
        names.TRIAL_ID,
        names.STATUS,
        *cfg.search.space,
        names.OBJECTIVE,
        *summary_keys,
        names.RUN_ID,
        names.ERROR,
    ]
    return pd.DataFrame(rows, columns=columns)  # the same columns when interrupted before any trial
