"""The report of a PEFT-methods sweep (Norm vs LoRA vs Hybrid per backbone and dataset).

python analysis/peft_methods.py SWEEP_OUTPUT_DIR [--no-mlflow]

Writes ``<output>/report/``: ``peft_methods.md`` (the tables under their setting titles, the cross-setting
trends, the figures, failed or missing trials), one ``table_<backbone>_<dataset>.csv`` per setting
(columns: :mod:`analysis.peft_tables`), ``trials.csv`` (every trial), the PNGs of
:mod:`analysis.peft_figures` and ``report.html``; then logs the folder to the sweep's MLflow parent run.
Tables: :mod:`analysis.peft_tables`; :func:`trends` is computed from them, never written by hand.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from analysis import mlflow_io, page, peft_figures
from analysis.collect import ReportError
from analysis.peft_tables import (
    ACC,
    ECE,
    LABEL,
    METHODS,
    PCT,
    TITLE,
    by_setting,
    consolidated_tables,
    decimals,
    load_sweep,
    method_summary,
    numeric_tables,
    setting_file,
    table_captions,
)
from distlap import names
from distlap.names import BACKBONE, DATASET, MESSAGE, METHOD, OPTUNA_TRIAL, REPORT_DIR, SEED, STATUS, TRIAL_ID
from distlap.sweep.settings import SweepConfig

MARKDOWN, TRIALS_TABLE, HTML = "peft_methods.md", "trials.csv", "report.html"
EFFICIENCY = names.ACCURACY_PER_PCT


# --- cross-setting trends ------------------------------------------------------------------------


def trends(trials: pd.DataFrame) -> list[str]:
    """The cross-setting trends: per setting the accuracy and calibration winners with their margins
    against the seed std; whether the method rankings agree across settings; Tuned Params % per
    method; the accuracy-per-tuned-parameter winner."""
    summary = method_summary(trials)
    settings = by_setting(summary)
    lines = [_winners(rows) for rows in settings.values()]
    lines += _rankings(settings)
    lines.append(_params_span(summary, across=len(settings) > 1))
    lines.append(_efficiency(settings, summary))
    return lines


def _noise(margin: float, std_a: float, std_b: float, fmt: str, unit: str) -> str:
    stds = [s for s in (std_a, std_b) if not math.isnan(s)]
    if not stds:
        return "one seed, noise not measured"
    std = max(stds)
    if margin > std:
        return f"above the seed std of {std:{fmt}}{unit}"
    return f"within seed noise, std {std:{fmt}}{unit}"


def _winners(rows: pd.DataFrame) -> str:
    title = rows[TITLE].iloc[0]
    if len(rows) == 1:
        row = rows.iloc[0]
        return (
            f"{title}: only {row[LABEL]} ran (Acc@1 {100 * row[ACC]:.2f}%, ECE {row[ECE]:.3f}); "
            "no comparison."
        )
    acc = rows.sort_values(ACC, ascending=False, kind="stable")
    ece = rows.sort_values(ECE, kind="stable")
    accuracy = _lead(acc.iloc[0], acc.iloc[1], ACC, "highest accuracy", "accuracy", ".2f", "%", " pp")
    calibration = _lead(ece.iloc[0], ece.iloc[1], ECE, "lowest ECE", "ECE", ".3f", "", "")
    return f"{title}: {accuracy}; {calibration}."


def _lead(
    best: pd.Series, second: pd.Series, metric: str, wins: str, name: str, fmt: str, unit: str, gap_unit: str
) -> str:
    """ "highest accuracy LoRA (96.10% vs 94.50% for Norm, 1.60 pp higher, <noise>)", or a tie.
    Accuracy (a fraction in the tables) is shown in percent points."""
    scale = 100 if metric == ACC else 1
    b, s, margin = scale * best[metric], scale * second[metric], scale * abs(best[metric] - second[metric])
    if margin == 0:
        return f"{name} tied between {best[LABEL]} and {second[LABEL]} ({b:{fmt}}{unit})"
    way = names.describe(metric).better
    noise = _noise(margin, scale * best[f"{metric}_std"], scale * second[f"{metric}_std"], fmt, gap_unit)
    return (
        f"{wins} {best[LABEL]} ({b:{fmt}}{unit} vs {s:{fmt}}{unit} for "
        f"{second[LABEL]}, {margin:{fmt}}{gap_unit} {way}, {noise})"
    )


RANKING_NOTE = (
    "In the rankings, > (or <) means the gap between two neighbours is larger than the seed std of "
    "either; ≈ means it is not, or only one seed ran (noise not measured)."
)


def _ahead(a: pd.Series, b: pd.Series, metric: str) -> bool:
    """``a`` better than ``b`` by more than the larger seed std of the two (never with one seed): the
    same test as the winners' "above the seed std"."""
    stds = [s for s in (a[f"{metric}_std"], b[f"{metric}_std"]) if not math.isnan(s)]
    margin = a[metric] - b[metric] if names.describe(metric).better == "higher" else b[metric] - a[metric]
    return bool(stds) and margin > max(stds)


