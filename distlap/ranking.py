"""Which predictives are distinguishable from the MAP and from each other: a family of contrasts of the
(seed-mean) improvements Δ, studentised, with p-values and simultaneous intervals that agree — a call is
made iff the family's interval excludes 0, iff the adjusted p < α = 1 − level.

Contrast k (a predictive vs the MAP, or a pair Δ_S − Δ_T = metric(T) − metric(S)) has estimate est_k,
standard error se_k and df ν_k from :class:`~distlap.seed_intervals.Pooled` (one seed: the bootstrap
variance from R paired replicates, ν = R − 1; n seeds: :func:`~distlap.seed_intervals.combine`, ν = n − 1);
t_k = est_k / se_k. Every design uses Bonferroni over the per-contrast t: p̃_k = min(1, m p_k) with
p_k = 2 P(T_ν > |t_k|), interval est_k ± t_ν^{-1}(1 − α/(2m)) se_k. It holds its level under any
dependence between the contrasts, has no p-value floor (p falls below α/m for any large enough |t|), and
the adjusted p and the interval agree exactly (Holm's step-down would gain a little power but has no
simultaneous intervals to agree with).

Why not the single-step max-|t| with the bootstrap correlation (Hothorn, Bretz & Westfall 2008), which
this module used for one seed: it is exact only if the studentised contrasts are jointly multivariate t,
and the studentised ECE contrasts are not — the standard error of a binned, non-smooth score varies from
test set to test set more than R − 1 df allow. On 1,000 repetitions of 18 null predictives
(``benchmarks/inference_coverage.py``'s generator, 1,000 examples, R = 200) P(|t| > 3.5) was 0.00064
against 0.00047 for the normal while est/sd was normal, and the max-|t| calls over the 153 pairs erred
in 0.063 ± 0.008 of repetitions; Bonferroni on the same draws 0.047 ± 0.007. The correlation it exploits
buys little here: for exchangeable rows its normal critical values are 2.72 (10 rows vs the MAP) and 3.49
(the 153 pairs of 18) against Bonferroni's 2.81 and 3.59. With several seeds the S × S correlation of
the seed effects cannot be estimated from n − 1 df at all.

With 3 seeds t_2 is heavy-tailed: a call needs |t| ≳ 14 among 10 contrasts; that is the information in
3 seeds about the mean over the seed population. One seed's family needs R ≥ ``MIN_RESAMPLES`` example
resamples: the t_{R−1} law of a bootstrap-studentised contrast is an approximation whose far tail (α/m)
is not to be trusted from fewer; with fewer the family is ``resolvable: false`` and no call is made.

Contrasts with se = 0 (the MAP itself in every replicate and seed) are never tested: p = 1, not counted in
m. The unadjusted p agrees with the marginal interval est ± t_{ν, (1 + level)/2} se. The 2^L coalitions
of blocks (Shapley values, best sets) are not a family here: no distinguishability call is made on them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from scipy import stats
from torch import Tensor

from distlap import intervals, names, seed_intervals
from distlap.intervals import check_level
from distlap.metrics import Metric
from distlap.seed_intervals import Pooled

MIN_RESAMPLES = 50  # one seed's family: the least R whose t_{R-1} tail is trusted at α/m (module doc)


@dataclass(frozen=True)
class Contrasts:
    """A family: m named contrasts of the S rows of a :class:`Pooled`, weights (m, S)."""

    names: tuple[str, ...]
    weights: Tensor
    kind: str  # "vs_map" or "pairs"


def versus_map(rows: Sequence[str], among: Sequence[str] | None = None) -> Contrasts:
    """Every row of ``among`` (default: all ``rows``) against the MAP: Δ_S itself."""
    among = list(rows) if among is None else list(among)
    w = torch.zeros(len(among), len(rows), dtype=torch.float64)
    w[torch.arange(len(among)), [list(rows).index(a) for a in among]] = 1.0
    return Contrasts(tuple(among), w, "vs_map")


def pairs(rows: Sequence[str], among: Sequence[str] | None = None) -> Contrasts:
    """Δ_S − Δ_T for every pair S before T of ``among`` (default: all ``rows``), named "S - T"; for
    Δ = metric(MAP) − metric(B) this is metric(B_T) − metric(B_S)."""
    among = list(rows) if among is None else list(among)
    if len(among) < 2:
        raise ValueError(f"pairwise differences need at least two names, got {among}")
    i, j = torch.triu_indices(len(among), len(among), offset=1).tolist()
    index = [list(rows).index(a) for a in among]
    w = torch.zeros(len(i), len(rows), dtype=torch.float64)
    w[torch.arange(len(i)), [index[a] for a in i]] = 1.0
    w[torch.arange(len(i)), [index[b] for b in j]] = -1.0
    return Contrasts(tuple(f"{among[a]} - {among[b]}" for a, b in zip(i, j)), w, "pairs")


def alpha(level: float) -> float:
    """α = 1 − level, rounded to 12 decimals (1 − 0.95 is 0.05000000000000004 in floating point)."""
    check_level(level)
    return round(1 - level, 12)


@dataclass(frozen=True)
class _Tested:
    """The contrasts' statistics: estimate, se, df, |t|, unadjusted p and which are tested (se > 0)."""

    est: Tensor
    se: Tensor
    df: Tensor
    abs_t: Tensor
    p: Tensor
    tested: Tensor


