"""``python -m distlap.export SWEEP_DIR --output DIR [--trial ID] [--subset NAME]``: one trial's predictor
for one layer subset as an MLflow pyfunc model, registered in the sweep's model registry.

By default the trial and subset the sweep's report selects on validation (``report/analysis_summary.json``,
``selected``: the reference configuration's first trial with results and the subset with the largest
mean validation Δ_ECE); ``--trial`` / ``--subset`` pick others. The model folder holds the backbone, the
peft adapter, θ₀, the subset's posterior at the trial's λ (the trial's own ``glm_posterior.safetensors``:
nothing is refitted), the probit GLM predictive and the transform (:mod:`distlap.serve`), in
safetensors and JSON, with SHA-256 checksums; no pickle. Every input is checked before anything is
written, and the folder appears only once complete. ``mlflow.pyfunc.load_model(DIR).predict(images)``
takes uint8 images as the data set gives them and returns class probabilities.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from distlap import names
from distlap.config import ConfigError, load_config
from distlap.finetune.backbones import BackboneError
from distlap.finetune.data import DataError
from distlap.serve.build import Source, build
from distlap.serve.bundle import Spec
from distlap.serve.predictor import Predictor
from distlap.sweep.models import Registration, data_folder, register, save_pyfunc
from distlap.sweep.settings import SweepConfig, load_sweep_config, sqlite_path

SUMMARY_JSON, LEAD_TABLE, SELECTED = "analysis_summary.json", "lead_table.csv", "selected"
DATA_DIR = "predictor"  # the predictor folder inside the MLflow model folder
ROW = (("ece", "Δ_ECE"), ("nll", "Δ_NLL"), ("accuracy", "Δ_accuracy"))


class ExportError(ValueError):
    """An export that cannot be made; the message names the problem and the fix."""


@dataclass(frozen=True)
class Request:
    """The command line: the sweep folder, the model folder to write, and the trial and subset (None: the
    report's selection)."""

    sweep: Path
    output: Path
    trial: str | None = None
    subset: str | None = None


def sweep_config(folder: Path) -> SweepConfig:
    """The sweep's own ``config.yaml``, or an ExportError saying the folder is not a sweep."""
    if not (folder / names.CONFIG_FILE).is_file() or not (folder / names.TRIALS_DIR).is_dir():
        raise ExportError(
            f"{folder} is not a sweep folder (no {names.CONFIG_FILE} and {names.TRIALS_DIR}/): pass the "
            "--output folder of `python sweeps/layerwise.py`"
        )
    try:
        return load_sweep_config(folder / names.CONFIG_FILE)
    except ConfigError as err:
        raise ExportError(
            f"{folder} is not a sweep folder: its {names.CONFIG_FILE} is not a sweep config ({err})"
        ) from None


def report_summary(folder: Path) -> dict:
    """``report/analysis_summary.json`` ({} when the report was not written)."""
    path = folder / names.REPORT_DIR / SUMMARY_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def selection(req: Request, summary: dict) -> tuple[str, str]:
    """(trial id, subset): the request's, the rest from the report's selection on validation."""
    chosen = summary.get(SELECTED) or {}
    trial = req.trial or chosen.get(names.TRIAL_ID)
    subset = req.subset or chosen.get(names.SUBSET)
    if trial is None or subset is None:
        raise ExportError(
            f"{req.sweep} has no report selection ({names.REPORT_DIR}/{SUMMARY_JSON} without "
            f"'{SELECTED}'): run `python analysis/report.py {req.sweep}`, or pass both --trial and --subset"
        )
    return trial, subset


def trial_results(sweep: Path, trial: str) -> tuple[Path, dict]:
    """The trial's folder and its ``layer_wise_results.json``, or an ExportError naming what is missing."""
    folder = sweep / names.TRIALS_DIR / trial
    if not folder.is_dir():
        known = sorted(p.name for p in (sweep / names.TRIALS_DIR).iterdir() if p.is_dir())
        raise ExportError(f"no trial {trial!r} in {sweep / names.TRIALS_DIR} (it holds {', '.join(known)})")
    needed = [names.TRIAL_FILE, names.LAYERWISE_FILE, "adapter/adapter_config.json"]
    missing = [n for n in needed if not (folder / n).is_file()]
    status = None if missing else json.loads((folder / names.TRIAL_FILE).read_text()).get("status")
    if missing or status != "ok":
        why = f"{missing[0]} is missing" if missing else f"its status is {status!r}"
        raise ExportError(
            f"trial {trial} has no results to export ({why}: it failed or has not finished); "
            "choose another with --trial"
        )
    return folder, json.loads((folder / names.LAYERWISE_FILE).read_text())


def check_posterior(folder: Path, trial: str) -> None:
    """The trial saved its glm posterior (trials before that file existed did not)."""
    if not (folder / names.POSTERIOR_FILE).is_file():
        raise ExportError(
            f"trial {trial} has no {names.POSTERIOR_FILE} (it ran before trials saved their glm posterior): "
            "run the sweep again, or choose another trial with --trial"
        )


def subset_blocks(trial: str, results: dict, subset: str) -> tuple[int, ...]:
    """The subset's blocks, or an ExportError listing the trial's subsets."""
    if results.get(names.PREDICTIVE) != "glm":
        raise ExportError(
            f"trial {trial} used laplace.predictive={results.get(names.PREDICTIVE)}; only the glm (probit) "
            "predictive is exported: choose a glm trial with --trial"
        )
    if subset not in results["subsets"]:
        raise ExportError(
            f"no subset {subset!r} in trial {trial}: choose one of "
            f"{', '.join(results['subsets'])} with --subset"
        )
    return tuple(results["subsets"][subset][names.BLOCKS])


def lead_row(sweep: Path, summary: dict, trial: str, subset: str, results: dict) -> tuple[dict, str]:
    """The report's lead-table row of ``subset`` when ``trial`` is in the reference configuration, else
    the trial's own row; and a phrase saying which."""
    ref = summary.get("reference_config") or {}
    path = sweep / names.REPORT_DIR / LEAD_TABLE
    if trial in ref.get(names.TRIAL_IDS, []) and path.is_file():
        with open(path, newline="") as f:
            row = next((r for r in csv.DictReader(f) if r["name"] == subset), None)
        if row is not None:
            clean = {k: _number(v) for k, v in row.items() if v != "" and k != "name"}
            return clean, f"the report's lead table, {ref.get(names.CONFIG)}, {ref.get(names.N_SEEDS)} seeds"
    metrics = results["subsets"][subset]["metrics"]
    own = {}
    for score, _ in ROW:
        key = names.delta("subset", "test", score)
        for suffix in ("", "_low", "_high"):
            if key + suffix in metrics:
                own[names.split_delta("test", score) + suffix] = metrics[key + suffix]
    return own, f"trial {trial} alone"


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def describe(source: Source, lam: float, row: dict, where: str) -> str:
    """The model version's description: what it is, and the lead-table row (Δs with intervals, cost)."""
    parts = []
    for score, label in ROW:
        col = names.split_delta("test", score)
        if col in row:
            low, high = row.get(col + "_low"), row.get(col + "_high")
            span = f" [{low:+.4f}, {high:+.4f}]" if low is not None and high is not None else ""
            parts.append(f"{label} {row[col]:+.4f}{span}")
    if "cost_s" in row:
        parts.append(f"cost {row['cost_s']:.3g} s")
    blocks = ", ".join(map(str, source.blocks))
    return (
        f"{source.origin['sweep']} trial {source.origin[names.TRIAL_ID]}, subset {source.subset} (blocks "
        f"{blocks}), λ = {lam:g}, probit GLM predictive. Test, against the MAP ({where}): {'; '.join(parts)}."
    )


def check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ExportError(f"--output {output} exists and is not an empty folder: choose a new one")


def check_registry(sweep: SweepConfig) -> None:
    """The sweep's SQLite MLflow store is where its config says (not moved away with the folder)."""
    path = sqlite_path(sweep.tracking.uri or "")
    if path is not None and not path.is_file():
        raise ExportError(
            f"the sweep's MLflow store {path} does not exist (was the sweep folder moved?); "
            f"set tracking.uri in {Path(sweep.output_dir or '.') / names.CONFIG_FILE} to where mlflow.db is"
        )


def plan(req: Request) -> tuple[SweepConfig, Source, dict, str]:
    """Every check, before anything is written: (sweep config, what to export, lead row, its source)."""
    sweep = sweep_config(req.sweep)
    summary = report_summary(req.sweep)
    trial, subset = selection(req, summary)
    folder, results = trial_results(req.sweep, trial)
    blocks = subset_blocks(trial, results, subset)
    check_posterior(folder, trial)
    check_output(req.output)
    check_registry(sweep)
    row, where = lead_row(req.sweep, summary, trial, subset, results)
    how = "--trial/--subset" if req.trial or req.subset else "the report's selection on validation"
    origin = {"sweep": str(req.sweep), names.TRIAL_ID: trial, "chosen_by": how, "lead_row": row}
    cfg = load_config(folder / names.CONFIG_FILE)
    return sweep, Source(folder, cfg, subset, blocks, origin), row, where


def write(source: Source, output: Path) -> Spec:
    """Build the predictor and the MLflow model in a staging folder beside ``output``, load it once, then
    move it to ``output``; returns its spec."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        spec = build(source, staging / DATA_DIR)
        save_pyfunc(staging / DATA_DIR, staging / "model")
        Predictor.load(data_folder(staging / "model", DATA_DIR))  # it loads, and its checksums hold
        if output.exists():
            output.rmdir()
        (staging / "model").rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return spec


def export(req: Request, log=print) -> str:
    """Check, write, register; returns the registered model's ``name/version``."""
    sweep, source, row, where = plan(req)
    spec = write(source, req.output)
    lam = spec.prior_precision
    name = f"distlap-{sweep.search.study_name or req.sweep.name}"
    tags = {k: str(v) for k, v in row.items()}
    tags |= {names.TRIAL_ID: source.origin[names.TRIAL_ID], names.SUBSET: source.subset}
    tags |= {names.BLOCKS: ",".join(map(str, source.blocks)), names.PRIOR_PRECISION: f"{lam:g}"}
    reg = Registration(sweep.tracking.uri or "", name, describe(source, lam, row, where), tags)
    version = register(req.output, reg)
    log(f"[export] {source.origin['chosen_by']}: trial {tags[names.TRIAL_ID]}, subset {source.subset}")
    log(f"[export] registered as {name} version {version} in {reg.uri}")
    height, width, channels = spec.input_shape
    shape = f"(B, {height}, {width}{', 3' if channels == 3 else ''})"
    load = f"mlflow.pyfunc.load_model({str(req.output.resolve())!r}).predict(images)"
    log(f"load: {load}  # images: uint8 {shape}")
    return f"{name}/{version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distlap.export", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, metavar="SWEEP_DIR", help="a sweep's output folder")
    parser.add_argument("--output", type=Path, required=True, help="the MLflow model folder to write")
    parser.add_argument("--trial", help="Ray trial id (default: the report's selection)")
    parser.add_argument("--subset", help="layer subset, e.g. layer_2, late, all (default: the report's)")
    args = parser.parse_args(argv)
    req = Request(args.sweep.resolve(), args.output.resolve(), args.trial, args.subset)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        export(req)
    except (ExportError, ConfigError, DataError, BackboneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
