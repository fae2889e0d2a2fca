"""A sweep (layer-wise, or PEFT methods): Ray Tune trials, searched by Optuna, tracked in MLflow, resumable.

``run_sweep(cfg)``: output folder -> Ray (local, or the cluster at ``cfg.address``) -> MLflow parent
run -> ``Tuner`` (one placement group per trial: its own bundle plus child bundles for the subset
tasks; :class:`~distlap.sweep.search.StudySearch` over an Optuna RDB study) -> ``summary.csv``.
``run_sweep(cfg, resume=True)`` continues an interrupted sweep from its output folder
(``Tuner.restore``): finished trials are kept, unfinished ones restart from their fine-tuning
checkpoint, and the sweep ends with exactly ``search.num_samples`` trials.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import pandas as pd
import ray
from ray import tune

from distlap import names
from distlap.config import ConfigError, to_yaml
from distlap.finetune.train import regime_note
from distlap.names import CONFIG_FILE, RAY_DIR, SUMMARY_FILE
from distlap.provenance import provenance
from distlap.sweep import kinds, preflight, ray_compat, recovery
from distlap.sweep.lock import SweepLock, check_owned
from distlap.sweep.progress import ProgressView, quiet_start
from distlap.sweep.search import StudySearch
from distlap.sweep.settings import SweepConfig, load_sweep_config, max_concurrent
from distlap.sweep.stores import StoreError, check_stores, client_env, store_fault
from distlap.sweep.study import summarize
from distlap.sweep.tracking import SweepTracker, flatten, provenance_tags
from distlap.sweep.worker_setup import WORKER_SETUP

# Ray Tune saves the experiment (trials, searcher) at most this often; a killed driver loses less.
CHECKPOINT_PERIOD_S = "2"


class SweepError(RuntimeError):
    """The sweep cannot start: unreachable cluster, occupied or missing output folder."""


def run_sweep(cfg: SweepConfig, *, resume: bool = False, log=print) -> pd.DataFrame:
    """Run (or with ``resume`` continue) the sweep ``cfg`` (resolved by ``settings.resolve``).

    Everything that can be checked is checked before anything is written: the folder, the inputs, the
    stores, the cluster and the cost (:mod:`~distlap.sweep.preflight`). A store that fails mid-sweep
    raises :class:`~distlap.sweep.stores.StoreError` once the sweep has stopped (results kept)."""
    recovery.reset()
    _check_output(cfg, resume)
    quiet_start(cfg.address)  # before the stores are opened and Ray starts: only messages one can act on
    with contextlib.ExitStack() as stack:
        if resume:
            check_owned(cfg.out)
            stack.enter_context(SweepLock(cfg.out))  # a second driver is refused before anything starts
        concurrency = _prepare(cfg, resume, stack, log)
        if resume:  # the config continued, with the overrides a resume may make (load_saved)
            (cfg.out / CONFIG_FILE).write_text(to_yaml(cfg))
        if not resume:
            cfg.out.mkdir(parents=True, exist_ok=True)
            stack.enter_context(SweepLock(cfg.out))
            _check_output(cfg, resume)  # again, under the lock: another driver may have just begun
            (cfg.out / CONFIG_FILE).write_text(to_yaml(cfg))
        return _sweep(cfg, resume, concurrency, log)


def _prepare(cfg: SweepConfig, resume: bool, stack: contextlib.ExitStack, log) -> int:
    """Inputs, stores, cluster, cost; Ray is started (and shut down when ``stack`` closes). Returns the
    number of trials at once."""
    preflight.check_address(cfg.address)  # seconds, not Ray's minutes of retries
    client = (cfg.address or "").startswith("ray://")
    inputs = None if client else preflight.check_inputs(cfg, log)  # Ray Client: the data are remote
    try:
        check_stores(cfg, resume)
    except StoreError as err:
        raise SweepError(f"{err}. Fix it (or choose another store) and run again") from None
    os.environ.update(client_env())
    if _connect(cfg.address):
        stack.callback(ray.shutdown)
    concurrency = max_concurrent(cfg, ray.cluster_resources())
    if inputs is not None:
        memory = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0)
        preflight.check_cost(cfg, inputs, memory or preflight.machine_memory(), concurrency, log)
    log(
        f"[sweep] {cfg.search.num_samples} trials, at most {concurrency} at once, each in "
        f"{cfg.resources.bundles()}; output {cfg.out}"
    )
    log(f"[sweep] {regime_note(cfg.trial.train)}")
    return concurrency


def _sweep(cfg: SweepConfig, resume: bool, concurrency: int, log) -> pd.DataFrame:
    """The tuner, then ``summary.csv`` and the sweep run's end; a store fault ends it with StoreError."""
    tracker = None
    try:
        tracker = _open_tracker(cfg)
        tracker.share_view(list(cfg.search.space), kinds.key_metrics(cfg))
        # Trials report once after fine-tuning (the checkpoint) without the objective, which only
        # exists after the Laplace stage; Tune would otherwise reject that report.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", CHECKPOINT_PERIOD_S)
        with recovery.failure_policy(cfg):
            results = _tuner(cfg, tracker, concurrency, resume).fit()
        fault = recovery.first_fault()
        if fault is None:
            ended = all(r.error is not None or cfg.search.metric in (r.metrics or {}) for r in results)
            if ended:  # Tune calls interrupted trials TERMINATED too, hence the check of their results
                recovery.reconcile(cfg)  # every Ray trial ended: no Optuna trial may stay RUNNING
            return _finish(cfg, tracker, log)
    except Exception as err:  # while stopping for a fault, Tune trips over what the store lost
        fault = recovery.first_fault() or store_fault(err, cfg)
        if fault is None:
            raise
    _stop_on_fault(cfg, tracker, fault)
    raise fault


