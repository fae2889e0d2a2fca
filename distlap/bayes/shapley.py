"""Shapley values of transformer blocks, and the greedy best set of k blocks, for any subset value v(S).

A coalition S of the L players (blocks) is a bitmask: bit b set <=> block b in S, so the row index of
:func:`all_masks` is the subset. A value function takes a bool array of masks (S, L) and returns their
values (S,) (e.g. Delta_ECE(S) = ECE_MAP - ECE_S from one GLM pass, :func:`glm_values`).

Exact Shapley values (Shapley 1953), from the table of all 2^L values:
    phi_i = sum_{S not containing i} |S|! (L - |S| - 1)! / L! [v(S + i) - v(S)],
efficient: sum_i phi_i = v(all) - v({}). Permutation sampling (Castro, Gomez & Tejada 2009): for m
uniformly random orders pi, phi_i ~ mean_pi [v(Pre_pi(i) + i) - v(Pre_pi(i))], with standard error
std / sqrt(m); each order's contributions also sum to v(all) - v({}).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Value = Callable[[np.ndarray], np.ndarray]  # masks (S, L) bool -> values (S,) float64
EXACT_MAX_PLAYERS = 16


def all_masks(n_players: int) -> np.ndarray:
    """Every subset as a bool row, (2^L, L); row r holds the players of bitmask r."""
    return (np.arange(2**n_players)[:, None] >> np.arange(n_players)) & 1 == 1


def bits(masks: np.ndarray) -> np.ndarray:
    """Bitmask integers (S,) of bool masks (S, L)."""
    return (masks.astype(np.int64) << np.arange(masks.shape[1])).sum(1)


def shapley_matrix(n_players: int) -> np.ndarray:
    """The (2^L, L) matrix A with phi = v A (module docstring, regrouped by coalition T):
    A[T, i] = |T - i|! (L - |T|)! / L! if i in T, else -|T|! (L - |T| - 1)! / L!."""
    size = np.array([int(m).bit_count() for m in range(2**n_players)])[:, None]  # |T|, (2^L, 1)
    inside = all_masks(n_players)  # i in T, (2^L, L)
    weight = np.array([math.factorial(k) * math.factorial(n_players - k - 1) for k in range(n_players)])
    weight = weight / math.factorial(n_players)  # w(k) = k! (L - k - 1)! / L!, k = 0..L-1
    return np.where(inside, weight[np.maximum(size - 1, 0)], -weight[np.minimum(size, n_players - 1)])


def exact_shapley(values: np.ndarray) -> np.ndarray:
    """Shapley values (..., L) from the values (..., 2^L) of every bitmask (module docstring); a stack
    of tables (e.g. bootstrap replicates, (R, 2^L)) in one matmul."""
    values = np.asarray(values, dtype=np.float64)
    n = round(math.log2(values.shape[-1]))
    if 2**n != values.shape[-1]:
        raise ValueError(f"need the values of all 2^L subsets, got {values.shape[-1]}")
    return values @ shapley_matrix(n)


def permutation_shapley(
    value: Value, n_players: int, n_permutations: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo Shapley values and their standard errors, (L,) each (Castro et al. 2009).

    The prefixes of all orders are evaluated in one batch of distinct masks (at most m (L - 1) + 2).
    """
    if n_players > 62:
        raise ValueError(f"coalitions are int64 bitmasks: at most 62 players, got {n_players}")
    rng = np.random.default_rng(seed)
    orders = np.stack([rng.permutation(n_players) for _ in range(n_permutations)])  # (m, L)
    prefix = np.zeros((n_permutations, n_players + 1), dtype=np.int64)  # (m, L + 1)
    for k in range(n_players):
        prefix[:, k + 1] = prefix[:, k] | (1 << orders[:, k])
    unique, index = np.unique(prefix, return_inverse=True)
    masks = (unique[:, None] >> np.arange(n_players)) & 1 == 1
    v = np.asarray(value(masks), dtype=np.float64)[index.reshape(prefix.shape)]  # (m, L + 1)
    gains = np.empty((n_permutations, n_players))
    np.put_along_axis(gains, orders, np.diff(v, axis=1), axis=1)  # gains[pi, i]
    if n_permutations < 2:
        raise ValueError("a standard error needs at least 2 permutations")
    se = gains.std(0, ddof=1) / math.sqrt(n_permutations)
    return gains.mean(0), se


