"""The report of a layer-wise sweep: tables, findings, figures and one HTML page, also logged to MLflow.

python analysis/report.py SWEEP_OUTPUT_DIR [--report-dir DIR] [--no-mlflow]
python analysis/report.py --tracking-uri URI --experiment NAME [--run-id ID] [--report-dir DIR] [--no-mlflow]

Writes ``<output>/report/`` (see the README, "Reading the results"); works on a partial sweep
(failed or running trials) and says what is missing. From Python: :func:`build_report`.

Start-up is kept short: pandas, SciPy, matplotlib, Optuna and MLflow are imported by the functions
that use them, so ``--help`` and a mistyped folder answer at once and the first line of work is
printed before they load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from distlap import names
from distlap.names import (
    BLOCKS,
    CI_METHOD,
    CONFIG,
    HAS_RESULTS,
    N_SEEDS,
    RANK,
    REPORT_DIR,
    SEED,
    SEEDS,
    SUBSET,
    SUBSET_KIND,
    TRIAL_ID,
)

if TYPE_CHECKING:
    import pandas as pd

    from analysis.collect import SweepData

# analysis.aggregate's keys, spelled out here so that importing this module loads no SciPy
DELTA = names.delta("subset", "test", "ece")
DELTA_LOW, DELTA_HIGH = names.interval(DELTA)
DELTA_ACCURACY = names.delta("subset", "test", "accuracy")
TEST = names.scores("subset", "test")

SUMMARY_TABLE, RANKING_TABLE, TRIALS_TABLE = "summary_table.csv", "subset_ranking.csv", "trials.csv"
LEAD_TABLE, SUMMARY_JSON, HTML = "lead_table.csv", "analysis_summary.json", "report.html"
OUTPUTS = (LEAD_TABLE, SUMMARY_TABLE, RANKING_TABLE, TRIALS_TABLE, SUMMARY_JSON, HTML)
_SHOWN = [DELTA, *(TEST[s] for s in ("accuracy", "nll", "brier", "ece", "mce"))]
_FIRST = [
    CONFIG,
    SUBSET,
    SUBSET_KIND,
    BLOCKS,
    N_SEEDS,
    SEEDS,
    RANK,
    DELTA,
    f"{DELTA}_std",
    DELTA_LOW,
    DELTA_HIGH,
    CI_METHOD,
    *_SHOWN[1:],
    DELTA_ACCURACY,
]
_TRIAL_METRICS = [
    SEED,
    names.OBJECTIVE,
    names.score("map", "test", "accuracy"),
    names.score("map", "test", "ece"),
    names.score("bayes", "test", "ece"),
    names.delta("bayes", "test", "ece"),
    names.BEST_SUBSET,
    names.PRIOR_PRECISION,
    names.TUNED_PARAMS_PCT,
    names.TIME_PER_EPOCH,
    names.FIT_TIME,
    names.EVAL_TIME,
    names.WALL_TIME,
    HAS_RESULTS,
    names.ERROR,
]


def build_report(output_dir: str | Path, *, log_mlflow: bool = True, log=print) -> Path:
    """Report on the sweep output folder ``output_dir`` into ``output_dir/report``; returns that folder.

    Raises :class:`~analysis.collect.ReportError` when the folder is not a sweep or no trial has
    results yet. A report that cannot be logged to MLflow is still written (the reason is printed).
    """
    from analysis.collect import load_folder

    data = load_folder(output_dir)
    return write_report(data, data.output_dir / REPORT_DIR, log_mlflow=log_mlflow, log=log)


def write_report(data: SweepData, report_dir: Path, *, log_mlflow: bool = True, log=print) -> Path:
    """Every report file for ``data`` into ``report_dir`` (then to the MLflow parent run); returns it."""
    from analysis import aggregate, findings, lead, mlflow_io, page, robustness

    _clear(report_dir)
    summary = aggregate.summary_table(aggregate.subset_frame(data), data.config_params, data.search.direction)
    reference = aggregate.best_config(summary)
    ranked = aggregate.ranking(summary, reference)
    found = findings.findings(data, summary, reference)
    ref_results = [data.results[t] for t in found["reference_config"][names.TRIAL_IDS] if t in data.results]
    lead_rows = lead.lead_table(ref_results)
    found["robustness"] = robustness.robustness_summary(ref_results)
    found["verdict"] = robustness.robustness_lines(found["robustness"]) + lead.verdict(lead_rows, ref_results)
    with_results = [t for t in found["reference_config"][names.TRIAL_IDS] if t in data.results]
    found["selected"] = lead.selection(lead_rows, ref_results, with_results)
    images = _figures(data, summary, ranked, found, report_dir)
    run_id = _mlflow_run(data, log) if log_mlflow else None
    found["figures"] = {n: p.name if isinstance(p, Path) else f"not drawn: {p}" for n, p in images.items()}
    found["notes"] = data.notes
    found["mlflow"] = run_id and {"parent_run_id": run_id, "artifact_path": mlflow_io.REPORT_ARTIFACTS}
    story = found["verdict"] + findings.narrative(found)
    trials = _trial_table(data)
    lead_rows.to_csv(report_dir / LEAD_TABLE, index=False)
    _columns(summary).to_csv(report_dir / SUMMARY_TABLE, index=False)
    _columns(ranked).to_csv(report_dir / RANKING_TABLE, index=False)
    trials.to_csv(report_dir / TRIALS_TABLE, index=False)
    (report_dir / SUMMARY_JSON).write_text(json.dumps(found, indent=2, default=str))
    html = page.render(
        f"Layer-wise Laplace sweep {data.name!r}",
        story,
        _captioned(images, found),
        [(_lead_title(found), lead.display(lead_rows)), *_html_tables(ranked, summary, trials)],
        _missing_lines(data),
    )
    (report_dir / HTML).write_text(html, encoding="utf-8")
    if run_id:
        mlflow_io.attach_report(data.tracking_uri, run_id, report_dir, log)
    for line in story:
        log(f"[report] {line}")
    log(f"[report] {report_dir / HTML}")
    return report_dir


def _lead_title(found: dict) -> str:
    ref = found["reference_config"]
    return (
        f"{ref[CONFIG]}: every predictive against the MAP on the same models ({ref[N_SEEDS]} seed"
        f"{'s' * (ref[N_SEEDS] > 1)}; Δ = improvement, positive = better; [95% interval]; distinguishable: "
        "the simultaneous 95% interval of Δ_ECE over all rows excludes 0, p_adjusted < 0.05)"
    )


def _clear(report_dir: Path) -> None:
    """Remove an earlier report's files: a view not drawn this time must not survive from the last one."""
    report_dir.mkdir(parents=True, exist_ok=True)
    for old in [*report_dir.glob("*.png"), *(report_dir / name for name in OUTPUTS)]:
        old.unlink(missing_ok=True)


