"""The layer-wise Laplace study of one fine-tuned model, as a pipeline of named steps.

:func:`run_layerwise`: the layer subsets (``layer_0 .. layer_{L-1}``, ``early`` / ``mid`` / ``late``,
``all`` and the user's) -> one Laplace fit over the tuned block parameters, centred on the MAP's own
prior -> with the ``glm`` predictive (default) one Jacobian pass per split serves every subset at the
global and at its own λ, every coalition of blocks and their Shapley values
(:mod:`distlap.bayes.glm_study`); with ``nn``, K posterior samples per subset, one subset after another
here or by the ``evaluate_nn`` function the caller passes (the sweep fans them out as Ray tasks) -> the
result (``layer_wise_results.json``, :func:`write_results`, with reliability diagrams).

This wing knows nothing of Ray and nothing of how the model was trained: it gets the model, its
loaders and its prior (:class:`LaplaceData`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from distlap import metrics, names
from distlap.bayes.evaluate import Reference, map_row, row_line, subset_row
from distlap.bayes.glm import PassRunner
from distlap.bayes.glm_study import glm_study
from distlap.bayes.layers import block_index, layer_subsets, num_blocks
from distlap.bayes.posterior import (
    Posterior,
    choose_prior_precision,
    fit_laplace,
    param_blocks,
    posterior_parameters,
    sample_posterior,
)
from distlap.bayes.predictive import ViTSuffix, nn_predictive
from distlap.bayes.predictors import GLMPredictive, NNPredictive
from distlap.config import LaplaceConfig
from distlap.plots import reliability_diagram
from distlap.runtime import Timer, predict

Subsets = dict[str, tuple[int, ...]]
# (posterior, subsets, reference) -> (subset, row) pairs as they finish: how nn subsets are evaluated
NNEvaluator = Callable[[Posterior, Subsets, Reference], Iterable[tuple[str, dict]]]


@dataclass
class LaplaceData:
    """What the Laplace stage takes from fine-tuning: the model and its loaders."""

    model: nn.Module  # pixel_values -> logits; the tuned parameters have requires_grad
    method: str  # the PEFT method: which tuned parameters the posterior may cover
    fit: DataLoader  # the curvature's examples (a seeded subset of the training split)
    val: DataLoader
    test: DataLoader
    n_train: int  # N, the MAP's training examples: the curvature is scaled to stand for N
    device: torch.device
    prior_mean: dict[str, torch.Tensor] | None = None  # θ₀ by parameter name (the MAP's prior); None = 0


@dataclass
class Study:
    """A layer-wise study: its JSON-able ``result``, the fitted ``predictive`` (the MAP and every subset
    on further data: shift, OOD) and the ``subsets`` it evaluated."""

    result: dict
    predictive: GLMPredictive | NNPredictive
    subsets: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Scoring:
    """How a subset's row is scored: calibration bins, bootstrap resamples and their seed (the test set's,
    :func:`distlap.intervals.bootstrap_seed`, so that seeds sharing a test set resample alike), and the
    seed of the nn predictive's posterior samples (None: ``seed``)."""

    n_bins: int
    n_bootstrap: int
    seed: int
    sample_seed: int | None = None


def run_layerwise(
    data: LaplaceData,
    cfg: LaplaceConfig,
    *,
    prior_precision: float,
    scoring: Scoring,
    only: Sequence[str] | None = None,
    evaluate_nn: NNEvaluator | None = None,
    run_glm: PassRunner | None = None,
    fitted: dict | None = None,
    on_fit: Callable[[dict], None] | None = None,
    log=print,
) -> Study:
    """Fit once, evaluate every subset (or ``only`` these); the result dict is ``Study.result``.

    ``evaluate_nn`` evaluates nn subsets, ``run_glm`` passes the data of each glm Jacobian pass (both
    None: in this process; the sweep hands in Ray tasks). ``on_fit(state)`` receives the fit's
    laplace-torch ``state_dict`` (a checkpoint); ``fitted`` is such a state, loaded instead of fitting
    again (a restarted trial)."""
    subsets = select_subsets(num_blocks(data.model), cfg.subsets, only)
    la, fit_s = fit_once(data, cfg, prior_precision, log, fitted)
    if on_fit is not None and fitted is None:
        on_fit(la.state_dict())
    with Timer() as t:
        if cfg.predictive == "glm":
            study = glm_study(data, cfg, la, subsets, scoring, prior_precision, log, run_glm)
        else:
            study = nn_study(data, cfg, la, subsets, scoring, prior_precision, evaluate_nn)
        rows = {}
        for name, row in study.pop("pairs", None) or study["rows"].items():
            rows[name] = row
            log(f"[distlap]   {row_line(name, row)}")
    study["rows"] = {name: rows[name] for name in subsets}  # the subsets' order, however they finished
    return Study(
        result(data, cfg, la, study, scoring.n_bins, fit_s=fit_s, eval_s=t.seconds),
        study["predictive"],
        subsets,
    )


