"""The PEFT-methods sweep as tables: one row per trial, then per setting one row per method over seeds.

A *setting* is (backbone, dataset), or (backbone, dataset, epochs) where one (backbone, dataset) pair
ran with several epoch counts; its title reads like the Week 3 note's, "vit-tiny (CIFAR-10, 1 epoch)".
Only trials with status ok enter the per-method rows: mean and sample std (ddof=1) over their seeds,
std NaN (shown as nothing) for one seed. Columns are :mod:`distlap.names` keys (``map/test/accuracy``
a fraction, ``tuned_params_pct`` in percent, ``time_per_epoch_s`` in seconds); only the displayed and
CSV tables use the Week 3 headers, with Acc@1 and its std in percent (points).

CSV layout of :func:`numeric_tables` (``table_<backbone>_<dataset>.csv``): ``Method, n_seeds, seeds``,
then each of ``Tuned Params %, Acc@1, ECE, Time/Epoch (s)`` followed by its ``<name>_std``, then the
same pairs for ``Acc@1 / Tuned Params %, NLL, Brier`` and, when the sweep ran Laplace, ``Bayes Acc@1,
Bayes ECE, Bayes NLL, Bayes Brier, Delta ECE`` (Delta ECE = ECE_MAP - ECE_Bayes).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import page
from analysis.collect import ReportError, folder_config, open_study, read_json
from distlap import names
from distlap.names import (
    BACKBONE,
    DATASET,
    EPOCHS,
    MESSAGE,
    METHOD,
    N_SEEDS,
    OPTUNA_TRIAL,
    SEED,
    SEEDS,
    STATUS,
    TRIAL_ID,
)
from distlap.sweep.settings import SweepConfig, trial_config
from distlap.sweep.study import summarize

METHODS = {"norm": "Norm", "lora": "LoRA", "hybrid": "Hybrid"}  # table order and display names
COLUMNS = ["Method", "Tuned Params %", "Acc@1", "ECE", "Time/Epoch (s)"]
DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "fashion_mnist": "Fashion-MNIST"}
MAP, BAYES = names.scores("map", "test"), names.scores("bayes", "test")
ACC, ECE, PCT = MAP["accuracy"], MAP["ece"], names.TUNED_PARAMS_PCT
_MAP_KEYS = [
    *(MAP[s] for s in ("accuracy", "ece", "nll", "brier")),
    names.TUNED_PARAMS,
    PCT,
    names.TIME_PER_EPOCH,
]
_BAYES_KEYS = [*(BAYES[s] for s in ("accuracy", "ece", "nll", "brier")), names.delta("bayes", "test", "ece")]
TRIAL_COLUMNS = [TRIAL_ID, STATUS, METHOD, BACKBONE, DATASET, EPOCHS, SEED, *_MAP_KEYS]
_EXTRA = [OPTUNA_TRIAL, names.WALL_TIME, MESSAGE]
PERCENT = {ACC, BAYES["accuracy"]}  # shown in percent (points) in the tables
# summary column (in method_summary) -> CSV / table header
HEADERS = {
    PCT: "Tuned Params %",
    ACC: "Acc@1",
    ECE: "ECE",
    names.TIME_PER_EPOCH: "Time/Epoch (s)",
    names.ACCURACY_PER_PCT: "Acc@1 / Tuned Params %",
    MAP["nll"]: "NLL",
    MAP["brier"]: "Brier",
    BAYES["accuracy"]: "Bayes Acc@1",
    BAYES["ece"]: "Bayes ECE",
    BAYES["nll"]: "Bayes NLL",
    BAYES["brier"]: "Bayes Brier",
    names.delta("bayes", "test", "ece"): "Delta ECE",
}
# grouping and display columns of method_summary's frame
SETTING, TITLE, SERIES, LABEL = "setting_key", "title", "series", "Method"


# --- one row per trial ---------------------------------------------------------------------------


def load_peft_trials(output_dir: str | Path) -> pd.DataFrame:
    """One row per trial the sweep in ``output_dir`` knows of: ``TRIAL_COLUMNS`` (+ ``bayes_*``,
    ``delta_ece`` when present, + ``optuna_trial, wall_time_s, message``). :class:`ReportError` if no
    trial has status ok."""
    return load_sweep(output_dir)[1]


def load_sweep(output_dir: str | Path) -> tuple[SweepConfig, pd.DataFrame]:
    """The sweep's config (storage and tracking URI fixed for a moved folder) and its trial rows."""
    out = Path(output_dir).expanduser().resolve()
    cfg = folder_config(out)
    search = cfg.search
    open_study(search)  # ReportError naming a missing or unreadable study
    try:
        known = summarize(cfg)
    except Exception as err:  # noqa: BLE001 - KeyError (no such study), SQLAlchemy (unreachable database)
        raise ReportError(
            f"cannot read the Optuna study {search.study_name!r} at {search.storage}: "
            f"{type(err).__name__}: {err}"
        ) from None
    rows = [_trial_row(cfg, row) for row in known.to_dict("records")]
    trials = pd.DataFrame(rows, columns=list(dict.fromkeys([*TRIAL_COLUMNS, *_BAYES_KEYS, *_EXTRA])))
    trials = trials[[c for c in trials if c not in _BAYES_KEYS or trials[c].notna().any()]]  # Laplace not run
    if not (trials[STATUS] == "ok").any():
        states = trials[STATUS].value_counts().to_dict()
        raise ReportError(
            f"no trial of sweep {cfg.name!r} ({out}) has finished ok yet "
            f"({cfg.search.num_samples} planned, {len(trials)} started: {states or 'none'}); "
            "run the report again once a trial has finished"
        )
    return cfg, trials


