"""Which of many subsets are distinguishable from 0 and from each other: bootstrap p-values, Holm's
step-down adjustment (Holm 1979), simultaneous max-|t| or Bonferroni intervals and pairwise differences
Δ_S − Δ_T, all from the same :class:`~distlap.intervals.Replicates` (paired across subsets)."""

from __future__ import annotations

import torch
from torch import Tensor

from distlap.intervals import Replicates, check_level, percentile_interval


def bootstrap_p_values(replicates: Tensor) -> Tensor:
    """Two-sided bootstrap p-value for Delta != 0 per row of (S, R), by inverting the percentile interval:

        p = min(1, 2 min(1 + #{Delta*_r <= 0}, 1 + #{Delta*_r >= 0}) / (R + 1)),

    so p < alpha (about) iff 0 lies outside the equal-tailed (1 - alpha) percentile interval; the +1
    (the Monte-Carlo p-value of Davison & Hinkley 1997, ch. 4) keeps p >= 2 / (R + 1) > 0. All-zero
    replicates give p = 1.
    """
    x = torch.as_tensor(replicates, dtype=torch.float64)
    x = x[None] if x.ndim == 1 else x
    r = x.shape[1]
    below, above = (x <= 0).sum(1), (x >= 0).sum(1)
    return (2 * (torch.minimum(below, above) + 1).double() / (r + 1)).clamp(max=1.0)


def holm(p_values: Tensor) -> Tensor:
    """Holm's (1979) step-down adjusted p-values: with p_(1) <= ... <= p_(m),

        p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)),

    returned in the input order. Rejecting p~ <= alpha controls the family-wise error rate at alpha
    under any dependence (Holm = the closed testing of Bonferroni tests).
    """
    p = torch.as_tensor(p_values, dtype=torch.float64)
    if p.ndim != 1 or p.numel() == 0 or not ((p >= 0) & (p <= 1)).all():
        raise ValueError(f"p_values must be a non-empty 1-D tensor with entries in [0, 1], got {p.tolist()}")
    m = p.numel()
    order = p.argsort(stable=True)
    scaled = ((m - torch.arange(m)) * p[order]).clamp(max=1.0)  # (m - j + 1) p_(j), j = 1..m
    adjusted = torch.empty_like(p)
    adjusted[order] = torch.cummax(scaled, 0).values
    return adjusted


def simultaneous_intervals(
    estimate: Tensor, replicates: Tensor, level: float = 0.95, method: str = "max_t"
) -> tuple[Tensor, Tensor]:
    """Intervals (low (S,), high (S,)) that hold for all S rows at once with probability ~ ``level``.

    ``max_t``: estimate_s +- c se_s, se_s = std_r Delta*_{s,r}, c = the ``level`` quantile of
    max_s |Delta*_{s,r} - estimate_s| / se_s (the bootstrap max-modulus / max-|t| method, Romano & Wolf
    2005; rows with se = 0 get width 0). ``bonferroni``: percentile intervals at 1 - (1 - level) / S.
    """
    check_level(level)
    est, x = torch.as_tensor(estimate, dtype=torch.float64), torch.as_tensor(replicates, dtype=torch.float64)
    if method == "bonferroni":
        return percentile_interval(x, 1 - (1 - level) / x.shape[0])
    if method != "max_t":
        raise ValueError(f"method must be 'max_t' or 'bonferroni', got {method!r}")
    se = x.std(1)  # (S,)
    t = (x - est[:, None]).abs() / torch.where(se > 0, se, 1.0)[:, None]  # (S, R); se = 0 rows are 0
    crit = torch.quantile(t.amax(0), level)
    return est - crit * se, est + crit * se


def pairwise(rep: Replicates) -> Replicates:
    """Delta_S - Delta_T for every pair S before T in ``rep.names``, from the same (paired) replicates;
    names "S - T". For Delta = metric(MAP) - metric(B), this is metric(B_T) - metric(B_S)."""
    s = len(rep.names)
    if s < 2:
        raise ValueError(f"pairwise differences need at least two names, got {list(rep.names)}")
    i, j = torch.triu_indices(s, s, offset=1)
    names = tuple(f"{rep.names[a]} - {rep.names[b]}" for a, b in zip(i.tolist(), j.tolist()))
    return Replicates(names, rep.estimate[i] - rep.estimate[j], rep.replicates[i] - rep.replicates[j])


def ranking_table(rep: Replicates, level: float = 0.95, method: str = "max_t") -> list[dict]:
    """One JSON-able row per name, best (largest estimate) first: estimate, simultaneous interval
    (``method``) over the family of all rows, bootstrap p, Holm-adjusted p and ``distinguishable``
    (Holm p < 1 - level). Pass ``pairwise(rep)`` to ask which subsets differ from each other."""
    low, high = simultaneous_intervals(rep.estimate, rep.replicates, level, method)
    p = bootstrap_p_values(rep.replicates)
    p_holm = holm(p)
    rows = [
        {
            "name": name,
            "estimate": float(rep.estimate[k]),
            "low": float(low[k]),
            "high": float(high[k]),
            "p": float(p[k]),
            "p_holm": float(p_holm[k]),
            "distinguishable": bool(p_holm[k] < 1 - level),
            "level": level,
            "interval": method,
        }
        for k, name in enumerate(rep.names)
    ]
    return sorted(rows, key=lambda row: -row["estimate"])