def fit_once(data: LaplaceData, cfg: LaplaceConfig, prior_precision: float, log, fitted=None) -> tuple:
    """One laplace-torch fit over the tuned block parameters (or the ``fitted`` state loaded): (the
    fitted object, seconds)."""
    names_ = posterior_parameters(data.model, data.method, cfg.include_norms)
    log(
        f"[distlap] fitting {cfg.hessian_structure} Laplace ({cfg.curvature}, {cfg.estimator}) on "
        f"{len(data.fit.dataset)} training examples"
    )
    start = time.perf_counter()
    la = fit_laplace(
        data.model, names_, data.fit, cfg, prior_precision, data.n_train, data.prior_mean, fitted
    )
    fit_s = time.perf_counter() - start
    log(f"[distlap] posterior over {la.n_params:,} parameters, fit {fit_s:.1f}s")
    return la, fit_s


def map_reference(data: LaplaceData) -> Reference:
    """The MAP's probabilities on validation and test (the nn path: same autocast as its samples)."""
    val_probs, val_labels = predict(data.model, data.val, data.device)
    test_probs, test_labels = predict(data.model, data.test, data.device)
    return Reference(val_probs, test_probs, val_labels, test_labels)


def nn_study(data, cfg, la, subsets, scoring, prior_precision, evaluate_nn) -> dict:
    """K posterior samples shared by every subset; each subset's nn predictive (serially, or by
    ``evaluate_nn``), against the MAP's own predictive."""
    ref = map_reference(data)
    names_ = posterior_parameters(data.model, data.method, cfg.include_norms)
    params = param_blocks(data.model, names_, la.n_params)
    every = tuple(range(num_blocks(data.model)))

    def draw(lam: float) -> Posterior:
        seed = scoring.seed if scoring.sample_seed is None else scoring.sample_seed
        return sample_posterior(la, params, cfg, prior_precision=lam, seed=seed)

    def val_nll(post: Posterior) -> float:  # gridsearch scorer: the 'all' posterior on validation
        return metrics.negative_log_likelihood(
            nn_predictive(data.model, post, every, data.val, data.device)[0].mean(0), ref.val_labels
        )

    posterior = draw(choose_prior_precision(la, cfg.prior_method, prior_precision, draw, val_nll))
    pairs = (evaluate_nn or serial_nn(data, scoring))(posterior, subsets, ref)
    return {
        "pairs": pairs,
        "reference": ref,
        "prior_precision": posterior.prior_precision,
        "predictive": NNPredictive(data.model, posterior, data.device),
    }


def select_subsets(n_blocks: int, extra: dict[str, list[int]], only: Sequence[str] | None) -> Subsets:
    """Every subset of :func:`~distlap.bayes.layers.layer_subsets`, or just those named in ``only``."""
    subsets = layer_subsets(n_blocks, extra)
    if only is None:
        return subsets
    unknown = set(only) - set(subsets)
    if unknown:
        raise ValueError(f"no layer subsets named {sorted(unknown)}; the model has {sorted(subsets)}")
    return {name: subsets[name] for name in only}


