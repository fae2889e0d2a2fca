"""A prior precision lambda_S per block subset: validation grid search and the marginal likelihood.

(a) Grid (Laplace Redux, Daxberger et al. 2021, "gridsearch"): lambda_S = argmin_g NLL_val(p_S(lambda_g)),
    the probit GLM predictive of the restricted posterior of S, served for every lambda_g and every S by
    one Jacobian pass over the validation set (:func:`distlap.bayes.glm.glm_pass` with a grid).
(b) Marginal likelihood of the restricted posterior (MacKay 1992; laplace-torch's
    ``log_marginal_likelihood`` of a fit with only S trainable):
        log p(D | lambda) = -factor * loss(theta*) - 1/2 [ sum_k log(a_k + lambda) - P_S log lambda
                                                          + lambda ||theta*_S - theta0_S||^2 ],
    a_k the eigenvalues of factor * H_S (diag: factor h_p; kron: factor l1_i l2_j of each KFAC pair),
    factor = 1 / temperature. Its derivative in log lambda is -1/2 (lambda s - gamma(lambda)) with
    s = ||theta*_S - theta0_S||^2 and gamma(lambda) = sum_k a_k / (a_k + lambda) (MacKay's effective
    number of parameters): strictly decreasing, so the maximiser is the unique root of
    lambda s = gamma(lambda), found exactly by Brent's method in log lambda.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import brentq
from torch import Tensor

from distlap.bayes.glm import GLMPass, subset_metrics

# ------------------------------------------------------------------------------- (a) grid search


def grid_prior_precision(table: GLMPass, masks: Tensor) -> tuple[Tensor, Tensor]:
    """lambda_S minimising the validation NLL of the probit GLM predictive, for each mask (S, B).

    ``table`` is a validation pass with a lambda grid (G,). Returns lambda_S (S,) and the NLL curves
    (G, S); ties go to the first (smallest) grid point, as in laplace-torch's gridsearch.
    """
    if table.prior_precisions is None:
        raise ValueError("grid_prior_precision needs a glm_pass run with prior_precisions (a lambda grid)")
    nll = torch.stack(
        [
            subset_metrics(table.logits, table.at(g), table.labels, masks)["nll"]
            for g in range(len(table.prior_precisions))
        ]
    )  # (G, S)
    nll = torch.nan_to_num(nll, nan=math.inf)
    return table.prior_precisions[nll.argmin(0)], nll


# --------------------------------------------------------------------------- (b) marginal likelihood


@dataclass(frozen=True)
class BlockEvidence:
    """Per-block ingredients of the restricted posteriors' Laplace evidence, float64."""

    eigenvalues: list[Tensor]  # per block b: eigenvalues a_k of factor * H_b, (P_b,)
    sq_norms: Tensor  # (B,) ||theta*_b - theta0_b||^2
    log_likelihood: float  # log p(D | theta*) = -factor * loss, laplace-torch's ``log_likelihood``

    def collect(self, subset: Iterable[int]) -> tuple[Tensor, float]:
        subset = sorted(set(subset))
        if not subset:
            raise ValueError("the empty subset has no prior precision")
        return torch.cat([self.eigenvalues[b] for b in subset]), float(self.sq_norms[subset].sum())


def _tensor_eigenvalues(la) -> list[Tensor]:
    """Eigenvalues of factor * H per parameter tensor of ``la``, in its flat order."""
    if type(la).__name__.startswith("Diag"):
        return list((la._H_factor * la.H).double().split([p.numel() for p in la.params]))
    if getattr(la, "damping", False):
        raise ValueError("damped KFAC has no closed-form evidence in lambda; fit with damping=False")
    decomposed = la.H * la._H_factor  # KronDecomposed, as laplace-torch's logdet uses
    return [
        (torch.outer(ls[0], ls[1]).flatten() if len(ls) == 2 else ls[0]).double()
        for ls in decomposed.eigenvalues
    ]


def block_evidence(la, blocks: Sequence[int]) -> BlockEvidence:
    """The evidence terms of a fitted DiagLaplace / KronLaplace, grouped by the block of each tensor.

    Uses ``la.mean`` (theta*), ``la.prior_mean`` (scalar or per parameter), ``la._H_factor`` (1 /
    temperature) and ``la.loss``, exactly as laplace-torch's ``log_marginal_likelihood`` does.
    """
    eig = _tensor_eigenvalues(la)
    delta = (la.mean - la.prior_mean).double().expand(la.n_params)  # (P,)
    sq = [d.pow(2).sum() for d in delta.split([p.numel() for p in la.params])]
    n_blocks = max(blocks) + 1
    per_block = [[] for _ in range(n_blocks)]
    norms = torch.zeros(n_blocks, dtype=torch.float64)
    for b, e, s in zip(blocks, eig, sq, strict=True):
        per_block[b].append(e)
        norms[b] += s
    eigenvalues = [torch.cat(e) if e else torch.zeros(0, dtype=torch.float64) for e in per_block]
    return BlockEvidence(eigenvalues, norms, float(la.log_likelihood))


def log_marginal_likelihood(evidence: BlockEvidence, subset: Iterable[int], prior_precision: float) -> float:
    """log p(D | lambda) of the restricted posterior of ``subset`` (module docstring, formula (b))."""
    a, s = evidence.collect(subset)
    lam = float(prior_precision)
    log_det_ratio = torch.log(a + lam).sum().item() - a.numel() * math.log(lam)
    return evidence.log_likelihood - 0.5 * (log_det_ratio + lam * s)


def marglik_prior_precision(
    evidence: BlockEvidence, subset: Iterable[int], low: float = 1e-12, high: float = 1e12
) -> float:
    """The exact maximiser over scalar lambda > 0 of :func:`log_marginal_likelihood`: the root of
    lambda s - gamma(lambda) (increasing in lambda) in [low, high], by Brent's method in log lambda."""
    a, s = evidence.collect(subset)

    def slope(t: float) -> float:  # lambda s - gamma(lambda) at lambda = e^t
        lam = math.exp(t)
        return lam * s - (a / (a + lam)).sum().item()

    lo, hi = math.log(low), math.log(high)
    if slope(lo) >= 0 or slope(hi) <= 0:
        raise ValueError(
            f"the evidence has no maximum in lambda in [{low:g}, {high:g}] (||theta*-theta0||^2 "
            f"= {s:g}, effective parameters {(a / (a + 1)).sum().item():g} at lambda=1)"
        )
    return math.exp(brentq(slope, lo, hi, xtol=1e-14, rtol=1e-14, maxiter=500))