def _mlflow_run(data: SweepData, log) -> str | None:
    from analysis import mlflow_io

    try:
        return mlflow_io.report_run(data)
    except Exception as err:  # noqa: BLE001 -- the files are the report; MLflow holds a copy of them
        log(f"[report] not logged to MLflow: {err}")
        data.notes.append(f"not logged to MLflow: {err}")
        return None


def _figures(data: SweepData, summary: pd.DataFrame, ranked: pd.DataFrame, found: dict, out: Path) -> dict:
    from analysis import aggregate, attribution, figures, optuna_views

    ref = found["reference_config"]
    title = f"{ref[CONFIG]} ({ref[N_SEEDS]} seed{'s' * (ref[N_SEEDS] > 1)})"
    results = [data.results[t] for t in ref[names.TRIAL_IDS] if t in data.results]
    images = {
        "shapley": attribution.shapley_figure(
            attribution.shapley_table(results), f"Shapley values of the blocks, {title}", out / "shapley.png"
        ),
        "best_k": attribution.best_k_figure(
            attribution.best_k_table(results), f"Best k blocks (greedy), {title}", out / "best_k.png"
        ),
        "delta_ece_ranked": figures.delta_ece_ranked(
            ranked, f"Δ_ECE by layer subset, {title}", out / "delta_ece_ranked.png"
        ),
        "delta_ece_sequential": figures.delta_ece_sequential(
            summary, aggregate.line_configs(summary, data.config_params), out / "delta_ece_sequential.png"
        ),
        "ece_comparison": figures.ece_comparison(
            ranked, f"Test ECE: MAP vs Laplace on each subset, {title}", out / "ece_comparison.png"
        ),
        "answer_by_setting": figures.answer_by_setting(summary, out / "answer_by_setting.png"),
    }
    trial = ref[names.TRIAL_IDS][0]  # the reference configuration's first seed
    best_layer = (found["best_single_layer"] or {}).get(SUBSET)
    images.update(figures.reliability_set(data.results[trial], best_layer, trial, out))
    images.update(optuna_views.optuna_figures(data.study, data.search.metric, out))
    return images