def shapley(
    value: Value, n_players: int, method: str = "auto", n_permutations: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Shapley values and standard errors: exact (SE 0) up to 16 players under ``auto``, else sampled."""
    if method == "auto":
        method = "exact" if n_players <= EXACT_MAX_PLAYERS else "permutation"
    if method == "exact":
        return exact_shapley(value(all_masks(n_players))), np.zeros(n_players)
    if method == "permutation":
        return permutation_shapley(value, n_players, n_permutations, seed)
    raise ValueError(f"method must be auto, exact or permutation, got {method!r}")


@dataclass(frozen=True)
class GreedyStep:
    size: int  # k
    blocks: tuple[int, ...]  # the greedy set of k blocks, sorted
    value: float  # v(blocks)


def greedy_sets(value: Value, n_players: int) -> list[GreedyStep]:
    """Forward greedy selection: S_k = S_{k-1} + argmax_i v(S_{k-1} + i) for k = 1..L (ties: lowest i)."""
    chosen: list[int] = []
    steps = []
    for k in range(1, n_players + 1):
        candidates = [i for i in range(n_players) if i not in chosen]
        masks = np.zeros((len(candidates), n_players), dtype=bool)
        masks[:, chosen] = True
        masks[np.arange(len(candidates)), candidates] = True
        v = np.asarray(value(masks), dtype=np.float64)
        best = int(np.argmax(v))
        chosen.append(candidates[best])
        steps.append(GreedyStep(k, tuple(sorted(chosen)), float(v[best])))
    return steps


@dataclass(frozen=True)
class Selected:
    """A set chosen on one split (validation) and reported on another (test)."""

    size: int  # k
    blocks: tuple[int, ...]  # the chosen set of k blocks, sorted
    value: float  # v(blocks) on the reporting split (test)
    val_value: float  # v(blocks) on the split it was chosen on (validation)


def reported_on(steps: list[GreedyStep], value: Value, n_players: int) -> list[Selected]:
    """The sets ``steps`` chose (on validation: their ``value`` is the validation value), each with its
    value under ``value`` (the test value function): selection and report on separate data."""
    masks = np.zeros((len(steps), n_players), dtype=bool)
    for row, step in enumerate(steps):
        masks[row, list(step.blocks)] = True
    reported = np.asarray(value(masks), dtype=np.float64) if steps else np.zeros(0)
    return [Selected(s.size, s.blocks, float(v), s.value) for s, v in zip(steps, reported, strict=True)]


def best_sets(values: np.ndarray) -> list[GreedyStep]:
    """The exact best set of each size k = 1..L from the table of all 2^L values (ties: lowest bitmask)."""
    values = np.asarray(values, dtype=np.float64)
    n = round(math.log2(len(values)))
    size = np.array([int(m).bit_count() for m in range(len(values))])
    steps = []
    for k in range(1, n + 1):
        idx = np.flatnonzero(size == k)
        best = int(idx[np.argmax(values[idx])])
        steps.append(GreedyStep(k, tuple(b for b in range(n) if best >> b & 1), float(values[best])))
    return steps


def glm_values(
    logits: torch.Tensor, variances: torch.Tensor, labels: torch.Tensor, metric: str = "ece", n_bins: int = 15
) -> Value:
    """v(S) = metric_MAP - metric_S for ``metric`` in {ece, nll} (Delta_ECE, Delta_NLL; positive = S
    improves on the MAP), from one GLM pass (:mod:`distlap.bayes.glm`); chunked over subsets."""
    from distlap.bayes.glm import subset_metrics

    if metric not in ("ece", "nll"):
        raise ValueError(f"metric must be ece or nll, got {metric!r}")
    empty = torch.zeros(1, variances.shape[1], dtype=torch.bool)
    base = subset_metrics(logits, variances, labels, empty, n_bins)[metric][0].item()

    def value(masks: np.ndarray) -> np.ndarray:
        scores = subset_metrics(logits, variances, labels, torch.as_tensor(masks), n_bins)[metric]
        return base - scores.cpu().numpy()

    return value