def _ranking(rows: pd.DataFrame, metric: str, descending: bool) -> str:
    """Best first; ">" (or "<") between neighbours one of which is ahead beyond seed noise, else "≈"."""
    ordered = [row for _, row in rows.sort_values(metric, ascending=not descending, kind="stable").iterrows()]
    text = ordered[0][LABEL]
    for a, b in zip(ordered, ordered[1:]):
        text += (" > " if descending else " < ") if _ahead(a, b, metric) else " ≈ "
        text += b[LABEL]
    return text


def _reversals(settings: dict[tuple, pd.DataFrame], metric: str) -> list[str]:
    """ "Norm ahead of LoRA in X, behind in Y": pairs ordered beyond seed noise both ways."""
    ahead: dict[tuple[str, str], list[str]] = {}
    for rows in settings.values():
        for _, a in rows.iterrows():
            for _, b in rows.iterrows():
                if a[LABEL] != b[LABEL] and _ahead(a, b, metric):
                    ahead.setdefault((a[LABEL], b[LABEL]), []).append(rows[TITLE].iloc[0])
    return [
        f"{a} ahead of {b} in {', '.join(where)}, behind in {', '.join(ahead[(b, a)])}"
        for (a, b), where in ahead.items()
        if (b, a) in ahead and a < b
    ]


def _rankings(settings: dict[tuple, pd.DataFrame]) -> list[str]:
    if len(settings) == 1:
        rows = next(iter(settings.values()))
        return [
            f"Only one setting ({rows[TITLE].iloc[0]}): accuracy ranking "
            f"{_ranking(rows, ACC, True)}, ECE ranking (lowest first) {_ranking(rows, ECE, False)}; "
            "no cross-setting comparison.",
            RANKING_NOTE,
        ]
    lines = []
    for name, metric, descending in (
        ("Accuracy ranking", ACC, True),
        ("ECE ranking (lowest first)", ECE, False),
    ):
        ranks: dict[str, list[str]] = {}
        for rows in settings.values():
            ranks.setdefault(_ranking(rows, metric, descending), []).append(rows[TITLE].iloc[0])
        reversals = _reversals(settings, metric)
        where = "; ".join(f"{rank} in {', '.join(titles)}" for rank, titles in ranks.items())
        if len(ranks) == 1:
            lines.append(f"{name} {next(iter(ranks))} in every setting (consistent across scales).")
        elif reversals:
            lines.append(f"{name} differs across settings: {where} ({'; '.join(reversals)}).")
        else:
            lines.append(f"{name}: {where}; no order is reversed beyond seed noise between settings.")
    return [*lines, RANKING_NOTE]


def _span(values: pd.Series, digits: int) -> str:
    lo, hi = f"{values.min():.{digits}f}", f"{values.max():.{digits}f}"
    return lo if lo == hi else f"{lo}–{hi}"


def _per_method(summary: pd.DataFrame, metric: str, digits: int, unit: str = "") -> str:
    return ", ".join(
        f"{METHODS[m]} {_span(summary.loc[summary[METHOD] == m, metric], digits)}{unit}"
        for m in METHODS
        if m in set(summary[METHOD])
    )


def _params_span(summary: pd.DataFrame, *, across: bool) -> str:
    digits = decimals(summary[PCT], sig=2, at_least=2)
    return (
        f"Tuned Params % per method{' across settings' * across}: {_per_method(summary, PCT, digits, '%')}."
    )


def _efficiency(settings: dict[tuple, pd.DataFrame], summary: pd.DataFrame) -> str:
    winners: dict[str, list[str]] = {}
    for rows in settings.values():
        best = rows.sort_values(EFFICIENCY, ascending=False, kind="stable").iloc[0]
        winners.setdefault(best[LABEL], []).append(best[TITLE])
    if len(winners) == 1 and len(settings) > 1:
        where = f"{next(iter(winners))} in every setting"
    else:
        where = "; ".join(f"{m} in {', '.join(titles)}" for m, titles in winners.items())
    return (
        f"Accuracy per tuned parameter (Acc@1 points per Tuned Params %) is highest for {where}: "
        f"{_per_method(summary, EFFICIENCY, 1)}."
    )


# --- the report ----------------------------------------------------------------------------------


