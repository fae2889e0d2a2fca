"""The layer-wise study with the linearised (GLM, probit) predictive, from one Jacobian pass per split.

One pass over validation, for a grid of prior precisions, gives the MAP logits and every block's logit
variances (:func:`distlap.bayes.glm.glm_pass`); from it come each subset's own λ_S (validation NLL over
the grid; the closed-form marginal likelihood is recorded beside it, :mod:`distlap.bayes.prior`) and,
with ``laplace.prior_method=gridsearch``, the global λ. A global λ that needs only the fit (``fixed``;
``marglik``, the exact maximiser of the 'all' posterior's evidence) is computed BEFORE that pass and
evaluated in it, so that the validation rows (and ``bayes/val/*``, a sweep's objective) are scored at
exactly the chosen λ, never at a grid point near it; a λ is looked up in a pass exactly, or not at all.
One pass over test, at the global λ and every λ_S, then gives each named subset's row at the global λ
(``subset/...``) and at its own (``subset_tuned/...``), the MAP's row from the same logits in the same
precision, and the attribution of Δ_ECE and Δ_NLL to the blocks over all 2^L coalitions
(:mod:`distlap.bayes.attribution`; its best sets are chosen on the validation pass at the global λ and
reported on test).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distlap import names
from distlap.bayes.attribution import Split, attribution
from distlap.bayes.evaluate import Reference, deltas, split_scores, subset_row
from distlap.bayes.glm import GLMPass, PassRunner, glm_pass, param_blocks, probit_probs
from distlap.bayes.posterior import GRID
from distlap.bayes.predictors import GLMPredictive
from distlap.bayes.prior import (
    BlockEvidence,
    block_evidence,
    grid_prior_precision,
    marglik_prior_precision,
)

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


def candidates(fixed: float) -> Tensor:
    """The λ a validation grid search chooses from: :data:`GRID` and the MAP's own λ (``fixed``)."""
    return torch.cat([GRID, torch.tensor([float(fixed)])])


def global_lambda(evidence: BlockEvidence, method: str, fixed: float, n_blocks: int) -> float | None:
    """The global λ where it needs only the fit: ``fixed``, or ``marglik`` (the exact maximiser of the
    evidence of the 'all' posterior); None for ``gridsearch``, which the validation pass chooses."""
    if method == "fixed":
        return float(fixed)
    if method == "marglik":
        return marglik_prior_precision(evidence, range(n_blocks))
    if method == "gridsearch":
        return None
    raise ValueError(f"laplace.prior_method must be fixed, marglik or gridsearch, got {method!r}")


def choose_lambdas(
    evidence: BlockEvidence, grid: GLMPass, subsets: SubsetMap, chosen: float | None
) -> Lambdas:
    """Each subset's λ_S (validation NLL over ``grid``, a validation pass over :func:`candidates` only)
    and marglik λ_S; the global λ is ``chosen`` (:func:`global_lambda`) or, when None, the grid's choice
    for the 'all' posterior."""
    n_blocks = grid.variances.shape[2]
    per_subset, _ = grid_prior_precision(grid, masks_of(subsets, n_blocks))
    if chosen is None:
        every = masks_of({"all": tuple(range(n_blocks))}, n_blocks)
        chosen = float(grid_prior_precision(grid, every)[0][0])
    return Lambdas(
        chosen,
        dict(zip(subsets, per_subset.tolist())),
        {s: _marglik(evidence, b) for s, b in subsets.items()},
    )


def _marglik(evidence, subset) -> float | None:
    try:
        return marglik_prior_precision(evidence, subset)
    except ValueError:  # theta*_S = theta0_S: the evidence grows without bound in lambda
        return None