def _trial_row(cfg: SweepConfig, row: dict) -> dict:
    """A summary row + its ``trial_result.json``. Status: failed if the study or the file says so, ok if
    the file says ok, else the study's. Config fields: the file's, else rebuilt from the searched params."""
    tid = row.get(TRIAL_ID)
    trial_file = cfg.out / names.TRIALS_DIR / str(tid) / names.TRIAL_FILE
    result = (read_json(trial_file) if isinstance(tid, str) else None) or {}
    status = row[STATUS]
    if "failed" in (status, result.get(STATUS)):
        status = "failed"
    elif result.get(STATUS) == "ok":
        status = "ok"
    config = result.get("config") or _searched_config(cfg, row)
    metrics = result.get("metrics") or {}
    message = result.get(MESSAGE) or row.get(names.ERROR)
    return {
        TRIAL_ID: tid,
        STATUS: status,
        **{key: _at(config, key) for key in (METHOD, BACKBONE, DATASET, EPOCHS)},
        SEED: config.get(SEED),
        **{key: metrics.get(key, math.nan) for key in [*_MAP_KEYS, *_BAYES_KEYS]},
        OPTUNA_TRIAL: row.get(OPTUNA_TRIAL),
        names.WALL_TIME: metrics.get(names.WALL_TIME, math.nan),
        MESSAGE: message if isinstance(message, str) and message else None,
    }


def _searched_config(cfg: SweepConfig, row: dict) -> dict:
    """The trial config its searched params give (no result file yet); {} if they are not all known."""
    params = {p: row.get(p) for p in cfg.search.space}
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in params.values()):
        return {}
    try:
        return trial_config(cfg, params).model_dump(mode="json")
    except Exception:  # noqa: BLE001 -- a row to list as missing, not a reason to stop the report
        return {}


def _at(config: dict, dotted: str):
    """``_at(config, "peft.method")``: a nested config value by its dotted name (None if absent)."""
    section, key = dotted.split(".")
    return (config.get(section) or {}).get(key)


# --- settings ------------------------------------------------------------------------------------


def setting_keys(trials: pd.DataFrame) -> pd.Series:
    """Each trial's setting: (backbone, dataset), or (backbone, dataset, epochs) where the ok trials of
    that pair ran with several epoch counts."""
    ok = trials[trials[STATUS] == "ok"]
    epochs = ok.groupby([BACKBONE, DATASET])[EPOCHS].nunique()
    several = set(epochs[epochs > 1].index)
    return pd.Series(
        [
            (b, d, e) if (b, d) in several else (b, d)
            for b, d, e in zip(trials[BACKBONE], trials[DATASET], trials[EPOCHS])
        ],
        index=trials.index,
        dtype=object,
    )


def backbone_label(name: str) -> str:
    """The last part of a hub id or path: ``google/vit-base-patch16-224`` -> ``vit-base-patch16-224``."""
    return str(name).rstrip("/").rsplit("/", 1)[-1]


def dataset_label(name: str) -> str:
    return DATASETS.get(name, str(name))


def setting_title(backbone: str, dataset: str, epochs) -> str:
    """ "vit-tiny (CIFAR-10, 1 epoch)"; without the epochs when unknown."""
    if epochs is None or (isinstance(epochs, float) and math.isnan(epochs)):
        return f"{backbone_label(backbone)} ({dataset_label(dataset)})"
    n = int(epochs)
    return f"{backbone_label(backbone)} ({dataset_label(dataset)}, {n} epoch{'s' * (n != 1)})"


def setting_file(key: tuple) -> str:
    """``table_<backbone>_<dataset>[_<epochs>ep].csv`` with anything but letters, digits, '.', '-' as '-'."""
    clean = [re.sub(r"[^A-Za-z0-9.-]+", "-", str(part)).strip("-") for part in key[:2]]
    return "table_" + "_".join(clean) + (f"_{int(key[2])}ep" if len(key) > 2 else "") + ".csv"


