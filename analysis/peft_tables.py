"""The PEFT-methods sweep as tables: one row per trial, then per setting one row per method over seeds.

A *setting* is (backbone, dataset), or (backbone, dataset, epochs) where one (backbone, dataset) pair
ran with several epoch counts; its title reads like the Week 3 note's, "vit-tiny (CIFAR-10, 1 epoch)".
Only trials with status ok enter the per-method rows: mean and sample std (ddof=1) over their seeds,
std NaN (shown as nothing) for one seed. Units: Acc@1 and its std in percent (points), ECE absolute
(test split, a fraction), Tuned Params % in percent of the adapted model's parameters, time in seconds.

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
from distlap.sweep import summarize
from distlap.sweep_config import SweepConfig, trial_config
from distlap.trial import RESULT_FILE

METHODS = {"norm": "Norm", "lora": "LoRA", "hybrid": "Hybrid"}   # table order and display names
COLUMNS = ["Method", "Tuned Params %", "Acc@1", "ECE", "Time/Epoch (s)"]
DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "fashion_mnist": "Fashion-MNIST"}
TRIAL_COLUMNS = ["trial_id", "status", "method", "backbone", "dataset", "epochs", "seed", "accuracy", "ece",
                 "nll", "brier", "tuned_params", "tuned_params_pct", "time_per_epoch_s"]
_MAP = {"accuracy": "map/test/accuracy", "ece": "map/test/ece", "nll": "map/test/nll",
        "brier": "map/test/brier", "tuned_params": "tuned_params", "tuned_params_pct": "tuned_params_pct",
        "time_per_epoch_s": "time_per_epoch_s"}
_BAYES = {"bayes_accuracy": "bayes/test/accuracy", "bayes_ece": "bayes/test/ece",
          "bayes_nll": "bayes/test/nll", "bayes_brier": "bayes/test/brier", "delta_ece": "delta_ece"}
_EXTRA = ["optuna_trial", "wall_time_s", "message"]
# summary column (in method_summary) -> CSV / table header
HEADERS = {"tuned_params_pct": "Tuned Params %", "acc1": "Acc@1", "ece": "ECE",
           "time_per_epoch_s": "Time/Epoch (s)", "acc_per_pct": "Acc@1 / Tuned Params %", "nll": "NLL",
           "brier": "Brier", "bayes_acc1": "Bayes Acc@1", "bayes_ece": "Bayes ECE", "bayes_nll": "Bayes NLL",
           "bayes_brier": "Bayes Brier", "delta_ece": "Delta ECE"}


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
    except Exception as err:  # KeyError (no such study), SQLAlchemy errors (unreachable database)
        raise ReportError(f"cannot read the Optuna study {search.study_name!r} at {search.storage}: "
                          f"{type(err).__name__}: {err}") from None
    rows = [_trial_row(cfg, row) for row in known.to_dict("records")]
    trials = pd.DataFrame(rows, columns=list(dict.fromkeys([*TRIAL_COLUMNS, *_BAYES, *_EXTRA])))
    trials = trials[[c for c in trials if c not in _BAYES or trials[c].notna().any()]]  # Laplace not run
    if not (trials["status"] == "ok").any():
        states = trials["status"].value_counts().to_dict()
        raise ReportError(f"no trial of sweep {cfg.name!r} ({out}) has finished ok yet "
                          f"({cfg.search.num_samples} planned, {len(trials)} started: {states or 'none'}); "
                          "run the report again once a trial has finished")
    return cfg, trials


def _trial_row(cfg: SweepConfig, row: dict) -> dict:
    """A summary row + its ``trial_result.json``. Status: failed if the study or the file says so, ok if
    the file says ok, else the study's. Config fields: the file's, else rebuilt from the searched params."""
    tid = row.get("trial_id")
    result = (read_json(cfg.out / "trials" / str(tid) / RESULT_FILE) if isinstance(tid, str) else None) or {}
    status = row["status"]
    if "failed" in (status, result.get("status")):
        status = "failed"
    elif result.get("status") == "ok":
        status = "ok"
    config = result.get("config") or _searched_config(cfg, row)
    metrics = result.get("metrics") or {}
    message = result.get("message") or row.get("error")
    return {"trial_id": tid, "status": status, "method": _at(config, "peft", "method"),
            "backbone": _at(config, "backbone", "name"), "dataset": _at(config, "data", "dataset"),
            "epochs": _at(config, "train", "epochs"), "seed": config.get("seed"),
            **{col: metrics.get(key, math.nan) for col, key in {**_MAP, **_BAYES}.items()},
            "optuna_trial": row.get("optuna_trial"), "wall_time_s": metrics.get("wall_time_s", math.nan),
            "message": message if isinstance(message, str) and message else None}


def _searched_config(cfg: SweepConfig, row: dict) -> dict:
    """The trial config its searched params give (no result file yet); {} if they are not all known."""
    params = {p: row.get(p) for p in cfg.search.space}
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in params.values()):
        return {}
    try:
        return trial_config(cfg, params).model_dump(mode="json")
    except Exception:  # noqa: BLE001 -- a row to list as missing, not a reason to stop the report
        return {}


def _at(config: dict, section: str, key: str):
    return (config.get(section) or {}).get(key)


# --- settings ------------------------------------------------------------------------------------

def setting_keys(trials: pd.DataFrame) -> pd.Series:
    """Each trial's setting: (backbone, dataset), or (backbone, dataset, epochs) where the ok trials of
    that pair ran with several epoch counts."""
    ok = trials[trials["status"] == "ok"]
    epochs = ok.groupby(["backbone", "dataset"])["epochs"].nunique()
    several = set(epochs[epochs > 1].index)
    return pd.Series([(b, d, e) if (b, d) in several else (b, d)
                      for b, d, e in zip(trials["backbone"], trials["dataset"], trials["epochs"])],
                     index=trials.index, dtype=object)


def backbone_label(name: str) -> str:
    """The last part of a hub id or path: ``google/vit-base-patch16-224`` -> ``vit-base-patch16-224``."""
    return str(name).rstrip("/").rsplit("/", 1)[-1]


def dataset_label(name: str) -> str:
    return DATASETS.get(name, str(name))


def setting_title(backbone: str, dataset: str, epochs) -> str:
    """"vit-tiny (CIFAR-10, 1 epoch)"; without the epochs when unknown."""
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
    ``METHODS`` order: ``setting, title, series, backbone, dataset, epochs, method, Method, n_seeds,
    seeds`` and, for each ``HEADERS`` key present, its mean and ``<key>_std`` over seeds."""
    ok = trials[trials["status"] == "ok"].copy()
    ok["setting"] = setting_keys(ok)
    ok["acc1"] = 100 * ok["accuracy"]
    ok["acc_per_pct"] = ok["acc1"] / ok["tuned_params_pct"].where(ok["tuned_params_pct"] > 0)
    if "bayes_accuracy" in ok:
        ok["bayes_acc1"] = 100 * ok["bayes_accuracy"]
    metrics = [m for m in HEADERS if m in ok]
    rows = []
    for key in pd.unique(ok["setting"]):
        group = ok[ok["setting"].map(lambda k, key=key: k == key)]
        epochs = group["epochs"].iloc[0]
        series = backbone_label(key[0]) + (f", {int(key[2])} ep" if len(key) > 2 else "")
        for method in [m for m in METHODS if m in set(group["method"])]:
            runs = group[group["method"] == method]
            row = {"setting": key, "title": setting_title(key[0], key[1], epochs), "series": series,
                   "backbone": key[0], "dataset": key[1], "epochs": epochs, "method": method,
                   "Method": METHODS[method], "n_seeds": len(runs),
                   "seeds": ", ".join(_plain(s) for s in sorted(runs["seed"].dropna().tolist()))}
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
    return {key: summary[summary["setting"].map(lambda k, key=key: k == key)].reset_index(drop=True)
            for key in pd.unique(summary["setting"])}


