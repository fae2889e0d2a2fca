"""The layer-wise Laplace study of one fine-tuned model, as a pipeline of named steps.

:func:`run_layerwise`: the MAP reference on validation and test -> the layer subsets
(``layer_0 .. layer_{L-1}``, ``early`` / ``mid`` / ``late``, ``all`` and the user's) -> one Laplace fit
over the tuned block parameters -> every subset's restricted posterior evaluated against the MAP ->
the result (``layer_wise_results.json``, :func:`write_results`, with reliability diagrams).

This wing knows nothing of Ray: the ``nn`` subsets are evaluated one after another here, or by the
``evaluate_nn`` function the caller passes (the sweep fans them out as Ray tasks; the numbers are
identical because each subset is a pure function of the model, the posterior and the data).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from distlap import metrics, names
from distlap.bayes.evaluate import Reference, map_row, row_line, subset_row
from distlap.bayes.layers import layer_subsets, num_blocks
from distlap.bayes.posterior import Posterior, build_posterior
from distlap.bayes.predictive import ViTSuffix, glm_predictive, nn_predictive
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


@dataclass(frozen=True)
class Scoring:
    """How a subset's row is scored: calibration bins, bootstrap resamples, their seed."""

    n_bins: int
    n_bootstrap: int
    seed: int


def run_layerwise(
    data: LaplaceData,
    cfg: LaplaceConfig,
    *,
    prior_precision: float,
    scoring: Scoring,
    only: Sequence[str] | None = None,
    evaluate_nn: NNEvaluator | None = None,
    log=print,
) -> dict:
    """Fit once, evaluate every subset (or ``only`` these), return the result dict (see the README)."""
    ref = map_reference(data)
    subsets = select_subsets(num_blocks(data.model), cfg.subsets, only)
    posterior = fit_posterior(data, cfg, prior_precision, scoring.seed, ref, log)
    rows = {}
    with Timer() as t:
        if cfg.predictive == "glm":
            pairs = glm_rows(data, posterior, subsets, ref, cfg.link_approx, scoring)
        else:
            pairs = (evaluate_nn or serial_nn(data, scoring))(posterior, subsets, ref)
        for name, row in pairs:
            rows[name] = row
            log(f"[distlap]   {row_line(name, row)}")
    rows = {name: rows[name] for name in subsets}  # the subsets' order, whatever order they finished in
    return result(data, cfg, posterior, ref, rows, scoring.n_bins, eval_s=t.seconds)


def map_reference(data: LaplaceData) -> Reference:
    """The MAP's probabilities on validation and test: what every subset is compared with."""
    val_probs, val_labels = predict(data.model, data.val, data.device)
    test_probs, test_labels = predict(data.model, data.test, data.device)
    return Reference(val_probs, test_probs, val_labels, test_labels)


def select_subsets(n_blocks: int, extra: dict[str, list[int]], only: Sequence[str] | None) -> Subsets:
    """Every subset of :func:`~distlap.bayes.layers.layer_subsets`, or just those named in ``only``."""
    subsets = layer_subsets(n_blocks, extra)
    if only is None:
        return subsets
    unknown = set(only) - set(subsets)
    if unknown:
        raise ValueError(f"no layer subsets named {sorted(unknown)}; the model has {sorted(subsets)}")
    return {name: subsets[name] for name in only}


def fit_posterior(
    data: LaplaceData, cfg: LaplaceConfig, prior_precision: float, seed: int, ref: Reference, log
) -> Posterior:
    """One Laplace fit over the tuned block parameters; λ as ``cfg.prior_method`` says."""
    every = tuple(range(num_blocks(data.model)))

    def val_nll(post: Posterior) -> float:  # gridsearch scorer: the 'all' posterior on validation
        if cfg.predictive == "glm":
            probs = glm_predictive(data.model, post, {"all": every}, data.val, data.device, cfg.link_approx)[
                0
            ]["all"]
        else:
            probs = nn_predictive(data.model, post, every, data.val, data.device, None)[0]
        return metrics.negative_log_likelihood(probs, ref.val_labels)

    log(
        f"[distlap] fitting {cfg.hessian_structure} Laplace ({cfg.curvature}) on "
        f"{len(data.fit.dataset)} training examples"
    )
    posterior = build_posterior(
        data.model,
        data.method,
        data.fit,
        cfg,
        prior_precision=prior_precision,
        seed=seed,
        n_train=data.n_train,
        val_nll=val_nll,
    )
    log(
        f"[distlap] posterior over {posterior.n_params:,} parameters, prior precision "
        f"{posterior.prior_precision:g} ({posterior.prior_method}), fit {posterior.fit_s:.1f}s"
    )
    return posterior


def glm_rows(
    data: LaplaceData,
    posterior: Posterior,
    subsets: Subsets,
    ref: Reference,
    link_approx: str,
    scoring: Scoring,
) -> Iterator[tuple[str, dict]]:
    """GLM: one Jacobian pass per batch serves every subset, in this process."""
    val, _ = glm_predictive(data.model, posterior, subsets, data.val, data.device, link_approx)
    test, _ = glm_predictive(data.model, posterior, subsets, data.test, data.device, link_approx)
    kw = dict(n_bins=scoring.n_bins, n_bootstrap=scoring.n_bootstrap, seed=scoring.seed)
    for name, blocks in subsets.items():
        yield name, subset_row(blocks, val[name], test[name], ref, **kw)


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
    data: LaplaceData,
    cfg: LaplaceConfig,
    posterior: Posterior,
    ref: Reference,
    rows: dict[str, dict],
    n_bins: int,
    *,
    eval_s: float,
) -> dict:
    """``layer_wise_results.json``: how the posterior was made (``laplace/...`` keys), the MAP's row,
    every subset's row, and the seconds of the fit and of the evaluation."""
    return {
        names.PRIOR_PRECISION: posterior.prior_precision,
        names.PRIOR_METHOD: posterior.prior_method,
        names.HESSIAN: cfg.hessian_structure,
        names.BACKEND: cfg.curvature,
        names.PREDICTIVE: cfg.predictive,
        names.LINK: cfg.link_approx if cfg.predictive == "glm" else None,
        names.N_SAMPLES: cfg.n_samples,
        names.N_PARAMS: posterior.n_params,
        names.N_BLOCKS: num_blocks(data.model),
        names.FIT_EXAMPLES: posterior.fit_examples,
        names.FIT_TIME: posterior.fit_s,
        names.EVAL_TIME: eval_s,
        "map": map_row(ref, n_bins),
        "subsets": rows,
    }


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