def _statistics(pooled: Pooled, contrasts: Contrasts) -> _Tested:
    est, se, df = pooled.contrast(contrasts.weights)
    tested = se > 0
    abs_t = torch.where(tested, est.abs() / torch.where(tested, se, 1.0), 0.0)
    p = torch.as_tensor(2 * stats.t.sf(abs_t.numpy(), df.numpy()), dtype=torch.float64)
    return _Tested(est, se, df, abs_t, torch.where(tested, p, 1.0), tested)


def _resolvable(pooled: Pooled) -> tuple[bool, str | None]:
    """One seed: R example resamples must be enough to trust the t_{R−1} tail (module doc)."""
    if pooled.n_seeds == 1 and pooled.n_resamples < MIN_RESAMPLES:
        return False, (
            f"{pooled.n_resamples} bootstrap replicates estimate a standard error too roughly for a call "
            f"at α/m (need {MIN_RESAMPLES}: laplace.n_bootstrap)"
        )
    return True, None


def _adjust(s: _Tested, level: float) -> tuple[Tensor, Tensor, int]:
    """Bonferroni-adjusted p and critical value per contrast (module doc), and m; untested: p 1, c 0."""
    tested = s.tested
    m = int(tested.sum())
    adjusted, crit = torch.ones_like(s.p), torch.zeros_like(s.p)
    if m:
        adjusted[tested] = (m * s.p[tested]).clamp(max=1.0)
        q = stats.t.isf(alpha(level) / (2 * m), s.df[tested].numpy())
        crit[tested] = torch.as_tensor(q, dtype=torch.float64)
    return adjusted, crit, m


def _method(pooled: Pooled, m: int, df: float) -> str:
    if pooled.n_seeds == 1:
        return f"Bonferroni over {m} contrasts, t with {df:g} df (one seed, R = {pooled.n_resamples})"
    return f"Bonferroni over {m} contrasts, t with {pooled.n_seeds - 1} df ({pooled.design} seeds)"


