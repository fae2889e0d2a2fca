"""Intervals for Δ = metric(MAP) − metric(Bayes) that cover every source of randomness that varies.

Three sources, one currency: bootstrap *replicates* of Δ, (S, R) for S predictives
(:class:`Replicates`); :mod:`distlap.ranking` turns them into the ranking's p-values and joint intervals.

1. Test examples: the paired percentile bootstrap (:func:`paired_bootstrap_ci`, Efron & Tibshirani
   1993): each replicate draws N examples with replacement (:func:`bootstrap_indices`) and scores both
   predictives on the same examples.
2. Posterior samples (:func:`delta_replicates`, :func:`two_level_bootstrap_ci`). A Monte-Carlo (``nn``)
   predictive depends on its samples. Given K independent sample sets (predictives B_1..B_K), replicate
   r draws the examples of 1. AND a set k_r uniformly from 1..K, and records metric(MAP[idx_r]) −
   metric(B_{k_r}[idx_r]) (a two-stage bootstrap, Davison & Hinkley 1997, sec. 3.8). The estimate is
   mean_k Δ_k. Identical sets (or K = 1) reduce it, bit for bit, to 1. All S predictives share the
   rows and the set draws, as the subsets of one posterior share their samples, so differences between
   subsets are paired too.
3. Training seeds: :mod:`distlap.seed_intervals` pools the replicates of several seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from distlap.metrics import Metric, replicate_values

_SET_STREAM = 1  # the sample-set draws use their own stream, so the example rows equal the one-level ones


# -------------------------------------------------------------------- paired bootstrap over examples


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile bootstrap interval for metric(a) - metric(b)."""

    estimate: float  # metric(a) - metric(b) on the full data
    low: float
    high: float
    level: float
    n_resamples: int


def _resample_indices(n: int, n_resamples: int, generator: torch.Generator) -> Tensor:
    """Bootstrap resamples of the example indices, with replacement: (n_resamples, n) int64."""
    return torch.randint(0, n, (n_resamples, n), generator=generator)


