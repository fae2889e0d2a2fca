"""A sweep (layer-wise, or PEFT methods): Ray Tune trials, searched by Optuna, tracked in MLflow, resumable.

``run_sweep(cfg)``: output folder -> Ray (local, or the cluster at ``cfg.address``) -> MLflow parent
run -> ``Tuner`` (one placement group per trial: its own bundle plus child bundles for the subset
tasks; :class:`~distlap.sweep.search.StudySearch` over an Optuna RDB study) -> ``summary.csv``.
``run_sweep(cfg, resume=True)`` continues an interrupted sweep from its output folder
(``Tuner.restore``): finished trials are kept, unfinished ones restart from their fine-tuning
checkpoint, and the sweep ends with exactly ``search.num_samples`` trials.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pandas as pd
import ray
from ray import tune

from distlap import names
from distlap.config import to_yaml
from distlap.names import CONFIG_FILE, RAY_DIR, SUMMARY_FILE
from distlap.provenance import provenance
from distlap.sweep.progress import ProgressView, key_metrics, quiet_start
from distlap.sweep.search import StudySearch
from distlap.sweep.settings import SweepConfig, load_sweep_config, max_concurrent
from distlap.sweep.study import summarize, summary_metrics
from distlap.sweep.tracking import SweepTracker, flatten, provenance_tags
from distlap.sweep.trainable import TRAINABLES


def _printed(cfg: SweepConfig) -> list[str]:
    if cfg.kind == "layerwise":
        return [
            names.OBJECTIVE,
            names.score("bayes", "test", "ece"),
            names.delta("bayes", "test", "ece"),
            names.BEST_SUBSET,
        ]
    return [
        names.score("map", "test", "accuracy"),
        names.score("map", "test", "ece"),
        *([names.delta("bayes", "test", "ece")] if cfg.laplace else []),
        names.TUNED_PARAMS_PCT,
        names.TIME_PER_EPOCH,
    ]


class SweepError(RuntimeError):
    """The sweep cannot start: unreachable cluster, occupied or missing output folder."""


def run_sweep(cfg: SweepConfig, *, resume: bool = False, log=print) -> pd.DataFrame:
    """Run (or with ``resume`` continue) the sweep ``cfg`` (resolved by ``settings.resolve``)."""
    _check_output(cfg, resume)
    quiet_start(cfg.address)
    started_ray = _connect(cfg.address)
    try:
        if not resume:
            cfg.out.mkdir(parents=True, exist_ok=True)
            (cfg.out / CONFIG_FILE).write_text(to_yaml(cfg))
        concurrency = max_concurrent(cfg, ray.cluster_resources())
        log(
            f"[sweep] {cfg.search.num_samples} trials, at most {concurrency} at once, each in "
            f"{cfg.resources.bundles()}; output {cfg.out}"
        )
        tracker = SweepTracker.open(
            cfg.tracking.uri,
            cfg.tracking.experiment,
            cfg.search.study_name,
            run_name=cfg.name,
            artifact_location=str(cfg.out / "mlartifacts") if cfg.tracking.uri.startswith("sqlite") else None,
            params=flatten(cfg.model_dump(mode="json", exclude={"trial"})),
            tags=provenance_tags(provenance()),
        )
        tracker.share_view(list(cfg.search.space), key_metrics(cfg))
        # Trials report once after fine-tuning (the checkpoint) without the objective, which only
        # exists after the Laplace stage; Tune would otherwise reject that report.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        _tuner(cfg, tracker, concurrency, resume).fit()
        summary = summarize(cfg)
        summary.to_csv(cfg.out / SUMMARY_FILE, index=False)
        done = len(summary) == cfg.search.num_samples and (summary.status != "unfinished").all()
        tracker.finish(
            metrics=_sweep_metrics(cfg, summary),
            status="FINISHED" if done else "KILLED",
            artifacts=[cfg.out / SUMMARY_FILE, cfg.out / CONFIG_FILE],
        )
        _print_summary(cfg, summary, done, log)
        return summary
    finally:
        if started_ray:
            ray.shutdown()


def load_saved(out: Path, overrides: list[str] | None = None) -> SweepConfig:
    """The config a sweep saved in its output folder: what ``--resume`` continues."""
    saved = out.expanduser().resolve() / CONFIG_FILE
    if not saved.is_file():
        raise SweepError(f"--resume: {out} holds no sweep (no {CONFIG_FILE})")
    return load_sweep_config(saved, overrides)


def _check_output(cfg: SweepConfig, resume: bool) -> None:
    saved = cfg.out / CONFIG_FILE
    if resume and not saved.is_file():
        raise SweepError(f"--resume: {cfg.out} holds no sweep (no {CONFIG_FILE})")
    if not resume and saved.exists():
        raise SweepError(
            f"{cfg.out} already holds a sweep; continue it with --resume --output {cfg.out} "
            "or choose another --output"
        )


def _connect(address: str | None) -> bool:
    """Join the cluster at ``address`` or start a local Ray; True if this call started Ray."""
    if ray.is_initialized():
        return False
    _check_reachable(address)
    try:
        # address None -> "local": a fresh Ray, never a stale cluster named in /tmp/ray or RAY_ADDRESS.
        ray.init(
            address=address or "local",
            include_dashboard=False if address is None else None,
            log_to_driver=True,
        )
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as err:
        first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise SweepError(
            f"cannot reach the Ray cluster at --address {address!r}: {first}. Start it "
            "(`ray up cluster.yaml`, or `ray start --head` here) or leave --address out "
            "to run on a local Ray."
        ) from None
    return True


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a HOST:PORT nobody listens on (Ray itself retries for minutes)."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise SweepError(
            f"cannot reach the Ray cluster at --address {address!r} ({err}); expected "
            "ray://HEAD:10001 (Ray Client) or HEAD:6379 (on a cluster node), or auto"
        ) from None


def trial_resources(cfg: SweepConfig) -> tune.PlacementGroupFactory:
    """The trial's bundle first, then one child bundle per subset task (PACK: same node if it fits).

    Tune schedules the trainable in bundle 0 and captures the Ray tasks it launches in the same
    placement group, so subset tasks can only use the child bundles: they never wait on another
    trial's resources, and with ``eval_tasks=0`` the subsets run in the trial process (no tasks).
    """
    return tune.PlacementGroupFactory(cfg.resources.bundles(), strategy="PACK")


def _tuner(cfg: SweepConfig, tracker: SweepTracker, concurrency: int, resume: bool) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(TRAINABLES[cfg.kind], sweep=cfg), trial_resources(cfg)
    )
    experiment = cfg.out / RAY_DIR / cfg.name
    if resume and tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=StudySearch(cfg.search, tracker),
            metric=cfg.search.metric,
            mode=cfg.search.direction,
            num_samples=cfg.search.num_samples,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=str(cfg.out / RAY_DIR),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            callbacks=[_MarkFailedRuns(tracker), ProgressView(cfg, concurrency)],
            verbose=0,  # ProgressView prints the progress instead of Tune's tables
        ),
    )


def _trial_dirname(trial) -> str:
    return trial.trial_id


class _MarkFailedRuns(tune.Callback):
    """A trial whose worker died could not end its MLflow run; the driver marks it FAILED."""

    def __init__(self, tracker: SweepTracker):
        self.tracker = tracker

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial.get_pickled_error() or trial.get_error()
        message = str(error).strip().splitlines()[-1] if error else "unknown error"
        self.tracker.mark_failed(trial.config[names.RUN_ID], message)


def _sweep_metrics(cfg: SweepConfig, summary: pd.DataFrame) -> dict[str, float]:
    ok = summary[summary.status == "ok"]
    metrics = {
        names.N_TRIALS: len(summary),
        names.N_OK: len(ok),
        names.N_FAILED: int((summary.status == "failed").sum()),
    }
    if len(ok):
        objective = ok[names.OBJECTIVE]
        best = objective.idxmin() if cfg.search.direction == "min" else objective.idxmax()
        metrics.update(
            {
                names.BEST + k: ok.loc[best, k]
                for k in (names.OBJECTIVE, *summary_metrics(cfg))
                if isinstance(ok.loc[best, k], int | float)
            }
        )
    return metrics


def _print_summary(cfg: SweepConfig, summary: pd.DataFrame, done: bool, log) -> None:
    columns = ["optuna_trial", "status", *cfg.search.space, *_printed(cfg)]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        log(summary[columns].to_string(index=False))
    log(f"[sweep] objective {cfg.search.metric} ({cfg.search.direction}); summary {cfg.out / SUMMARY_FILE}")
    if not done:
        log(
            f"[sweep] interrupted after {len(summary)} of {cfg.search.num_samples} trials started; "
            f"continue with: python sweeps/{cfg.kind}.py --resume --output {cfg.out}"
        )