def numeric_tables(trials: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """Per setting, the CSV table (see the module docstring for its columns)."""
    tables = {}
    for key, rows in by_setting(method_summary(trials)).items():
        cols = {"Method": rows["Method"], "n_seeds": rows["n_seeds"], "seeds": rows["seeds"]}
        for m, header in HEADERS.items():
            if m in rows:
                cols[header], cols[f"{header}_std"] = rows[m], rows[f"{m}_std"]
        tables[key] = pd.DataFrame(cols)
    return tables


def consolidated_tables(trials: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """Per setting, exactly ``COLUMNS``: one row per method (Norm, LoRA, Hybrid; those present), each
    cell "mean ± std" over seeds (std omitted for one seed), e.g. "94.62 ± 0.31%" for Acc@1."""
    tables = {}
    for key, num in numeric_tables(trials).items():
        digits = {"Tuned Params %": decimals(num["Tuned Params %"], sig=2, at_least=2), "Acc@1": 2, "ECE": 3,
                  "Time/Epoch (s)": decimals(num["Time/Epoch (s)"], sig=3, at_least=0)}
        shown = num[["Method"]].copy()
        for col, d in digits.items():
            shown[col] = page.mean_std(num, [col], d)[col]
        shown["Acc@1"] = shown["Acc@1"] + "%"
        tables[key] = shown[COLUMNS]
    return tables


def table_captions(trials: pd.DataFrame) -> dict[tuple, str]:
    """Per setting: its title and how many seeds each method's mean ± std is over."""
    captions = {}
    for key, rows in by_setting(method_summary(trials)).items():
        if rows["n_seeds"].nunique() == 1 and rows["seeds"].nunique() == 1:
            n = int(rows["n_seeds"].iloc[0])
            seeds = f"{n} seed{'s' * (n != 1)} ({rows['seeds'].iloc[0]})"
        else:
            seeds = ", ".join(f"{m} {n} seed{'s' * (n != 1)} ({s})"
                              for m, n, s in zip(rows["Method"], rows["n_seeds"], rows["seeds"]))
        captions[key] = (f"{rows['title'].iloc[0]}: mean ± std over {seeds}; test split; Acc@1 in %, "
                         "ECE absolute")
    return captions


def decimals(values, *, sig: int, at_least: int) -> int:
    """Decimals showing ``sig`` significant digits of the smallest nonzero |value|; at least ``at_least``."""
    finite = np.abs(np.asarray(values, dtype=float))
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if not len(finite):
        return at_least
    return int(min(6, max(at_least, sig - 1 - math.floor(math.log10(finite.min())))))