def build_peft_report(output_dir: str | Path, *, log_mlflow: bool = True, log=print) -> Path:
    """Every report file for the sweep in ``output_dir`` into ``output_dir/report``; returns that folder.

    :class:`ReportError` when the folder is not a sweep or no trial finished ok. A report that cannot
    be logged to MLflow is still written (the reason is logged and listed in the report).
    """
    cfg, trials = load_sweep(output_dir)
    report_dir = cfg.out / REPORT_DIR
    _clear(report_dir)
    summary = method_summary(trials)
    tables, numeric, captions = consolidated_tables(trials), numeric_tables(trials), table_captions(trials)
    for key, table in numeric.items():
        table.to_csv(report_dir / setting_file(key), index=False)
    trials.to_csv(report_dir / TRIALS_TABLE, index=False)
    images = peft_figures.write_figures(summary, report_dir)
    lines = trends(trials)
    missing = _missing_lines(cfg, trials)
    run_id = _parent_run(cfg, missing, log) if log_mlflow else None
    title = f"PEFT methods sweep {cfg.name!r}"
    titles = {key: rows[TITLE].iloc[0] for key, rows in by_setting(summary).items()}
    markdown = _markdown(
        title,
        [(titles[k], captions[k], setting_file(k), t) for k, t in tables.items()],
        lines,
        images,
        missing,
        trials,
    )
    (report_dir / MARKDOWN).write_text(markdown, encoding="utf-8")
    figs = [(name, path, peft_figures.FIGURES[name][1]) for name, path in images.items()]
    html_tables = [(captions[key], table) for key, table in tables.items()] + [("Trials", trials)]
    (report_dir / HTML).write_text(page.render(title, lines, figs, html_tables, missing), encoding="utf-8")
    if run_id:
        mlflow_io.attach_report(cfg.tracking.uri, run_id, report_dir, log)
    for line in lines:
        log(f"[report] {line}")
    log(f"[report] {report_dir / MARKDOWN}")
    return report_dir


def _clear(report_dir: Path) -> None:
    """Remove an earlier report's files, so nothing from a previous run survives."""
    report_dir.mkdir(parents=True, exist_ok=True)
    for old in [
        *report_dir.glob("*.png"),
        *report_dir.glob("table_*.csv"),
        *(report_dir / n for n in (MARKDOWN, TRIALS_TABLE, HTML)),
    ]:
        old.unlink(missing_ok=True)


def _parent_run(cfg: SweepConfig, notes: list[str], log) -> str | None:
    """The sweep's MLflow parent run id, or None (the reason logged and added to ``notes``)."""
    try:
        client = mlflow_io._client(cfg.tracking.uri)
        experiment_id = mlflow_io._experiment_id(client, cfg.tracking.experiment)
        return mlflow_io.parent_run(client, experiment_id, sweep_id=cfg.search.study_name).info.run_id
    except Exception as err:  # noqa: BLE001 -- ReportError or an unreachable tracking server
        log(f"[report] not logged to MLflow: {err}")
        notes.append(f"not logged to MLflow: {err}")
        return None


def _missing_lines(cfg: SweepConfig, trials: pd.DataFrame) -> list[str]:
    lines = []
    for row in trials[trials[STATUS] != "ok"].to_dict("records"):
        what = ", ".join(
            str(v)
            for v in (METHODS.get(row[METHOD], row[METHOD]), row[BACKBONE], row[DATASET])
            if isinstance(v, str)
        )
        seed = "" if pd.isna(row[SEED]) else f", seed {int(row[SEED])}"
        message = row[MESSAGE]
        lines.append(
            f"trial #{row[OPTUNA_TRIAL]} {row[TRIAL_ID]} ({what or 'settings unknown'}{seed}): "
            f"{row[STATUS]}" + (f" ({message})" if isinstance(message, str) else "")
        )
    if cfg.search.num_samples > len(trials):
        lines.append(
            f"{cfg.search.num_samples - len(trials)} of {cfg.search.num_samples} planned trials not started"
        )
    return lines


def _md_table(table: pd.DataFrame) -> str:
    cells = [list(table.columns), ["---"] * table.shape[1], *table.astype(str).values.tolist()]
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in cells)


def _markdown(
    title: str,
    tables: list[tuple[str, str, str, pd.DataFrame]],
    lines: list[str],
    images: dict[str, Path],
    missing: list[str],
    trials: pd.DataFrame,
) -> str:
    """``tables``: (setting title, caption, CSV file name, display table) per setting."""
    ok = int((trials[STATUS] == "ok").sum())
    parts = [
        f"# {title}",
        "",
        f"{ok} of {len(trials)} trials ok. Mean ± std over seeds (test split).",
        "",
        "## Consolidated results",
    ]
    for setting, caption, csv, table in tables:
        note = caption.removeprefix(f"{setting}: ")
        parts += [
            "",
            f"### {setting}",
            "",
            note[0].upper() + note[1:] + ".",
            "",
            _md_table(table),
            "",
            f"CSV: [{csv}]({csv})",
        ]
    parts += ["", "## Cross-setting trends", "", *(f"- {line}" for line in lines), "", "## Figures", ""]
    parts += [f"![{name}]({path.name})  \n{peft_figures.FIGURES[name][1]}\n" for name, path in images.items()]
    if missing:
        parts += ["## Failed or missing trials", "", *(f"- {m}" for m in missing), ""]
    parts += [f"All trials: [{TRIALS_TABLE}]({TRIALS_TABLE}); page: [{HTML}]({HTML})", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python analysis/peft_methods.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("sweep", type=Path, help="the sweep's output folder (its --output)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to the parent run")
    args = parser.parse_args(argv)
    try:
        build_peft_report(args.sweep, log_mlflow=not args.no_mlflow)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
