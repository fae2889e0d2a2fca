"""One Ray Tune trial of a sweep, run inside a Ray worker.

fine-tune (or restore the post-fine-tuning checkpoint of an earlier attempt) -> checkpoint ->
``kind=layerwise``: fit Laplace once and evaluate every layer subset (in-process, or as Ray tasks in
the trial's child bundles); ``kind=peft_methods``: the MAP metrics (and with ``laplace``, the
Laplace predictive of all tuned block parameters) -> log to MLflow -> ``tune.report`` the metrics.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from ray import tune

from distlap import names
from distlap.bayes.layerwise import write_results
from distlap.config import TrialConfig
from distlap.finetune.run import FineTuned, prepare, train
from distlap.finetune.train import TrainingFailed
from distlap.provenance import provenance
from distlap.sweep import checkpoints
from distlap.sweep.glm_tasks import ray_glm_runner
from distlap.sweep.settings import SweepConfig, trial_config
from distlap.sweep.subset_tasks import ray_nn_evaluator
from distlap.sweep.tracking import TrialRun, flatten, provenance_tags
from distlap.trial import (
    check_subsets,
    costs,
    evaluate,
    laplace_metrics,
    layerwise,
    map_metrics,
    record,
    write_posterior,
    write_trial,
)
from distlap.trial import scoring as trial_scoring

# Test hook: the first attempt of a trial dies after this epoch (its checkpoint saved), as a preempted
# worker would; the retry must resume from that checkpoint (tests/sweep/test_checkpoints.py).
FAIL_AFTER_EPOCH = "DISTLAP_FAIL_AFTER_EPOCH"


def layerwise_trial(config: dict, sweep: SweepConfig) -> None:
    """Ray Tune function trainable of ``kind=layerwise``; ``config`` = searched settings + MLflow run id."""
    _run(config, sweep, layer_subsets=None)


def peft_methods_trial(config: dict, sweep: SweepConfig) -> None:
    """Ray Tune function trainable of ``kind=peft_methods``: the MAP metrics of the trial's PEFT method,
    and with ``sweep.laplace`` the Laplace predictive over all its tuned block parameters."""
    _run(config, sweep, layer_subsets=("all",) if sweep.laplace else ())


def _run(config: dict, sweep: SweepConfig, layer_subsets: tuple[str, ...] | None) -> None:
    """Fine-tune (or restore), then Laplace over ``layer_subsets`` (None = all of them, () = no
    Laplace), log to MLflow, write ``trial_result.json`` and report the metrics to Tune."""
    start = time.perf_counter()
    _quiet_worker()
    trial_id = tune.get_context().get_trial_id()
    params = {k: v for k, v in config.items() if k != names.RUN_ID}
    out = sweep.out / names.TRIALS_DIR / trial_id
    threads = sweep.trial.train.num_threads or max(1, int(sweep.resources.cpus_per_trial))
    cfg = trial_config(sweep, {**params, "train.num_threads": threads}, output_dir=str(out))

    def log(msg: str) -> None:
        print(f"[{trial_id}] {msg}", flush=True)

    with TrialRun(sweep.tracking.uri, config[names.RUN_ID]) as run:
        run.log(
            params={k: v for k, v in flatten(cfg.model_dump(mode="json")).items() if k not in params},
            tags=provenance_tags(provenance()),
        )
        ft, fitted = _fine_tuned(cfg, run, log, sweep.resources.checkpoint_every_s)
        log(
            "stage: MAP evaluation"
            if layer_subsets == ()
            else "stage: Laplace fit and layer-subset evaluation"
        )
        metrics = (
            map_metrics(ft)
            if layer_subsets == ()
            else _laplace_stage(ft, sweep, layer_subsets, run, fitted, log)
        )
        metrics.update(costs(ft, wall_time_s=time.perf_counter() - start))
        run.log(metrics=metrics)
        write_trial(ft, record(ft, metrics, status="ok", message=""), out)
        log(f"stage: done, {sweep.search.metric} = {metrics[sweep.search.metric]:.4f}")
    tune.report(metrics)


def _laplace_stage(ft: FineTuned, sweep: SweepConfig, only, run: TrialRun, fitted: dict | None, log) -> dict:
    """The layer-wise study (with child bundles: nn subsets, or shards of each glm pass, as Ray tasks),
    checkpointed after the fit; results written and logged."""
    cfg = ft.cfg
    on_fit = lambda state: checkpoints.report(ft, {"stage": "laplace-fit"}, laplace_fit=state)
    study = layerwise(ft, only=only, fitted=fitted, on_fit=on_fit, log=log, **_task_runners(ft, sweep, log))
    result = evaluate(ft, study, log=log) if only is None else study.result
    out = Path(cfg.output_dir)
    write_results(result, out)
    write_posterior(study, out)
    run.log_subsets(result, out / "plots")
    run.log_artifact(out / names.LAYERWISE_FILE)
    _log_attribution(run, result.get("attribution"))
    return laplace_metrics(result)


def _task_runners(ft: FineTuned, sweep: SweepConfig, log) -> dict:
    """``evaluate_nn`` (nn: one Ray task per subset) or ``run_glm`` (glm: one Ray task per shard of each
    Jacobian pass) for ``resources.eval_tasks`` > 0; none with 0 (all in the trial process)."""
    tasks, resources = sweep.resources.eval_tasks, sweep.resources.task_resources()
    if not tasks:
        return {}
    if ft.cfg.laplace.predictive == "glm":
        return {"run_glm": ray_glm_runner(tasks, resources, log)}
    return {"evaluate_nn": ray_nn_evaluator(ft, trial_scoring(ft), resources, log)}


def _log_attribution(run: TrialRun, attribution: dict | None) -> None:
    """Shapley values by block (step = block) and the greedy best-k curve (step = k), per score."""
    for score, values in (attribution or {}).get("values", {}).items():
        for block, phi in enumerate(values["shapley"]):
            run.log(metrics={names.SHAPLEY + score: phi}, step=block)
        for step in values["greedy"]:
            run.log(metrics={names.BEST_K + score: step["value"]}, step=step["size"])


def _quiet_worker() -> None:
    """Keep the driver's terminal readable: no download bars, no library deprecation notices."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