def glm_study(
    data, cfg, la, subsets: SubsetMap, scoring, prior_precision: float, log, run: PassRunner | None = None
) -> dict:
    """Every named subset's row, the MAP reference and the attribution (module docstring); ``run``
    passes the data of each Jacobian pass (None: in this process, :func:`distlap.bayes.glm.run_pass`)."""
    blocks = param_blocks(data.model, la)
    val, test, lambdas = _passes(data, cfg, la, blocks, subsets, prior_precision, run)
    ref = Reference(val.logits.softmax(-1), test.logits.softmax(-1), val.labels, test.labels)
    rows = {name: _row(subset, val, test, lambdas, name, ref, scoring) for name, subset in subsets.items()}
    n_blocks = test.variances.shape[2]
    log(
        f"[distlap] glm: global lambda {lambdas.global_:g} ({cfg.prior_method}); attribution over "
        f"{2**n_blocks if n_blocks <= 16 else 'sampled'} coalitions, best sets chosen on validation"
    )
    attrib = attribution(
        _split(test, lambdas.global_),
        _split(val, lambdas.global_),
        n_bins=scoring.n_bins,
        n_bootstrap=cfg.shapley_bootstrap,
        n_permutations=cfg.shapley_permutations,
        seed=scoring.seed,
    )
    predictive = GLMPredictive(data.model, la, blocks, lambdas.global_, data.device, run)
    return {
        "rows": rows,
        "reference": ref,
        "prior_precision": lambdas.global_,
        "attribution": attrib,
        "predictive": predictive,
    }


def _passes(data, cfg, la, blocks, subsets: SubsetMap, prior_precision: float, run: PassRunner | None):
    """(validation pass, test pass, λs): the validation pass over :func:`candidates` and the global λ
    when it is known beforehand (exactly that λ, not a grid point near it); the test pass over the
    global λ and every λ_S."""
    evidence = block_evidence(la, blocks)
    chosen = global_lambda(evidence, cfg.prior_method, prior_precision, max(blocks) + 1)
    grid = candidates(prior_precision)
    extra = torch.tensor([] if chosen is None else [chosen], dtype=grid.dtype)
    val = glm_pass(data.model, la, blocks, data.val, data.device, torch.cat([grid, extra]), run)
    lambdas = choose_lambdas(evidence, _first(val, len(grid)), subsets, chosen)
    test = glm_pass(
        data.model,
        la,
        blocks,
        data.test,
        data.device,
        sorted({lambdas.global_, *lambdas.validation.values()}),
        run,
    )
    return val, test, lambdas


def _first(table: GLMPass, n: int) -> GLMPass:
    """The pass restricted to its first ``n`` grid points (the candidates a grid search may choose)."""
    return GLMPass(table.logits, table.variances[:n], table.labels, table.prior_precisions[:n])


def _split(table: GLMPass, lam: float) -> Split:
    return Split(table.logits, _at(table, lam), table.labels)


def _at(table: GLMPass, lam: float) -> Tensor:
    """Per-block variances (N, B, C) of ``table`` at exactly ``lam``."""
    return table.at(lambda_index(table.prior_precisions, lam))


def _row(subset, val: GLMPass, test: GLMPass, lambdas: Lambdas, name: str, ref: Reference, scoring) -> dict:
    """A subset's row at the global λ, with its own λ_S's scores (``subset_tuned/...``) and both λ_S."""
    row = subset_row(
        subset,
        probit_probs(val.logits, _at(val, lambdas.global_), subset),
        probit_probs(test.logits, _at(test, lambdas.global_), subset),
        ref,
        **_kw(scoring),
    )
    own = probit_probs(test.logits, _at(test, lambdas.validation[name]), subset)
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


def lambda_index(grid: Tensor, value: float) -> int:
    """Position of exactly ``value`` in a pass's λ grid (compared in the grid's dtype, fp32: the λ the
    pass evaluated); a λ the pass did not evaluate is an error, never its nearest grid point."""
    hits = torch.nonzero(grid == torch.tensor(float(value), dtype=grid.dtype)).flatten()
    if len(hits) == 0:
        raise ValueError(f"lambda {value:g} was not evaluated by this pass (its grid: {grid.tolist()})")
    return int(hits[0])