def family(pooled: Pooled, contrasts: Contrasts, level: float = 0.95) -> dict:
    """The JSON-able family: method, design, whether it is resolvable (and why not) and one row per
    contrast, largest estimate first: estimate, se, df (None = normal), t, p (unadjusted), p_adjusted,
    critical value, simultaneous interval low/high and ``distinguishable`` (None where unresolvable)."""
    check_level(level)
    s = _statistics(pooled, contrasts)
    resolvable, reason = _resolvable(pooled)
    adjusted, crit, m = _adjust(s, level)
    method = _method(pooled, m, float(s.df[0])) if resolvable else None
    rows = []
    for k, name in enumerate(contrasts.names):
        row = {
            "name": name,
            "estimate": float(s.est[k]),
            "se": float(s.se[k]),
            "df": None if math.isinf(s.df[k]) else float(s.df[k]),
            "t": float(s.abs_t[k]) * (1 if s.est[k] >= 0 else -1),
            "p": float(s.p[k]),
        }
        if resolvable:
            low, high = s.est[k] - crit[k] * s.se[k], s.est[k] + crit[k] * s.se[k]
            row |= {"p_adjusted": float(adjusted[k]), "critical": float(crit[k]), "low": float(low)}
            row |= {"high": float(high), "distinguishable": bool(s.tested[k] and s.abs_t[k] > crit[k])}
        rows.append(row | ({} if resolvable else {"distinguishable": None}))
    head = {"kind": contrasts.kind, "level": level, "design": pooled.design, "n_seeds": pooled.n_seeds}
    head |= {"method": method, "n_tested": int(s.tested.sum()), "resolvable": resolvable, "reason": reason}
    return head | {"rows": sorted(rows, key=lambda row: -row["estimate"])}


def trial_replicates(
    probs_map: Tensor,
    probs: Mapping[str, Tensor],
    labels: Tensor,
    scores: Mapping[str, tuple[Metric, bool]],
    *,
    test_set: str,
    n_resamples: int,
) -> dict:
    """Per score, the paired bootstrap replicates of every predictive's improvement over the MAP
    (:func:`distlap.intervals.improvement_replicates`) with the example resamples seeded by the test set
    (:func:`distlap.intervals.bootstrap_seed`: seeds sharing a test set share them and pool as crossed),
    and the test set's identity (:func:`distlap.intervals.test_set_identity`), recorded so that the
    analysis detects the seeds' design (:func:`distlap.seed_intervals.test_set_design`) instead of
    assuming it. JSON-able; :func:`pooled_laws` reads it back."""
    seed = intervals.bootstrap_seed(test_set)
    reps = intervals.improvement_replicates(
        probs_map, probs, labels, scores, n_resamples=n_resamples, seed=seed
    )
    return {
        "n_resamples": n_resamples,
        names.BOOTSTRAP_SEED: seed,
        names.TEST_SET: test_set,
        "replicates": {s: intervals.replicates_to_json(r) for s, r in reps.items()},
    }


def pooled_laws(records: Sequence[Mapping]) -> dict[str, Pooled]:
    """Per score, the joint law of the seed-mean Δ (:func:`distlap.seed_intervals.pool`) from the
    :func:`trial_replicates` records of one configuration's seeds; records without a test-set identity or
    bootstrap seed (older results) pool as design ``unknown`` (conservative)."""
    test_sets = [r.get(names.TEST_SET) for r in records]
    resamples = [
        None if r.get(names.BOOTSTRAP_SEED) is None else (r[names.BOOTSTRAP_SEED], r["n_resamples"])
        for r in records
    ]
    return {
        score: seed_intervals.pool(
            [intervals.replicates_from_json(r["replicates"][score]) for r in records], test_sets, resamples
        )
        for score in records[0]["replicates"]
    }


def trial_inference(
    probs_map: Tensor,
    probs: Mapping[str, Tensor],
    labels: Tensor,
    scores: Mapping[str, tuple[Metric, bool]],
    *,
    test_set: str,
    n_resamples: int,
    level: float = 0.95,
) -> dict:
    """One trial's ``result["inference"]``: :func:`trial_replicates` and, from them, the family of every
    predictive against the MAP per score and the family of all pairs for the first score
    (:func:`family`)."""
    record = trial_replicates(probs_map, probs, labels, scores, test_set=test_set, n_resamples=n_resamples)
    laws = pooled_laws([record])
    first = laws[next(iter(scores))]
    return {
        **record,
        "vs_map": {s: family(law, versus_map(law.names), level) for s, law in laws.items()},
        "pairwise": family(first, pairs(first.names), level) if len(first.names) > 1 else None,
    }
