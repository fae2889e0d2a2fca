"""One trial without Ray: fine-tune to the MAP (:mod:`distlap.finetune`), then optionally the layer-wise
Laplace study (:mod:`distlap.bayes`), and the trial's metrics under :mod:`distlap.names` keys.

``python -m distlap.trial [--config X.yaml] [key=value ...] [--output DIR] [--layerwise]`` prints the
result as JSON. The sweep's Ray trials (:mod:`distlap.sweep.trainable`) call the same functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from distlap import intervals, names, protocol
from distlap.bayes import glm_posterior
from distlap.bayes.evaluate import split_scores
from distlap.bayes.glm import PassRunner
from distlap.bayes.layers import layer_subsets, num_blocks
from distlap.bayes.layerwise import LaplaceData, NNEvaluator, Scoring, Study, run_layerwise, write_results
from distlap.bayes.predictors import GLMPredictive
from distlap.bayes.switch_off import switch_off_test
from distlap.config import ConfigError, TrialConfig, load_config, to_yaml
from distlap.finetune.backbones import BackboneError
from distlap.finetune.data import DataError
from distlap.finetune.run import ADAPTER_DIR, FineTuned, prepare, save_adapter, train
from distlap.finetune.train import regime_note
from distlap.provenance import provenance
from distlap.robustness import robustness
from distlap.runtime import predict


def laplace_data(ft: FineTuned) -> LaplaceData:
    """The Laplace stage's view of a fine-tuned trial: its model, the fit subset, validation and test."""
    la = ft.cfg.laplace
    return LaplaceData(
        model=ft.model,
        method=ft.cfg.peft.method,
        fit=ft.loader("train", batch_size=la.batch_size, max_examples=la.fit_examples),
        val=ft.loader("val", batch_size=la.eval_batch_size),
        test=ft.loader("test", batch_size=la.eval_batch_size),
        n_train=len(ft.splits.train),
        device=ft.device,
        prior_mean=ft.prior.means,
    )


def layerwise(
    ft: FineTuned,
    *,
    only: Sequence[str] | None = None,
    evaluate_nn: NNEvaluator | None = None,
    run_glm: PassRunner | None = None,
    fitted: dict | None = None,
    on_fit=None,
    log=print,
) -> Study:
    """The layer-wise study of ``ft`` with its config's Laplace settings (see :func:`run_layerwise`),
    its result recording the prior's anchor and the regime (and, under the zero anchor, the switch-off
    test of every LoRA block)."""
    cfg = ft.cfg
    study = run_layerwise(
        laplace_data(ft),
        cfg.laplace,
        prior_precision=cfg.train.prior_precision,
        scoring=scoring(ft),
        only=only,
        evaluate_nn=evaluate_nn,
        run_glm=run_glm,
        fitted=fitted,
        on_fit=on_fit,
        log=log,
    )
    study.result |= prior_record(ft, log)
    return study


def scoring(ft: FineTuned, n_bootstrap: int | None = None) -> Scoring:
    """How ``ft``'s predictives are scored: its bins, ``laplace.n_bootstrap`` resamples seeded by its test
    set (paired across training seeds that share it), posterior samples seeded by the training seed."""
    test_set = intervals.test_set_identity(*ft.splits.test.tensors)
    n = ft.cfg.laplace.n_bootstrap if n_bootstrap is None else n_bootstrap
    return Scoring(ft.cfg.n_bins, n, intervals.bootstrap_seed(test_set), sample_seed=ft.cfg.seed)