class _EpochCheckpoints:
    """After an epoch, at most every ``every_s`` seconds: the epochs' rows to MLflow and a mid-training
    checkpoint (each costs a store write, which at a few tenths of a second per epoch was a tenth of a
    small trial); ``flush`` sends the rows still pending."""

    def __init__(self, ft: FineTuned, run: TrialRun, every_s: float):
        self.ft, self.run, self.every_s = ft, run, every_s
        self.pending: list[dict] = []
        self.last = time.monotonic()

    def __call__(self, row: dict, state: dict) -> None:
        self.pending.append(row)
        if time.monotonic() - self.last >= self.every_s:
            self.flush()
            checkpoints.report(self.ft, {"stage": "epoch", "epoch": row["epoch"]}, train_state=state)
            self.last = time.monotonic()

    def flush(self) -> None:
        if self.pending:
            self.run.log_history(self.pending)
            self.pending = []


def _fine_tuned(cfg: TrialConfig, run: TrialRun, log, every_s: float = 0.0) -> tuple[FineTuned, dict | None]:
    """Fine-tune, checkpointing after epochs (at most every ``every_s`` seconds) and at the end; a
    restarted trial (retry, resumed sweep, preempted worker) continues from its latest checkpoint. Returns
    the trained model and a restored Laplace fit (or None)."""
    restored = checkpoints.restore(cfg, log)
    if restored is not None and restored.trained:
        log("stage: restored the fine-tuned adapter from the trial checkpoint (no retraining)")
        return restored.ft, restored.laplace_fit
    ft = restored.ft if restored is not None else prepare(cfg, log=log)
    check_subsets(ft)  # laplace.subsets name blocks this backbone has: refused before any training
    resume = restored.train_state if restored is not None else None
    log(f"stage: fine-tuning (from epoch {len(resume['history']) + 1})" if resume else "stage: fine-tuning")

    every = _EpochCheckpoints(ft, run, every_s)

    def epoch_done(row: dict, state: dict) -> None:
        every(row, state)
        if restored is None and row["epoch"] == int(os.environ.get(FAIL_AFTER_EPOCH, 0)):
            raise RuntimeError(f"{FAIL_AFTER_EPOCH}: injected failure after epoch {row['epoch']}")

    train(ft, log=log, on_epoch=epoch_done, resume=resume)
    every.flush()
    if ft.train.status != "ok":
        write_trial(ft, record(ft, {}), Path(cfg.output_dir))
        raise TrainingFailed(ft.train.message)
    checkpoints.report(ft, {"stage": "fine-tuned", names.TIME_PER_EPOCH: ft.train.time_per_epoch_s})
    return ft, None