# --- per setting and method, over seeds -----------------------------------------------------------


def method_summary(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, method) of the ok trials, settings in order of appearance, methods in
    ``METHODS`` order: ``setting, title, series, backbone.name, data.dataset, train.epochs, peft.method,
    Method, n_seeds, seeds`` and, for each ``HEADERS`` key present, its mean and ``<key>_std`` over seeds."""
    ok = trials[trials[STATUS] == "ok"].copy()
    ok[SETTING] = setting_keys(ok)
    ok[names.ACCURACY_PER_PCT] = 100 * ok[ACC] / ok[PCT].where(ok[PCT] > 0)
    metrics = [m for m in HEADERS if m in ok]
    rows = []
    for key in pd.unique(ok[SETTING]):
        group = ok[ok[SETTING].map(lambda k, key=key: k == key)]
        epochs = group[EPOCHS].iloc[0]
        series = backbone_label(key[0]) + (f", {int(key[2])} ep" if len(key) > 2 else "")
        for method in [m for m in METHODS if m in set(group[METHOD])]:
            runs = group[group[METHOD] == method]
            row = {
                SETTING: key,
                TITLE: setting_title(key[0], key[1], epochs),
                SERIES: series,
                BACKBONE: key[0],
                DATASET: key[1],
                EPOCHS: epochs,
                METHOD: method,
                LABEL: METHODS[method],
                N_SEEDS: len(runs),
                SEEDS: ", ".join(_plain(s) for s in sorted(runs[SEED].dropna().tolist())),
            }
            for m in metrics:
                row[m] = runs[m].mean()
                row[f"{m}_std"] = runs[m].std(ddof=1) if runs[m].count() > 1 else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def _plain(value) -> str:
    """1.0 -> "1" (a seed column with a missing value is float)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def by_setting(summary: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """``method_summary`` rows per setting, settings in order of appearance."""
    return {
        key: summary[summary[SETTING].map(lambda k, key=key: k == key)].reset_index(drop=True)
        for key in pd.unique(summary[SETTING])
    }


def numeric_tables(trials: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """Per setting, the CSV table (see the module docstring for its columns)."""
    tables = {}
    for key, rows in by_setting(method_summary(trials)).items():
        cols = {LABEL: rows[LABEL], N_SEEDS: rows[N_SEEDS], SEEDS: rows[SEEDS]}
        for m, header in HEADERS.items():
            if m in rows:
                scale = 100 if m in PERCENT else 1
                cols[header], cols[f"{header}_std"] = scale * rows[m], scale * rows[f"{m}_std"]
        tables[key] = pd.DataFrame(cols)
    return tables


def consolidated_tables(trials: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """Per setting, exactly ``COLUMNS``: one row per method (Norm, LoRA, Hybrid; those present), each
    cell "mean ± std" over seeds (std omitted for one seed), e.g. "94.62 ± 0.31%" for Acc@1."""
    tables = {}
    for key, num in numeric_tables(trials).items():
        digits = {
            "Tuned Params %": decimals(num["Tuned Params %"], sig=2, at_least=2),
            "Acc@1": 2,
            "ECE": 3,
            "Time/Epoch (s)": decimals(num["Time/Epoch (s)"], sig=3, at_least=0),
        }
        shown = num[[LABEL]].copy()
        for col, d in digits.items():
            shown[col] = page.mean_std(num, [col], d)[col]
        shown["Acc@1"] = shown["Acc@1"] + "%"
        tables[key] = shown[COLUMNS]
    return tables


def table_captions(trials: pd.DataFrame) -> dict[tuple, str]:
    """Per setting: its title and how many seeds each method's mean ± std is over."""
    captions = {}
    for key, rows in by_setting(method_summary(trials)).items():
        if rows[N_SEEDS].nunique() == 1 and rows[SEEDS].nunique() == 1:
            n = int(rows[N_SEEDS].iloc[0])
            seeds = f"{n} seed{'s' * (n != 1)} ({rows[SEEDS].iloc[0]})"
        else:
            seeds = ", ".join(
                f"{m} {n} seed{'s' * (n != 1)} ({s})"
                for m, n, s in zip(rows[LABEL], rows[N_SEEDS], rows[SEEDS])
            )
        captions[key] = (
            f"{rows[TITLE].iloc[0]}: mean ± std over {seeds}; test split; Acc@1 in %, ECE absolute"
        )
    return captions


def decimals(values, *, sig: int, at_least: int) -> int:
    """Decimals showing ``sig`` significant digits of the smallest nonzero |value|; at least ``at_least``."""
    finite = np.abs(np.asarray(values, dtype=float))
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if not len(finite):
        return at_least
    return int(min(6, max(at_least, sig - 1 - math.floor(math.log10(finite.min())))))
