"""Which predictives are distinguishable from the MAP and from each other: a family of contrasts of the
(seed-mean) improvements Δ, studentised, with p-values and simultaneous intervals that agree — a call is
made iff the family's interval excludes 0, iff the adjusted p < α = 1 − level.

Contrast k (a predictive vs the MAP, or a pair Δ_S − Δ_T = metric(T) − metric(S)) has estimate est_k,
standard error se_k and df ν_k from :class:`~distlap.seed_intervals.Pooled`; t_k = est_k / se_k.

- **One seed**: the joint null of (t_k) is multivariate t with R − 1 df (the bootstrap covariance is an
  estimate from R paired replicates; ν → ∞ gives the multivariate normal) and the replicates' correlation.
  Single-step max-|T| (Hothorn, Bretz & Westfall 2008, ``multcomp``'s "single-step"; Romano & Wolf 2005):
  p̃_k = P(max_j |T_j| ≥ |t_k|), interval est_k ± c se_k with c the ``level`` quantile of max_j |T_j|. By
  Monte-Carlo with B seeded draws: p̃ = (1 + #{M_b ≥ |t|})/(B + 1) (resolution 1/(B + 1); Monte-Carlo
  standard deviation sqrt(α(1 − α)/B) = 0.001 at α = 0.05, B = 50 000) and c = the ⌈α(B + 1) − 1⌉-th
  largest M_b, which makes p̃ < α ⟺ |t| > c exactly. Rank-deficient covariances (the pairs are linear in
  the S rows) are drawn through the nonzero part of their eigen-decomposition. The correlation of S rows
  needs R ≥ 10 S replicates; with fewer the family is ``resolvable: false`` and no call is made.
- **Several seeds**: every contrast's variance has its own n − 1 seed df, and the S × S correlation of the
  seed effects cannot be estimated from n − 1 df (2 for 3 seeds, far fewer than S): a multivariate t
  with one guessed correlation and one shared denominator would not hold its level (each row has its own
  s², so one of S small denominators is S times likelier). Bonferroni over the per-contrast t instead:
  p̃ = min(1, m p), interval est_k ± t_{n−1}^{-1}(1 − α/(2m)) se_k, valid under any dependence (Holm's
  step-down would gain a little power but has no simultaneous intervals to agree with). With 3 seeds
  t_2 is heavy-tailed: a call needs |t| ≳ 14 among 10 contrasts; that is the information in 3 seeds about
  the mean over the seed population.

Contrasts with se = 0 (the MAP itself in every replicate and seed) are never tested: p = 1, not counted in
m. The unadjusted two-sided p = 2 P(T_ν > |t|) has no floor and agrees with the marginal interval
est ± t_{ν, (1 + level)/2} se. The 2^L coalitions of blocks (Shapley values, best sets) are not a family
here: no distinguishability call is made on them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from distlap import intervals, names, seed_intervals
from distlap.intervals import check_level
from distlap.metrics import Metric
from distlap.seed_intervals import Pooled

MC_DRAWS = 50_000  # draws of max |T| for one seed's family
MIN_REPLICATES_PER_ROW = 10  # R >= this x S to estimate the correlation of S rows
_CHUNK = 10_000


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


def max_abs_t(
    cov: Tensor, weights: Tensor, se: Tensor, draws: int = MC_DRAWS, seed: int = 0, df: float = math.inf
) -> Tensor:
    """B = ``draws`` seeded draws of max_k |T_k|, T = (weights Y) / se / sqrt(W), Y ~ N(0, cov) (S,) and
    W ~ χ²_df / df (W = 1 for df = ∞: multivariate normal; else multivariate t): (B,) float64.

    Y = V Λ^{1/2} Z over the eigenvalues above 1e-12 of the largest (so rank-deficient ``cov`` is fine)."""
    vals, vecs = np.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64).numpy())
    keep = vals > 1e-12 * max(vals.max(), 1e-300)
    root = vecs[:, keep] * np.sqrt(vals[keep])  # (S, r)
    proj = (torch.as_tensor(weights, dtype=torch.float64).numpy() @ root) / se.numpy()[:, None]  # (m, r)
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, draws, _CHUNK):
        size = min(_CHUNK, draws - start)
        top = np.abs(rng.standard_normal((size, proj.shape[1])) @ proj.T).max(1)
        out.append(top if math.isinf(df) else top / np.sqrt(rng.chisquare(df, size) / df))
    return torch.from_numpy(np.concatenate(out))


def alpha(level: float) -> float:
    """α = 1 − level, rounded to 12 decimals (1 − 0.95 is 0.05000000000000004 in floating point)."""
    check_level(level)
    return round(1 - level, 12)


def max_t_adjust(abs_t: Tensor, maxima: Tensor, level: float) -> tuple[Tensor, float]:
    """Single-step adjusted p = (1 + #{M_b ≥ |t|}) / (B + 1) and the critical value c with p < α ⟺ |t| > c
    exactly: with j = #{k : (1 + k)/(B + 1) < α}, c is the j-th largest draw (module doc)."""
    ordered = maxima.sort().values
    b = len(ordered)
    j = int(((1 + torch.arange(b + 1, dtype=torch.float64)) / (b + 1) < alpha(level)).sum())
    if j < 1:
        need = math.ceil(2 / alpha(level))
        raise ValueError(f"{b} draws cannot resolve p < {alpha(level):g}: need at least {need}")
    at_least = b - torch.searchsorted(ordered, abs_t.to(ordered.dtype), right=False)
    return (1 + at_least).double() / (b + 1), float(ordered[b - j])


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


def _resolvable(pooled: Pooled, contrasts: Contrasts) -> tuple[bool, str | None]:
    """One seed: R replicates must estimate the correlation of the rows the family uses."""
    used = int((contrasts.weights != 0).any(0).sum())
    need = MIN_REPLICATES_PER_ROW * used
    if pooled.n_seeds == 1 and pooled.n_resamples < need:
        return False, (
            f"{pooled.n_resamples} bootstrap replicates cannot estimate the correlation of {used} rows "
            f"(need {need}: laplace.n_bootstrap)"
        )
    return True, None


def _adjust(
    pooled: Pooled, contrasts: Contrasts, s: _Tested, level: float, draws: int, seed: int
) -> tuple[Tensor, Tensor, str]:
    """Adjusted p and critical value per contrast, and the method (module doc); untested: p 1, c 0."""
    tested = s.tested
    m = int(tested.sum())
    adjusted, crit = torch.ones_like(s.p), torch.zeros_like(s.p)
    if pooled.n_seeds == 1:
        method = f"single-step max-|t|, multivariate t, {float(s.df[0]):g} df (Monte-Carlo, {draws} draws)"
        if m:
            w = contrasts.weights[tested]
            maxima = max_abs_t(pooled.covariance(), w, s.se[tested], draws, seed, float(s.df[0]))
            adjusted[tested], c = max_t_adjust(s.abs_t[tested], maxima, level)
            crit[tested] = c
        return adjusted, crit, method
    method = f"Bonferroni over {m} contrasts, t with {pooled.n_seeds - 1} df ({pooled.design} seeds)"
    if m:
        adjusted[tested] = (m * s.p[tested]).clamp(max=1.0)
        q = stats.t.isf(alpha(level) / (2 * m), s.df[tested].numpy())
        crit[tested] = torch.as_tensor(q, dtype=torch.float64)
    return adjusted, crit, method


def family(
    pooled: Pooled, contrasts: Contrasts, level: float = 0.95, *, draws: int = MC_DRAWS, seed: int = 0
) -> dict:
    """The JSON-able family: method, design, whether it is resolvable (and why not) and one row per
    contrast, largest estimate first: estimate, se, df (None = normal), t, p (unadjusted), p_adjusted,
    critical value, simultaneous interval low/high and ``distinguishable`` (None where unresolvable)."""
    check_level(level)
    s = _statistics(pooled, contrasts)
    resolvable, reason = _resolvable(pooled, contrasts)
    adjusted, crit, method = _adjust(pooled, contrasts, s, level, draws, seed) if resolvable else (0, 0, None)
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
    if resolvable and pooled.n_seeds == 1:
        head |= {"mc_draws": draws, "p_resolution": 1 / (draws + 1)}
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