def _captioned(images: dict, found: dict) -> list[tuple[str, Path | str, str]]:
    ref, ci = found["reference_config"][CONFIG], (found["best_single_layer"] or {}).get(CI_METHOD, "")
    captions = {
        "shapley": f"Shapley value of each block for Δ_ECE and Δ_NLL (test, improvement over the MAP) "
        f"in {ref}: its average contribution over all 2^L coalitions of blocks treated as Bayesian; "
        "they sum to the value of all blocks. Whiskers: 95% interval (bootstrap over test examples for "
        "one seed; over seeds, t by the seeds' test-set design).",
        "best_k": "Improvement over the MAP of the greedy best k blocks, against k (labels: the blocks).",
        "delta_ece_ranked": f"Δ_ECE of every layer subset in {ref}, largest first; whiskers: 95% CI ({ci}). "
        "Above 0: the restricted posterior is better calibrated than the MAP.",
        "delta_ece_sequential": "Δ_ECE of each single block against its depth, one line per searched setting "
        "other than λ (at its best λ); band: 95% CI.",
        "ece_comparison": f"Test ECE of the MAP (dashed line) and of Laplace on each subset in {ref}; "
        "whiskers: std over seeds.",
        "answer_by_setting": "Single-block Δ_ECE (test, mean over seeds) of every configuration the search "
        "tried: how the answer moves with the prior precision λ (colour) and the LoRA rank (line style).",
        "reliability_map": "Reliability diagram of the MAP (test).",
        "reliability_all": "Reliability diagram with every block Bayesian (test).",
        "reliability_best_layer": "Reliability diagram with only the best single block Bayesian (test).",
        "optuna_history": "Objective of each Optuna trial (validation split) and the best so far.",
        "optuna_importances": "fANOVA importance of each searched setting for the objective.",
        "optuna_contour": "Objective interpolated over prior precision λ × LoRA rank.",
    }
    return [(name, image, captions.get(name, name)) for name, image in images.items()]


def _columns(table: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in _FIRST if c in table]
    return table[first + [c for c in table if c not in first]]


def _trial_table(data: SweepData) -> pd.DataFrame:
    trials = data.trials.assign(**{HAS_RESULTS: data.trials[TRIAL_ID].isin(data.results)})
    cols = [names.OPTUNA_TRIAL, TRIAL_ID, names.STATUS, *data.config_params, *_TRIAL_METRICS]
    return trials[[c for c in dict.fromkeys(cols) if c in trials]]


def _html_tables(ranked: pd.DataFrame, summary: pd.DataFrame, trials: pd.DataFrame) -> list:
    from analysis import page

    show = [SUBSET, SUBSET_KIND, BLOCKS, N_SEEDS, *_SHOWN, DELTA_LOW, DELTA_HIGH, DELTA_ACCURACY]
    per_config = page.mean_std(summary, _SHOWN)[[CONFIG, *show]]
    return [
        (
            f"Subsets ranked by Δ_ECE in {ranked[CONFIG].iloc[0]} (mean ± std over seeds)",
            page.mean_std(ranked, _SHOWN)[show],
        ),
        ("Trials", trials),
        ("Every configuration and subset", per_config),
    ]


def _missing_lines(data: SweepData) -> list[str]:
    lines = [
        f"trial #{r[names.OPTUNA_TRIAL]} ({r[TRIAL_ID]}): {r[names.STATUS]}, no layer-wise results"
        + (f" ({r[names.ERROR]})" if isinstance(r[names.ERROR], str) and r[names.ERROR] else "")
        for r in data.missing().to_dict("records")
    ]
    if data.not_started:
        lines.append(f"{data.not_started} of {data.search.num_samples} planned trials not started")
    return lines + data.notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python analysis/report.py", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", type=Path, help="the sweep's output folder (its --output)")
    parser.add_argument("--tracking-uri", help="read the sweep from this MLflow tracking URI instead")
    parser.add_argument("--experiment", help="the MLflow experiment (with --tracking-uri)")
    parser.add_argument("--run-id", help="the sweep's parent run (default: the experiment's newest sweep)")
    parser.add_argument("--report-dir", type=Path, help="where to write (default: <sweep output>/report)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to the parent run")
    args = parser.parse_args(argv)
    from_mlflow = args.tracking_uri is not None
    if (args.sweep is None) != from_mlflow or from_mlflow != (args.experiment is not None):
        parser.error("give a sweep output folder, or --tracking-uri URI --experiment NAME (not both)")
    print(
        f"[report] reading {args.sweep or f'{args.tracking_uri}, experiment {args.experiment}'}", flush=True
    )
    from analysis import mlflow_io
    from analysis.collect import ReportError, load_folder

    try:
        data = (
            load_folder(args.sweep)
            if args.sweep is not None
            else mlflow_io.load_mlflow(args.tracking_uri, args.experiment, args.run_id)
        )
        write_report(data, args.report_dir or _default_dir(data), log_mlflow=not args.no_mlflow)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _default_dir(data: SweepData) -> Path:
    if data.output_dir is not None and data.output_dir.is_dir():
        return data.output_dir / REPORT_DIR
    return Path.cwd() / f"{REPORT_DIR}-{data.name}"


if __name__ == "__main__":
    sys.exit(main())