def prior_record(ft: FineTuned, log) -> dict:
    """``laplace/prior_anchor``, ``laplace/regime`` and, for LoRA under the zero anchor,
    ``laplace/switch_off``: per block, whether the prior alone makes A = B = 0 a local minimum."""
    train_cfg = ft.cfg.train
    out = {names.PRIOR_ANCHOR: train_cfg.prior_anchor, names.REGIME: train_cfg.regime}
    if train_cfg.prior_anchor != "zero" or ft.cfg.peft.method == "norm":
        return out
    fit = ft.loader("train", batch_size=ft.cfg.laplace.batch_size)
    tests = switch_off_test(ft.model, fit, train_cfg.prior_precision, len(ft.splits.train), ft.device)
    for t in tests:
        verdict = "a local minimum: the prior silences it" if t["silenced"] else "not a minimum"
        log(
            f"[distlap] zero anchor, block {t['block']}: sigma_max(grad_W NLL) at A = B = 0 is "
            f"{t['sigma']:.3g}, lambda/(N s) = {t['threshold']:.3g}: the origin is {verdict}"
        )
    return out | {names.SWITCH_OFF: tests}


def evaluate(ft: FineTuned, study: Study, log=print) -> dict:
    """Everything after the layer-wise study: the protocol (baselines, shift, OOD, inference,
    :func:`distlap.protocol.evaluate`) and, in the posthoc regime, the robustness of the answer to θ̂
    not being a mode (:func:`distlap.robustness.robustness`, ``result["robustness"]``)."""
    result = protocol.evaluate(ft, study, log=log)
    train_cfg = ft.cfg.train
    if train_cfg.regime == "posthoc" and train_cfg.refine_steps > 0:
        result["robustness"] = robustness(ft, study, lambda lam: restudy(ft, lam), log=log)
    return result


def restudy(ft: FineTuned, prior_precision: float) -> Study:
    """The layer-wise study again at the model's current parameters, as cheaply as the comparison allows:
    glm at the fixed ``prior_precision``, no bootstrap, quiet."""
    cfg = ft.cfg
    la = cfg.laplace.model_copy(update={"predictive": "glm", "prior_method": "fixed", "shapley_bootstrap": 0})
    return run_layerwise(
        laplace_data(ft), la, prior_precision=prior_precision, scoring=scoring(ft, 1), log=lambda _: None
    )


def map_metrics(ft: FineTuned) -> dict[str, float]:
    """The MAP's scores on validation and test: ``map/val/ece``, ``map/test/accuracy``, ..."""
    out = {}
    for split in ("val", "test"):
        probs, labels = predict(ft.model, ft.loader(split), ft.device)
        out.update(split_scores("map", split, probs, labels, ft.cfg.n_bins))
    return out


def costs(ft: FineTuned, wall_time_s: float) -> dict[str, float]:
    """What the trial cost, and how close to a mode of the negative log joint its MAP is."""
    return {
        names.TUNED_PARAMS: ft.tuned.trainable,
        names.TUNED_PARAMS_PCT: ft.tuned.pct,
        names.TIME_PER_EPOCH: ft.train.time_per_epoch_s,
        names.WALL_TIME: wall_time_s,
        names.STATIONARITY: ft.train.stationarity,
        names.LBFGS_STEPS: ft.train.lbfgs_steps,
    }


def laplace_metrics(result: dict) -> dict:
    """A layer-wise result's trial-level metrics: the MAP, the posterior with every block Bayesian
    (``bayes/...``, the subset ``all``), the baselines (``temp/...``, ``lla/...``), the subset with the
    largest VALIDATION Δ_ECE (selected on validation, never on test), λ, the timings, how the prior was
    anchored and the regime, and the robustness of the answer (flags as 0 / 1)."""
    every = {
        key.replace("subset/", "bayes/", 1): v
        for key, v in result["subsets"]["all"]["metrics"].items()
        if key.startswith("subset/")
        and key.count("/") == 2
        and not key.startswith(("subset/eval", "subset/lambda"))
    }
    baselines = {k: v for row in result.get("baselines", {}).values() for k, v in row["metrics"].items()}
    fitted = {k: v for k, v in result.get("protocol", {}).items() if v is not None}
    map_val = result["map"]["metrics"][names.score("map", "val", "ece")]
    val = names.score("subset", "val", "ece")
    best = max(result["subsets"], key=lambda name: map_val - result["subsets"][name]["metrics"][val])
    robust = {k: float(v) if isinstance(v, bool) else v for k, v in result.get("robustness", {}).items()}
    return {
        **result["map"]["metrics"],
        **every,
        **baselines,
        **fitted,
        names.BEST_SUBSET: best,
        **{key: result[key] for key in (names.PRIOR_PRECISION, names.FIT_TIME, names.EVAL_TIME)},
        **{key: result[key] for key in (names.PRIOR_ANCHOR, names.REGIME) if key in result},
        **robust,
    }