def evaluate_nn_subset(
    model: nn.Module,
    posterior: Posterior,
    blocks: Sequence[int],
    val: DataLoader,
    test: DataLoader,
    ref: Reference,
    device: torch.device,
    scoring: Scoring,
) -> dict:
    """Restricted posterior of ``blocks`` -> the subset's row (``nn`` predictive), with its seconds."""
    with Timer() as t:
        x0 = next(iter(val))[0][:2].to(device)
        runner = ViTSuffix.try_build(model.eval().to(device), x0)  # None: a full forward per sample
        val_probs, _ = nn_predictive(model, posterior, blocks, val, device, runner)
        test_probs, _ = nn_predictive(model, posterior, blocks, test, device, runner)
        row = subset_row(
            blocks,
            val_probs,
            test_probs,
            ref,
            n_bins=scoring.n_bins,
            n_bootstrap=scoring.n_bootstrap,
            seed=scoring.seed,
        )
    row["metrics"][names.SUBSET_TIME] = t.seconds
    return row


def serial_nn(data: LaplaceData, scoring: Scoring) -> NNEvaluator:
    """The in-process :data:`NNEvaluator`: the subsets one after another."""

    def evaluate(posterior: Posterior, subsets: Subsets, ref: Reference) -> Iterator[tuple[str, dict]]:
        for name, blocks in subsets.items():
            yield (
                name,
                evaluate_nn_subset(
                    data.model, posterior, blocks, data.val, data.test, ref, data.device, scoring
                ),
            )

    return evaluate


def result(
    data: LaplaceData, cfg: LaplaceConfig, la, study: dict, n_bins: int, *, fit_s: float, eval_s: float
) -> dict:
    """``layer_wise_results.json``: how the posterior was made (``laplace/...`` keys), the MAP's row,
    every subset's row, and (glm) the attribution of Δ_ECE and Δ_NLL to the blocks."""
    out = {
        names.PRIOR_PRECISION: study["prior_precision"],
        names.PRIOR_METHOD: cfg.prior_method,
        names.HESSIAN: cfg.hessian_structure,
        names.BACKEND: cfg.curvature,
        names.ESTIMATOR: cfg.estimator,
        names.MC_SAMPLES: cfg.mc_samples if cfg.estimator == "mc" else None,
        names.PREDICTIVE: cfg.predictive,
        names.N_SAMPLES: cfg.n_samples if cfg.predictive == "nn" else None,
        names.N_SAMPLE_SETS: cfg.n_sample_sets if cfg.predictive == "nn" else None,
        names.BLOCK_UPDATE: block_updates(data, cfg),
        names.N_PARAMS: la.n_params,
        names.N_BLOCKS: num_blocks(data.model),
        names.FIT_EXAMPLES: len(data.fit.dataset),
        names.FIT_TIME: fit_s,
        names.EVAL_TIME: eval_s,
        "map": map_row(study["reference"], n_bins),
        "subsets": study["rows"],
    }
    if "attribution" in study:
        out["attribution"] = study["attribution"]
    return out


def block_updates(data: LaplaceData, cfg: LaplaceConfig) -> list[float]:
    """‖θ*_b − θ₀_b‖ over the posterior's parameters of each block b. A Gaussian prior on LoRA factors
    is a nuclear-norm penalty on their product (‖A‖² + ‖B‖² ≥ 2‖BA‖_*), so the MAP can switch whole
    blocks off (A = B = 0); there the network's Jacobian in A and B vanishes and the linearised
    posterior of the block changes nothing, whatever its variance."""
    named = dict(data.model.named_parameters())
    out = [0.0] * num_blocks(data.model)
    for name in posterior_parameters(data.model, data.method, cfg.include_norms):
        theta = named[name].detach().float().cpu()
        mean = (data.prior_mean or {}).get(name)
        out[block_index(name)] += float(((theta - (0 if mean is None else mean.float().cpu())) ** 2).sum())
    return [v**0.5 for v in out]


def write_results(result: dict, out: Path) -> None:
    """``layer_wise_results.json`` and ``plots/reliability_{map,<subset>}.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / names.LAYERWISE_FILE).write_text(json.dumps(result, indent=2))
    plots = out / "plots"
    test_ece = names.score("map", "test", "ece")
    reliability_diagram(
        result["map"]["reliability"], "MAP", plots / "reliability_map.png", result["map"]["metrics"][test_ece]
    )
    for name, row in result["subsets"].items():
        reliability_diagram(
            row["reliability"],
            f"Laplace on {name}",
            plots / f"reliability_{name}.png",
            row["metrics"][names.score("subset", "test", "ece")],
        )
