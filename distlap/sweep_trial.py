"""One Ray Tune trial of a sweep, run inside a Ray worker.

fine-tune (or restore the post-fine-tuning checkpoint of an earlier attempt) -> checkpoint ->
``kind=layerwise``: fit Laplace once and evaluate every layer subset (in-process, or as Ray tasks in
the trial's child bundles); ``kind=peft_methods``: the MAP metrics (and with ``laplace``, the
Laplace predictive of all tuned block parameters) -> log to MLflow -> ``tune.report`` the metrics.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

from ray import tune

from distlap.backbones import LogitsModel, load_backbone
from distlap.config import TrialConfig
from distlap.data import load_splits
from distlap.layerwise import RESULTS_FILE, run_layerwise
from distlap.provenance import provenance
from distlap.runtime import resolve_device, seed_everything, set_threads
from distlap.search import RUN_ID_KEY
from distlap.sweep_config import SweepConfig, trial_config
from distlap.tracking import TrialRun, flatten, provenance_tags
from distlap.train import TrainResult
from distlap.trial import FineTuned, evaluate_map, fine_tune, write_trial

HISTORY_FILE = "history.json"
ADAPTER_DIR = "adapter"


class TrialFailed(RuntimeError):
    """Fine-tuning ended with ``status="failed"`` (e.g. a non-finite loss); the message says why."""


def layerwise_trial(config: dict, sweep: SweepConfig) -> None:
    """Ray Tune function trainable of ``kind=layerwise``; ``config`` = searched settings + MLflow run id."""
    _run(config, sweep, layer_subsets=None)


def peft_methods_trial(config: dict, sweep: SweepConfig) -> None:
    """Ray Tune function trainable of ``kind=peft_methods``: the MAP metrics of the trial's PEFT method,
    and with ``sweep.laplace`` the Laplace predictive over all its tuned block parameters."""
    _run(config, sweep, layer_subsets=("all",) if sweep.laplace else ())


TRAINABLES = {"layerwise": layerwise_trial, "peft_methods": peft_methods_trial}


def _run(config: dict, sweep: SweepConfig, layer_subsets: tuple[str, ...] | None) -> None:
    """Fine-tune (or restore), then Laplace over ``layer_subsets`` (None = all of them, () = no
    Laplace), log to MLflow, write ``trial_result.json`` and report the metrics to Tune."""
    start = time.perf_counter()
    _quiet_worker()
    trial_id = tune.get_context().get_trial_id()
    params = {k: v for k, v in config.items() if k != RUN_ID_KEY}
    out = sweep.out / "trials" / trial_id
    threads = sweep.trial.train.num_threads or max(1, int(sweep.resources.cpus_per_trial))
    cfg = trial_config(sweep, {**params, "train.num_threads": threads}, output_dir=str(out))

    def log(msg: str) -> None:
        print(f"[{trial_id}] {msg}", flush=True)

    with TrialRun(sweep.tracking.uri, config[RUN_ID_KEY]) as run:
        run.log(params={k: v for k, v in flatten(cfg.model_dump(mode="json")).items() if k not in params},
                tags=provenance_tags(provenance()))
        ft = _fine_tuned(cfg, run, log)
        if layer_subsets == ():
            log("stage: MAP evaluation")
            metrics = map_metrics(ft, wall_time_s=time.perf_counter() - start)
        else:
            log("stage: Laplace fit and layer-subset evaluation")
            eval_tasks = sweep.resources.eval_tasks
            result = run_layerwise(ft, log=log, parallel=eval_tasks > 0, only=layer_subsets,
                                   task_resources=sweep.resources.task_resources() if eval_tasks else None)
            metrics = trial_metrics(ft, result, wall_time_s=time.perf_counter() - start)
            run.log_subsets(result, out / "plots")
            run.log_artifact(out / RESULTS_FILE)
        run.log(metrics=metrics)
        write_trial(ft, {"status": "ok", "message": "", "metrics": metrics, "history": ft.train.history,
                         "config": cfg.model_dump(mode="json"), "provenance": provenance()}, out)
        log(f"stage: done, {sweep.search.metric} = {metrics[sweep.search.metric]:.4f}")
    tune.report(metrics)


def _quiet_worker() -> None:
    """Keep the driver's terminal readable: no download bars, no library deprecation notices."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _fine_tuned(cfg: TrialConfig, run: TrialRun, log) -> FineTuned:
    """Fine-tune and checkpoint; a restarted trial (retry or resumed sweep) restores instead."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            ft = restore_fine_tuned(cfg, Path(path))
        log("stage: restored the fine-tuned adapter from the trial checkpoint (no retraining)")
        return ft
    log("stage: fine-tuning")
    ft = fine_tune(cfg, log=log)
    if ft.train.status != "ok":
        write_trial(ft, {"status": ft.train.status, "message": ft.train.message, "metrics": {},
                         "history": ft.train.history, "config": cfg.model_dump(mode="json"),
                         "provenance": provenance()}, Path(cfg.output_dir))
        raise TrialFailed(ft.train.message)
    run.log_history(ft.train.history)
    with tempfile.TemporaryDirectory() as path:
        save_fine_tuned(ft, Path(path))
        # Tune persists the checkpoint to the sweep's storage before report returns.
        tune.report({"stage": "fine-tuned", "time_per_epoch_s": ft.train.time_per_epoch_s},
                    checkpoint=tune.Checkpoint.from_directory(path))
    return ft


def save_fine_tuned(ft: FineTuned, path: Path) -> None:
    ft.peft_model.save_pretrained(path / ADAPTER_DIR)
    (path / HISTORY_FILE).write_text(json.dumps(ft.train.history))


def restore_fine_tuned(cfg: TrialConfig, path: Path) -> FineTuned:
    """Rebuild what :func:`distlap.trial.fine_tune` returned from :func:`save_fine_tuned`'s folder.

    Same data split, same backbone and fresh head as ``fine_tune``; the adapter (and the trained head,
    a peft ``modules_to_save``) is loaded on top, trainable so Laplace sees its parameters.
    """
    from peft import PeftModel

    from distlap.adapters import tuned_params

    seed_everything(cfg.seed)
    set_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    splits = load_splits(cfg.data, seed=cfg.seed)
    backbone, transform = load_backbone(cfg.backbone.name, splits.num_classes,
                                        cache_dir=cfg.backbone.cache_dir, seed=cfg.seed,
                                        data_path=cfg.data.path)
    peft_model = PeftModel.from_pretrained(backbone, path / ADAPTER_DIR, is_trainable=True)
    history = json.loads((path / HISTORY_FILE).read_text())
    return FineTuned(cfg, LogitsModel(peft_model).to(device), transform, splits,
                     TrainResult(status="ok", history=history), tuned_params(peft_model), device)


def _costs(ft: FineTuned, wall_time_s: float) -> dict:
    return {"tuned_params": ft.tuned.trainable, "tuned_params_pct": ft.tuned.pct,
            "time_per_epoch_s": ft.train.time_per_epoch_s, "wall_time_s": wall_time_s}


def map_metrics(ft: FineTuned, *, wall_time_s: float) -> dict:
    """The MAP's metrics on val and test (``map/test/ece``, ...) and the trial's costs."""
    return {**{f"map/{k}": v for k, v in evaluate_map(ft).items()}, **_costs(ft, wall_time_s)}


def trial_metrics(ft: FineTuned, result: dict, *, wall_time_s: float) -> dict:
    """What the trial reports: MAP and Bayesian ('all' subset) metrics on val and test, Delta-ECE, costs.

    Only the configured validation metric is optimised; test metrics are reported, never tuned on.
    """
    best = result["subsets"]["all"]
    metrics = {f"{kind}/{split}/{k}": v for kind, row in (("map", result["map"]), ("bayes", best))
               for split in ("val", "test") for k, v in row[split].items()}
    ci = best["delta_ece"]
    ranked = sorted(result["subsets"], key=lambda name: -result["subsets"][name]["delta_ece"]["estimate"])
    metrics.update({
        "delta_ece": ci["estimate"], "delta_ece_low": ci["low"], "delta_ece_high": ci["high"],
        "best_subset": ranked[0], "prior_precision": result["prior_precision"],
        "laplace_fit_s": result["timing"]["fit_s"], "laplace_eval_s": result["timing"]["eval_s"],
        **_costs(ft, wall_time_s),
    })
    return metrics
