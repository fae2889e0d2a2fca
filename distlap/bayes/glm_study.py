"""The layer-wise study with the linearised (GLM, probit) predictive, from one Jacobian pass per split.

One pass over validation, for a grid of prior precisions, gives the MAP logits and every block's logit
variances (:func:`distlap.bayes.glm.glm_pass`); from it come the global λ (``laplace.prior_method``)
and each subset's own λ_S (validation NLL over the grid; the closed-form marginal likelihood is
recorded beside it, :mod:`distlap.bayes.prior`). One pass over test, at the global λ and every λ_S,
then gives each named subset's row at the global λ (``subset/...``) and at its own (``subset_tuned/...``),
the MAP's row from the same logits in the same precision, and the attribution of Δ_ECE and Δ_NLL to
the blocks over all 2^L coalitions (:mod:`distlap.bayes.attribution`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distlap import names
from distlap.bayes.attribution import attribution
from distlap.bayes.evaluate import Reference, deltas, split_scores, subset_row
from distlap.bayes.glm import GLMPass, glm_pass, param_blocks, probit_probs
from distlap.bayes.posterior import GRID
from distlap.bayes.predictors import GLMPredictive
from distlap.bayes.prior import block_evidence, grid_prior_precision, marglik_prior_precision

SubsetMap = dict[str, tuple[int, ...]]


@dataclass
class Lambdas:
    """The global λ and, per subset, λ_S chosen on validation and by the marginal likelihood."""

    global_: float
    validation: dict[str, float]
    marglik: dict[str, float | None]


def masks_of(subsets: SubsetMap, n_blocks: int) -> Tensor:
    """(S, B) bool: row s marks the blocks of the s-th subset."""
    masks = torch.zeros(len(subsets), n_blocks, dtype=torch.bool)
    for row, blocks in enumerate(subsets.values()):
        masks[row, list(blocks)] = True
    return masks


def choose_lambdas(
    la, blocks: list[int], val: GLMPass, subsets: SubsetMap, method: str, fixed: float
) -> Lambdas:
    """The global λ (``fixed``, or for the 'all' posterior: validation grid / marglik) and each subset's."""
    n_blocks = val.variances.shape[2]
    per_subset, _ = grid_prior_precision(val, masks_of(subsets, n_blocks))
    every = masks_of({"all": tuple(range(n_blocks))}, n_blocks)
    evidence = block_evidence(la, blocks)
    glob = {
        "fixed": lambda: fixed,
        "gridsearch": lambda: float(grid_prior_precision(val, every)[0][0]),
        "marglik": lambda: marglik_prior_precision(evidence, range(n_blocks)),
    }[method]()
    return Lambdas(
        glob, dict(zip(subsets, per_subset.tolist())), {s: _marglik(evidence, b) for s, b in subsets.items()}
    )


def _marglik(evidence, subset) -> float | None:
    try:
        return marglik_prior_precision(evidence, subset)
    except ValueError:  # theta*_S = theta0_S: the evidence grows without bound in lambda
        return None


def glm_study(data, cfg, la, subsets: SubsetMap, scoring, prior_precision: float, log) -> dict:
    """Every named subset's row, the MAP reference and the attribution (module docstring)."""
    blocks = param_blocks(data.model, la)
    grid = torch.cat([GRID, torch.tensor([prior_precision])])
    val = glm_pass(data.model, la, blocks, data.val, data.device, grid)
    lambdas = choose_lambdas(la, blocks, val, subsets, cfg.prior_method, prior_precision)
    test = glm_pass(
        data.model,
        la,
        blocks,
        data.test,
        data.device,
        sorted({lambdas.global_, *lambdas.validation.values()}),
    )
    ref = Reference(val.logits.softmax(-1), test.logits.softmax(-1), val.labels, test.labels)
    rows = {name: _row(subset, val, test, lambdas, name, ref, scoring) for name, subset in subsets.items()}
    n_blocks = test.variances.shape[2]
    log(
        f"[distlap] glm: global lambda {lambdas.global_:g} ({cfg.prior_method}); attribution over "
        f"{2**n_blocks if n_blocks <= 16 else 'sampled'} coalitions"
    )
    g = _index(test.prior_precisions, lambdas.global_)
    attrib = attribution(
        test.logits,
        test.at(g),
        test.labels,
        n_bins=scoring.n_bins,
        n_bootstrap=cfg.shapley_bootstrap,
        n_permutations=cfg.shapley_permutations,
        seed=scoring.seed,
    )
    predictive = GLMPredictive(data.model, la, blocks, lambdas.global_, data.device)
    return {
        "rows": rows,
        "reference": ref,
        "prior_precision": lambdas.global_,
        "attribution": attrib,
        "predictive": predictive,
    }


def _row(subset, val: GLMPass, test: GLMPass, lambdas: Lambdas, name: str, ref: Reference, scoring) -> dict:
    """A subset's row at the global λ, with its own λ_S's scores (``subset_tuned/...``) and both λ_S."""
    at = lambda table, lam: table.at(_index(table.prior_precisions, lam))
    row = subset_row(
        subset,
        probit_probs(val.logits, at(val, lambdas.global_), subset),
        probit_probs(test.logits, at(test, lambdas.global_), subset),
        ref,
        **_kw(scoring),
    )
    own = probit_probs(test.logits, at(test, lambdas.validation[name]), subset)
    row["metrics"] |= _tuned(own, ref, scoring.n_bins) | {
        names.SUBSET_LAMBDA_VAL: lambdas.validation[name],
        names.SUBSET_LAMBDA_MARGLIK: lambdas.marglik[name],
    }
    return row


def _kw(scoring) -> dict:
    return dict(n_bins=scoring.n_bins, n_bootstrap=scoring.n_bootstrap, seed=scoring.seed)


def _tuned(probs: Tensor, ref: Reference, n_bins: int) -> dict[str, float]:
    """``subset_tuned/test/<score>`` and its deltas: the subset at its own validation-chosen λ_S."""
    scores = split_scores("subset", "test", probs, ref.test_labels, n_bins)
    moved = {**scores, **deltas(scores, ref, n_bins)}
    return {key.replace("subset/", "subset_tuned/", 1): v for key, v in moved.items()}


def _index(grid: Tensor, value: float) -> int:
    """Position of ``value`` in a pass's λ grid (it was put there)."""
    return int(torch.argmin((grid.double() - value).abs()))