def paired_bootstrap_ci(
    metric: Metric,
    probs_a: Tensor,
    probs_b: Tensor,
    labels: Tensor,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Paired percentile bootstrap (Efron & Tibshirani 1993) for metric(a) - metric(b).

    Each replicate draws N examples with replacement and evaluates both predictives on the same
    examples; the interval is the [(1-level)/2, (1+level)/2] quantiles of the replicate differences.
    ``metric`` is any ``callable(probs, labels) -> float``; the built-in metrics (also as keyword
    ``functools.partial``) run vectorised over all replicates, anything else in a Python loop.
    """
    shape_a, shape_b = tuple(torch.as_tensor(probs_a).shape), tuple(torch.as_tensor(probs_b).shape)
    if shape_a != shape_b:
        raise ValueError(f"probs_a and probs_b must have the same shape, got {shape_a} and {shape_b}")
    check_level(level)
    labels = torch.as_tensor(labels)
    estimate = metric(probs_a, labels) - metric(probs_b, labels)  # validates probs, labels, the metric's args
    idx = bootstrap_indices(labels.shape[0], n_resamples, seed)  # (R, N)
    diffs = replicate_values(metric, probs_a, labels, idx) - replicate_values(metric, probs_b, labels, idx)
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(diffs, tails).tolist()
    return BootstrapCI(float(estimate), low, high, level, n_resamples)


def bootstrap_indices(n: int, n_resamples: int, seed: int = 0) -> Tensor:
    """The example resamples :func:`paired_bootstrap_ci` draws for ``seed``: (n_resamples, n) int64.

    Row r holds N indices drawn uniformly with replacement (Efron & Tibshirani 1993); callers that use
    the same rows for several predictives get paired replicates.
    """
    for name, value in (("n", n), ("n_resamples", n_resamples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return _resample_indices(n, n_resamples, torch.Generator().manual_seed(seed))


def test_set_identity(*tensors: Tensor) -> str:
    """A short identity of a test set: the first 16 hex digits of SHA-256 over each tensor's dtype, shape
    and bytes (e.g. the images and labels of ``FineTuned.splits.test``). Seeds that scored the same
    examples in the same order get the same identity, seeds with their own test draw different ones."""
    digest = hashlib.sha256()
    for t in tensors:
        t = torch.as_tensor(t).detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def bootstrap_seed(test_set: str) -> int:
    """The seed of the example resamples of a test set: its identity (:func:`test_set_identity`) as a
    60-bit integer. Seeding by the test set, not the training seed, makes seeds that share a test set draw
    the very same resamples (a crossed design, :mod:`distlap.seed_intervals`)."""
    return int(test_set[:15], 16)


# ------------------------------------------------------------- examples x posterior-sample sets


@dataclass(frozen=True)
class Replicates:
    """Bootstrap replicates of S named differences, sharing their resamples (so they are paired)."""

    names: tuple[str, ...]
    estimate: Tensor  # (S,) float64 point estimates
    replicates: Tensor  # (S, R) float64
    mc_std: Tensor | None = None  # (S,) std of Delta over posterior-sample sets (0 for identical sets)
    seed_std: Tensor | None = None  # (S,) std of Delta over training seeds

    def __post_init__(self):
        s = len(self.names)
        if self.estimate.shape != (s,) or self.replicates.ndim != 2 or self.replicates.shape[0] != s:
            raise ValueError(
                f"Replicates: need estimate ({s},) and replicates ({s}, R) for {s} names, got "
                f"{tuple(self.estimate.shape)} and {tuple(self.replicates.shape)}"
            )


@dataclass(frozen=True)
class DeltaCI:
    """A percentile interval for Delta that covers test examples and posterior-sample sets."""

    estimate: float  # mean over sample sets of metric(MAP) - metric(B_k) on the full test set
    low: float
    high: float
    level: float
    n_resamples: int
    n_sets: int  # K
    mc_std: float  # std over the K sets of Delta_k: the Monte-Carlo term (0 for identical sets)


def check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _as_sets(name: str, probs: Tensor, n: int, c: int) -> Tensor:
    """(N, C) -> (1, N, C); (K, N, C) unchanged; anything else refused."""
    probs = torch.as_tensor(probs).detach()
    probs = probs[None] if probs.ndim == 2 else probs
    if probs.ndim != 3 or tuple(probs.shape[1:]) != (n, c):
        raise ValueError(
            f"probs_bayes[{name!r}] must have shape (K, {n}, {c}) or ({n}, {c}) to match "
            f"probs_map, got {tuple(torch.as_tensor(probs).shape)}"
        )
    return probs


def _check_sets(probs_map: Tensor, probs_bayes: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """probs_map (N, C) and every entry as (K, N, C) with one K for all."""
    probs_map = torch.as_tensor(probs_map)
    if probs_map.ndim != 2 or not probs_bayes:
        raise ValueError(
            f"need probs_map (N, C) and at least one probs_bayes entry, got probs_map of "
            f"shape {tuple(probs_map.shape)} and {len(probs_bayes)} entries"
        )
    sets = {s: _as_sets(s, p, *probs_map.shape) for s, p in probs_bayes.items()}
    if len({p.shape[0] for p in sets.values()}) != 1:
        raise ValueError(
            f"every probs_bayes entry needs the same number K of sample sets, got "
            f"{ {s: p.shape[0] for s, p in sets.items()} }"
        )
    return probs_map, sets


def _set_replicates(metric: Metric, sets: Tensor, labels: Tensor, idx: Tensor, draw: Tensor) -> Tensor:
    """metric(B_{draw_r}[idx_r]) per replicate r: sets (K, N, C), idx (R, N), draw (R,) -> (R,)."""
    out = torch.empty(idx.shape[0], dtype=torch.float64)
    for k in range(sets.shape[0]):
        rows = draw == k
        if rows.any():  # one vectorised pass per sample set over the replicates that drew it
            out[rows] = replicate_values(metric, sets[k], labels, idx[rows])
    return out


def delta_replicates(
    metric: Metric,
    probs_map: Tensor,
    probs_bayes: Mapping[str, Tensor],
    labels: Tensor,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Replicates:
    """Two-level bootstrap replicates of metric(MAP) - metric(B_s) for every predictive s (module doc).

    ``probs_map`` (N, C); ``probs_bayes[s]`` (K, N, C), K sample sets shared by all s, or (N, C) (K = 1).
    Returns estimate (S,) = mean_k Delta_{s,k}, replicates (S, R), mc_std (S,) = std_k Delta_{s,k}.
    """
    labels = torch.as_tensor(labels)
    probs_map, sets = _check_sets(probs_map, probs_bayes)
    n, k = probs_map.shape[0], next(iter(sets.values())).shape[0]
    idx = bootstrap_indices(n, n_resamples, seed)  # (R, N)
    draw = torch.from_numpy(np.random.default_rng([seed, _SET_STREAM]).integers(0, k, n_resamples))  # (R,)
    whole = torch.arange(n)[None]  # (1, N)
    map_reps = replicate_values(metric, probs_map, labels, idx)  # (R,)
    map_full = replicate_values(metric, probs_map, labels, whole)  # (1,)
    reps = torch.stack([map_reps - _set_replicates(metric, p, labels, idx, draw) for p in sets.values()])
    per_set = torch.stack(
        [torch.cat([map_full - replicate_values(metric, b, labels, whole) for b in p]) for p in sets.values()]
    )  # (S, K)
    # mean_k as first + mean of deviations from it: exactly the one-level estimate for identical sets
    estimate = per_set[:, 0] + (per_set - per_set[:, :1]).mean(1)
    mc_std = per_set.std(1) if k > 1 else torch.zeros(len(sets), dtype=torch.float64)
    return Replicates(tuple(sets), estimate, reps, mc_std=mc_std)


def percentile_interval(replicates: Tensor, level: float = 0.95) -> tuple[Tensor, Tensor]:
    """Equal-tailed percentile interval per row: the (1-level)/2 and (1+level)/2 quantiles of (S, R)."""
    check_level(level)
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(torch.as_tensor(replicates).double(), tails, dim=-1)
    return low, high


def two_level_bootstrap_ci(
    metric: Metric,
    probs_map: Tensor,
    probs_bayes: Tensor,
    labels: Tensor,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> DeltaCI:
    """Delta = metric(MAP) - metric(Bayes) for a Monte-Carlo predictive with K sample sets (K, N, C),
    with a percentile interval over test examples AND sample sets (module doc, item 1).

    With K identical sets (or probs_bayes (N, C)) the result equals ``paired_bootstrap_ci`` exactly.
    """
    check_level(level)
    rep = delta_replicates(
        metric, probs_map, {"bayes": probs_bayes}, labels, n_resamples=n_resamples, seed=seed
    )
    low, high = percentile_interval(rep.replicates[0], level)
    n_sets = 1 if torch.as_tensor(probs_bayes).ndim == 2 else len(probs_bayes)
    return DeltaCI(
        float(rep.estimate[0]), float(low), float(high), level, n_resamples, n_sets, float(rep.mc_std[0])
    )


# --------------------------------------------------------------------- a family of predictives, saved


def improvement_replicates(
    probs_map: Tensor,
    probs: Mapping[str, Tensor],
    labels: Tensor,
    scores: Mapping[str, tuple[Metric, bool]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Replicates]:
    """Per score, the improvement of every predictive over the MAP with replicates paired across
    predictives (the same example resamples for all: :func:`bootstrap_indices` of ``seed``).

    ``scores`` maps a score name to (metric, higher_is_better); the improvement is metric(MAP) − metric(B)
    for a lower-is-better score and its negative otherwise, so positive = better than the MAP. Entries of
    ``probs`` are (N, C) or (K, N, C) for K Monte-Carlo sample sets (two-level); predictives with
    different K are resampled in groups with the same example resamples."""
    groups: dict[int, dict[str, Tensor]] = {}
    for name, p in probs.items():
        groups.setdefault(1 if p.ndim == 2 else p.shape[0], {})[name] = p
    out = {}
    for score, (metric, higher) in scores.items():
        parts = [
            delta_replicates(metric, probs_map, group, labels, n_resamples=n_resamples, seed=seed)
            for group in groups.values()
        ]
        order = [n for part in parts for n in part.names]
        sign = -1.0 if higher else 1.0
        rep = Replicates(
            tuple(order),
            sign * torch.cat([part.estimate for part in parts]),
            sign * torch.cat([part.replicates for part in parts]),
            mc_std=torch.cat([part.mc_std for part in parts]),
        )
        out[score] = select(rep, [n for n in probs if n in order])
    return out


def select(rep: Replicates, names: Sequence[str]) -> Replicates:
    """The rows of ``names``, in that order."""
    index = [rep.names.index(n) for n in names]
    mc, seed = (None if t is None else t[index] for t in (rep.mc_std, rep.seed_std))
    return Replicates(tuple(names), rep.estimate[index], rep.replicates[index], mc, seed)


def replicates_to_json(rep: Replicates, digits: int = 6) -> dict:
    """A JSON-able :class:`Replicates` (values rounded to ``digits`` decimals)."""

    def plain(t: Tensor | None):
        return None if t is None else torch.round(t.double(), decimals=digits).tolist()

    return {
        "names": list(rep.names),
        "estimate": plain(rep.estimate),
        "replicates": plain(rep.replicates),
        "mc_std": plain(rep.mc_std),
        "seed_std": plain(rep.seed_std),
    }


def replicates_from_json(data: Mapping) -> Replicates:
    """The inverse of :func:`replicates_to_json`."""

    def tensor(key: str) -> Tensor | None:
        value = data.get(key)
        return None if value is None else torch.tensor(value, dtype=torch.float64)

    return Replicates(
        tuple(data["names"]), tensor("estimate"), tensor("replicates"), tensor("mc_std"), tensor("seed_std")
    )