def _open_tracker(cfg: SweepConfig) -> SweepTracker:
    local = not cfg.tracking.uri.startswith(("http://", "https://"))
    return SweepTracker.open(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        cfg.search.study_name,
        run_name=cfg.name,
        artifact_location=Path(cfg.tracking.artifacts or cfg.out / "mlartifacts").as_uri() if local else None,
        params=flatten(cfg.model_dump(mode="json", exclude={"trial"})),
        tags=provenance_tags(provenance()),
    )


def _finish(cfg: SweepConfig, tracker: SweepTracker, log) -> pd.DataFrame:
    summary = summarize(cfg)
    summary.to_csv(cfg.out / SUMMARY_FILE, index=False)
    done = len(summary) == cfg.search.num_samples and (summary.status != "unfinished").all()
    if not done:
        tracker.kill_unfinished()
    tracker.finish(
        metrics=_sweep_metrics(cfg, summary),
        status="FINISHED" if done else "KILLED",
        artifacts=[cfg.out / SUMMARY_FILE, cfg.out / CONFIG_FILE],
    )
    _print_summary(cfg, summary, done, log)
    return summary


def _stop_on_fault(cfg: SweepConfig, tracker: SweepTracker | None, fault: StoreError) -> None:
    """Keep what the healthy stores can still take: summary.csv, and the runs marked KILLED."""
    with contextlib.suppress(Exception):
        if fault.store != "Optuna":
            summarize(cfg).to_csv(cfg.out / SUMMARY_FILE, index=False)
    with contextlib.suppress(Exception):
        if tracker is not None and fault.store != "MLflow":
            tracker.kill_unfinished()
            tracker.finish(metrics={}, status="KILLED", artifacts=[])


# Settings a --resume may change: where and how trials run, not what they compute.
RESUMABLE = ("resources.", "max_failures", "address")
NOT_RESUMABLE = ("resources.max_concurrent",)  # Ray Tune keeps the concurrency a sweep started with