def record(ft: FineTuned, metrics: dict, status: str | None = None, message: str | None = None) -> dict:
    """The content of ``trial_result.json``."""
    return {
        "status": status or ft.train.status,
        "message": ft.train.message if message is None else message,
        "metrics": metrics,
        "history": ft.train.history,
        "config": ft.cfg.model_dump(mode="json"),
        "provenance": provenance(),
    }


def write_trial(ft: FineTuned, trial_record: dict, out: Path) -> None:
    """``config.yaml``, ``trial_result.json`` and (after a successful training) the peft ``adapter/``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / names.CONFIG_FILE).write_text(to_yaml(ft.cfg))
    (out / names.TRIAL_FILE).write_text(json.dumps(trial_record, indent=2))
    if ft.train.status == "ok":
        save_adapter(ft, out / ADAPTER_DIR)


def write_posterior(study: Study, out: Path) -> None:
    """``glm_posterior.safetensors``: the glm study's posterior of every block at its global λ, what an
    exported predictor needs (``python -m distlap.export``); nothing for the ``nn`` predictive."""
    if isinstance(study.predictive, GLMPredictive):
        n_blocks = num_blocks(study.predictive.model)
        glm_posterior.save(
            glm_posterior.from_predictive(study.predictive, n_blocks), out / names.POSTERIOR_FILE
        )


def check_subsets(ft: FineTuned) -> None:
    """The user's ``laplace.subsets`` name blocks the backbone has: a ValueError before any training."""
    layer_subsets(num_blocks(ft.model), ft.cfg.laplace.subsets)


def run_trial(cfg: TrialConfig, *, with_layerwise: bool = False, log=print) -> dict:
    """Fine-tune and evaluate one config (and the layer-wise study); write the files if ``output_dir``."""
    start = time.perf_counter()
    ft = prepare(cfg, log=log)
    if with_layerwise:
        check_subsets(ft)
    log(f"[distlap] {regime_note(cfg.train)}")
    ft = train(ft, log=log)
    metrics = {}
    if ft.train.status == "ok":
        metrics.update(map_metrics(ft))
        if with_layerwise:
            study = layerwise(ft, log=log)
            result = evaluate(ft, study, log=log)
            metrics.update(laplace_metrics(result))
            if cfg.output_dir:
                write_results(result, Path(cfg.output_dir))
                write_posterior(study, Path(cfg.output_dir))
    trial_record = record(ft, {**metrics, **costs(ft, time.perf_counter() - start)})
    if cfg.output_dir:
        write_trial(ft, trial_record, Path(cfg.output_dir))
    return trial_record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distlap.trial", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML config (default: the embedded default)")
    parser.add_argument("--output", type=Path, help="output folder (sets output_dir)")
    parser.add_argument(
        "--layerwise",
        action="store_true",
        help="after fine-tuning, fit Laplace once and evaluate every layer subset",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. peft.method=norm train.epochs=1"
    )
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"output_dir={args.output.resolve()}"] if args.output else [])
    try:
        cfg = load_config(args.config, overrides)
        trial_record = run_trial(
            cfg, with_layerwise=args.layerwise, log=lambda msg: print(msg, file=sys.stderr, flush=True)
        )
    except (ConfigError, DataError, BackboneError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"status": trial_record["status"], "message": trial_record["message"], **trial_record["metrics"]},
            indent=2,
        )
    )
    return 0 if trial_record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