def load_saved(out: Path, overrides: list[str] | None = None, exact: dict | None = None) -> SweepConfig:
    """The config a sweep saved in its output folder (what ``--resume`` continues), with the
    ``overrides`` that are safe on resume (:data:`RESUMABLE`); any other change is refused by name."""
    saved_file = out.expanduser().resolve() / CONFIG_FILE
    if not saved_file.is_file():
        raise SweepError(f"--resume: {out} holds no sweep (no {CONFIG_FILE})")
    before = flatten(load_sweep_config(saved_file).model_dump(mode="json"))
    cfg = load_sweep_config(saved_file, overrides, exact)
    after = flatten(cfg.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    refused = [k for k in changed if not k.startswith(RESUMABLE) or k.startswith(NOT_RESUMABLE)]
    if refused:
        raise ConfigError(
            "--resume cannot change "
            + ", ".join(f"{k} (the sweep ran with {before.get(k)!r})" for k in refused)
            + "; a resumed sweep computes what it started with. On --resume you may change resources.* "
            "(but max_concurrent), max_failures and --address; for anything else start a new sweep "
            "with another --output"
        )
    return cfg


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
    try:
        # address None -> "local": a fresh Ray, never a stale cluster named in /tmp/ray or RAY_ADDRESS.
        ray.init(
            address=address or "local",
            include_dashboard=False if address is None else None,
            log_to_driver=True,
            runtime_env={"env_vars": client_env(), "worker_process_setup_hook": WORKER_SETUP},
        )
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as err:
        first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise SweepError(
            f"cannot reach the Ray cluster at --address {address!r}: {first}. Start it "
            "(`ray up cluster.yaml`, or `ray start --head` here) or leave --address out "
            "to run on a local Ray."
        ) from None
    return True


def trial_resources(cfg: SweepConfig) -> tune.PlacementGroupFactory:
    """The trial's bundle first, then one child bundle per subset task (PACK: same node if it fits).

    Tune schedules the trainable in bundle 0 and captures the Ray tasks it launches in the same
    placement group, so subset tasks can only use the child bundles: they never wait on another
    trial's resources, and with ``eval_tasks=0`` the subsets run in the trial process (no tasks).
    """
    return tune.PlacementGroupFactory(cfg.resources.bundles(), strategy="PACK")


def _tuner(cfg: SweepConfig, tracker: SweepTracker, concurrency: int, resume: bool) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(recovery.replaying(kinds.trainable(cfg)), sweep=cfg), trial_resources(cfg)
    )
    experiment = cfg.out / RAY_DIR / cfg.name
    if resume and tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=StudySearch(cfg.search, tracker, on_fault=functools.partial(recovery.on_fault, cfg)),
            metric=cfg.search.metric,
            mode=cfg.search.direction,
            num_samples=cfg.search.num_samples,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=_trial_dirname,
            # a trial in the process of the one before: torch, transformers, peft and laplace-torch are
            # imported once per slot, not once per trial (about 10 s each on the default's 2 cores)
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=str(cfg.out / RAY_DIR),
            # distlap decides retries (recovery.failure_policy); this is Ray's fallback.
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            callbacks=[_MarkFailedRuns(cfg, tracker), ProgressView(cfg, concurrency)],
            verbose=0,  # ProgressView prints the progress instead of Tune's tables
        ),
    )


def _trial_dirname(trial) -> str:
    return trial.trial_id


class _MarkFailedRuns(tune.Callback):
    """A trial whose worker died could not end its MLflow run; the driver marks it FAILED."""

    def __init__(self, cfg: SweepConfig, tracker: SweepTracker):
        self.cfg, self.tracker = cfg, tracker

    def on_trial_error(self, iteration, trials, trial, **info):
        try:
            self.tracker.mark_failed(trial.config[names.RUN_ID], ray_compat.failure_message(trial))
        except Exception as err:
            if not recovery.on_fault(self.cfg, err):
                raise


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
                for k in (names.OBJECTIVE, *kinds.summary_metrics(cfg))
                if isinstance(ok.loc[best, k], int | float)
            }
        )
    return metrics


def _print_summary(cfg: SweepConfig, summary: pd.DataFrame, done: bool, log) -> None:
    columns = ["optuna_trial", "status", *cfg.search.space, *kinds.printed_metrics(cfg)]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        log(summary[columns].to_string(index=False))
    log(f"[sweep] objective {cfg.search.metric} ({cfg.search.direction}); summary {cfg.out / SUMMARY_FILE}")
    if not done:
        log(
            f"[sweep] interrupted after {len(summary)} of {cfg.search.num_samples} trials started; "
            f"continue with: {kinds.resume_command(cfg)}"
        )
