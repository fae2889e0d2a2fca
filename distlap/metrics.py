"""Accuracy, calibration and OOD-detection metrics on predictive probabilities, and their values on
bootstrap resamples (:func:`replicate_values`; the intervals built from them are in
:mod:`distlap.intervals`).

Public functions take ``probs``, a float tensor (N, C) of predictive probabilities (rows sum to 1),
and ``labels``, an integer tensor (N,), and return Python floats.

Calibration bins are Guo et al.'s M equal-width bins on [0, 1]: the confidence (max probability), cast
to float32, goes to bin ``bucketize(conf, linspace(0, 1, M + 1), right=True) - 1`` (torchmetrics' rule:
bin m is [m/M, (m+1)/M)), except that the last bin is closed, [(M-1)/M, 1]. torchmetrics 1.9 gives
confidence exactly 1.0 an extra (M+1)-th bin; we do not, so that ECE is always the weighted gap of the
drawn reliability bins, and we match torchmetrics exactly whenever no confidence is exactly 1.0.
Sums are float64.

Each built-in metric is a per-example pass plus a reduction over rows of resampled indices; the scalar
metric is that reduction on the identity resample, so it and the vectorised bootstrap cannot drift apart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Metric = Callable[[Tensor, Tensor], float]

_PROB_ATOL = 1e-3  # slack on "entries in [0, 1] and rows sum to 1" for float32 round-off
_CHUNK_ELEMENTS = 2**20  # resampled (replicate, example) pairs reduced at once; bounds memory


# ---------------------------------------------------------------------------------------- validation


def _check_inputs(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    probs, labels = torch.as_tensor(probs).detach(), torch.as_tensor(labels).detach()
    if probs.ndim != 2 or not probs.is_floating_point():
        raise ValueError(f"probs must be a 2-D float tensor (N, C), got {probs.dtype} {tuple(probs.shape)}")
    n, c = probs.shape
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape (N,) = ({n},) to match probs, got {tuple(labels.shape)}")
    if n == 0 or c == 0:
        raise ValueError(f"empty input: probs has shape {tuple(probs.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c - 1}], got values in [{labels.min()}, {labels.max()}]")
    in_unit = torch.isfinite(probs).all() and probs.min() >= -_PROB_ATOL and probs.max() <= 1 + _PROB_ATOL
    if not in_unit or (probs.sum(1) - 1).abs().max() > _PROB_ATOL:
        raise ValueError("probs must be probabilities: entries in [0, 1], rows summing to 1 (logits passed?)")
    return probs, labels.long()


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# -------------------------------------------------------------- per-example terms and their reductions


class _Batched(NamedTuple):
    """A metric as per-example columns (each (N,)) and a reduction of resampled columns (R, n) -> (R,)."""

    per_example: Callable[..., tuple[Tensor, ...]]
    reduce: Callable[..., Tensor]


def _evaluate(metric: _Batched, probs: Tensor, labels: Tensor, idx: Tensor, **kw) -> Tensor:
    """The metric on each row of example indices ``idx`` (R, n); returns (R,) float64."""
    columns = metric.per_example(probs, labels, **kw)  # each (N,)
    rows = max(1, _CHUNK_ELEMENTS // idx.shape[1])
    return torch.cat([metric.reduce(*(col[chunk] for col in columns), **kw) for chunk in idx.split(rows)])


def _scalar(metric: _Batched, probs: Tensor, labels: Tensor, **kw) -> float:
    probs, labels = _check_inputs(probs, labels)
    identity = torch.arange(labels.shape[0])[None]  # (1, N): the data itself as one "resample"
    return _evaluate(metric, probs, labels, identity, **kw).item()


def _mean(term: Tensor, **_) -> Tensor:  # (R, n) -> (R,)
    return term.mean(1)


def _top_label(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Confidence max_c p_ic and correctness of argmax_c p_ic, (N,) each (ties: first class, as torch)."""
    conf, pred = probs.max(1)
    return conf, (pred == labels).double()


def _correct_terms(probs: Tensor, labels: Tensor, **_) -> tuple[Tensor]:
    return (_top_label(probs, labels)[1],)  # (N,)


def _nll_terms(probs: Tensor, labels: Tensor, eps: float = 1e-12, **_) -> tuple[Tensor]:
    p_y = probs.double().gather(1, labels[:, None]).squeeze(1)  # (N,)
    return (-p_y.clamp_min(eps).log(),)


def _brier_terms(probs: Tensor, labels: Tensor, **_) -> tuple[Tensor]:
    onehot = F.one_hot(labels, probs.shape[1])  # (N, C)
    return ((probs.double() - onehot).pow(2).sum(1),)  # (N,)


def _bin_index(conf: Tensor, n_bins: int) -> Tensor:
    """Bin of each confidence (N,) -> (N,) in [0, n_bins - 1] (see module docstring)."""
    edges = torch.linspace(0, 1, n_bins + 1)  # float32, as torchmetrics builds them
    return (torch.bucketize(conf.float(), edges, right=True) - 1).clamp(max=n_bins - 1)


def _calibration_terms(probs: Tensor, labels: Tensor, n_bins: int = 15, **_) -> tuple[Tensor, Tensor, Tensor]:
    conf, correct = _top_label(probs, labels)  # (N,), (N,)
    return _bin_index(conf, n_bins), conf.double(), correct


def _bin_sums(bins: Tensor, conf: Tensor, correct: Tensor, n_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin count, confidence sum and correct sum; inputs (R, n) -> outputs (R, n_slots) float64."""
    r = bins.shape[0]
    key = (bins + n_slots * torch.arange(r)[:, None]).flatten()  # (R*n,): one slot per (replicate, bin)
    weights = (torch.ones_like(conf), conf, correct)  # -> count, confidence sum, correct sum
    return tuple(torch.bincount(key, w.flatten(), minlength=r * n_slots).view(r, n_slots) for w in weights)


def _bin_gaps(bins: Tensor, conf: Tensor, correct: Tensor, n_bins: int = 15, **_) -> tuple[Tensor, Tensor]:
    """|acc(B_m) - conf(B_m)| and |B_m|/n per bin, (R, n_bins) each; an empty bin has gap 0."""
    count, conf_sum, correct_sum = _bin_sums(bins, conf, correct, n_bins)
    safe = count.clamp_min(1)  # empty bins have zero sums, so their gap is 0 (torchmetrics' nan_to_num)
    return (correct_sum / safe - conf_sum / safe).abs(), count / count.sum(1, keepdim=True)


def _ece_reduce(*columns: Tensor, **kw) -> Tensor:
    gaps, weights = _bin_gaps(*columns, **kw)
    return (gaps * weights).sum(1)


def _mce_reduce(*columns: Tensor, **kw) -> Tensor:
    return _bin_gaps(*columns, **kw)[0].amax(1)  # gaps >= 0 and empty bins give 0: max over non-empty bins


_ACCURACY = _Batched(_correct_terms, _mean)
_NLL = _Batched(_nll_terms, _mean)
_BRIER = _Batched(_brier_terms, _mean)
_ECE = _Batched(_calibration_terms, _ece_reduce)
_MCE = _Batched(_calibration_terms, _mce_reduce)


# ------------------------------------------------------------------------------------------ metrics


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy: (1/N) sum_i 1[argmax_c p_ic = y_i]."""
    return _scalar(_ACCURACY, probs, labels)


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)| (Guo et al. 2017, "On Calibration of Modern Neural
    Networks"), with confidence max_c p_ic and M = ``n_bins`` equal-width bins on [0, 1].

    Bins are [m/M, (m+1)/M) with the last one closed at 1; equal to torchmetrics'
    ``multiclass_calibration_error(norm="l1")`` unless a confidence is exactly 1.0 (module docstring).
    """
    _check_count("n_bins", n_bins)
    return _scalar(_ECE, probs, labels, n_bins=n_bins)


def maximum_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """MCE = max_m |acc(B_m) - conf(B_m)| over non-empty bins (Guo et al. 2017); bins as in
    :func:`expected_calibration_error`, matching torchmetrics' ``norm="max"``."""
    _check_count("n_bins", n_bins)
    return _scalar(_MCE, probs, labels, n_bins=n_bins)


def negative_log_likelihood(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> float:
    """NLL = -(1/N) sum_i log max(p_{i,y_i}, eps); the clamp keeps a zero probability finite."""
    return _scalar(_NLL, probs, labels, eps=eps)


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Multiclass Brier score (Brier 1950): (1/N) sum_i sum_c (p_ic - 1[c = y_i])^2, in [0, 2]."""
    return _scalar(_BRIER, probs, labels)


@dataclass(frozen=True)
class ReliabilityBins:
    """Reliability-diagram bins (Guo et al. 2017); plain lists, so ``dataclasses.asdict`` is JSON-able.

    Bin m covers [edges[m], edges[m+1]); the last bin also holds confidence exactly 1.0. Empty bins
    have ``count`` 0 and ``float('nan')`` confidence and accuracy (``json.dumps`` writes ``NaN``).
    """

    edges: list[float]  # n_bins + 1 boundaries, 0.0 ... 1.0
    confidence: list[float]  # n_bins: mean max-probability in the bin
    accuracy: list[float]  # n_bins: fraction correct in the bin
    count: list[int]  # n_bins: examples in the bin; sums to N


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Per-bin mean confidence, accuracy and count on ``n_bins`` equal-width bins of the confidence.

    The bins of :func:`expected_calibration_error`: sum_m count_m/N |accuracy_m - confidence_m| is the ECE.
    """
    _check_count("n_bins", n_bins)
    probs, labels = _check_inputs(probs, labels)
    bins, conf, correct = _calibration_terms(probs, labels, n_bins)  # (N,) each
    sums = _bin_sums(bins[None], conf[None], correct[None], n_bins)
    count, conf_sum, correct_sum = (s[0] for s in sums)  # (n_bins,) each
    return ReliabilityBins(
        edges=torch.linspace(0, 1, n_bins + 1).tolist(),
        confidence=(conf_sum / count).tolist(),  # 0/0 = nan for empty bins
        accuracy=(correct_sum / count).tolist(),
        count=count.long().tolist(),
    )


def summarize(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """All scalar metrics under the keys ``accuracy``, ``ece``, ``mce``, ``nll``, ``brier``."""
    return {
        "accuracy": accuracy(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "mce": maximum_calibration_error(probs, labels, n_bins),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
    }


def stacked_scores(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    """ECE, NLL and accuracy of S predictives of the same N examples at once: ``probs`` (S, N, C)
    -> {"ece", "nll", "accuracy"}: (S,) float64 each, exactly the scalar metrics of each row."""
    s, n, c = probs.shape
    flat, ys = probs.reshape(s * n, c), labels.repeat(s)  # (S N, C), (S N,)
    bins, conf, correct = (t.view(s, n) for t in _calibration_terms(flat, ys, n_bins))
    (nll,) = _nll_terms(flat, ys)
    return {
        "ece": _ece_reduce(bins, conf, correct, n_bins=n_bins),
        "nll": nll.view(s, n).mean(1),
        "accuracy": correct.mean(1),
    }


# ------------------------------------------------------------------------------ resampled metrics


_FAST: dict[Callable, _Batched] = {
    accuracy: _ACCURACY,
    expected_calibration_error: _ECE,
    maximum_calibration_error: _MCE,
    negative_log_likelihood: _NLL,
    brier_score: _BRIER,
}


def _fast_path(metric: Metric) -> tuple[_Batched, dict] | None:
    """The vectorised form of a built-in metric (or a keyword-only ``functools.partial`` of one)."""
    kw: dict = {}
    if isinstance(metric, functools.partial) and not metric.args:
        metric, kw = metric.func, dict(metric.keywords)
    batched = _FAST.get(metric)
    return None if batched is None else (batched, kw)


def replicate_values(metric: Metric, probs: Tensor, labels: Tensor, idx: Tensor) -> Tensor:
    """metric(probs[idx_r], labels[idx_r]) for each row idx_r of ``idx`` (R, n); returns (R,) float64.

    The built-in metrics (and keyword ``functools.partial`` s of them) run vectorised over all rows;
    ``replicate_values(m, a, y, idx) - replicate_values(m, b, y, idx)`` are the replicate differences of
    :func:`distlap.intervals.paired_bootstrap_ci`; any other metric runs in a loop.
    """
    probs, labels = _check_inputs(probs, labels)
    idx = torch.as_tensor(idx)
    if idx.ndim != 2 or idx.is_floating_point() or idx.dtype == torch.bool or idx.numel() == 0:
        raise ValueError(
            f"idx must be a non-empty 2-D integer tensor (R, n), got {idx.dtype} {tuple(idx.shape)}"
        )
    if idx.min() < 0 or idx.max() >= labels.shape[0]:
        raise ValueError(
            f"idx must index the {labels.shape[0]} examples, got values in [{idx.min()}, {idx.max()}]"
        )
    idx = idx.long()
    fast = _fast_path(metric)
    if fast is not None:
        batched, kw = fast
        return _evaluate(batched, probs, labels, idx, **kw)
    return torch.tensor([float(metric(probs[i], labels[i])) for i in idx], dtype=torch.float64)


# ------------------------------------------------------------------------------------ OOD detection


def predictive_entropy(probs: Tensor) -> Tensor:
    """H(p_i) = -sum_c p_ic log p_ic per row (0 log 0 = 0), in nats: (N, C) -> (N,) float64.

    The OOD score of Hendrycks & Gimpel (2017)'s baseline family: in-distribution inputs should have
    low entropy, so ``-predictive_entropy`` is the score to pass to :func:`auroc`.
    """
    probs = torch.as_tensor(probs).detach()
    if probs.ndim != 2 or not probs.is_floating_point() or probs.numel() == 0:
        raise ValueError(
            f"probs must be a non-empty 2-D float tensor (N, C), got {probs.dtype} {tuple(probs.shape)}"
        )
    p = probs.double().clamp_min(0)
    return -torch.special.xlogy(p, p).sum(1)


def _check_scores(name: str, scores: Tensor) -> Tensor:
    scores = torch.as_tensor(scores).detach()
    if scores.ndim != 1 or scores.numel() == 0 or not torch.isfinite(scores.double()).all():
        raise ValueError(
            f"{name} must be a non-empty 1-D tensor of finite scores, got "
            f"{scores.dtype} {tuple(scores.shape)}"
        )
    return scores.double()


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve with in-distribution as the positive class (higher score = "in").

    The Mann-Whitney statistic AUROC = P(s_in > s_out) + 1/2 P(s_in = s_out) over all n_in * n_out
    pairs (Hanley & McNeil 1982), i.e. ties count one half, as sklearn's ``roc_auc_score``. OOD
    detection scores (Hendrycks & Gimpel 2017): max-probability ``probs.max(1).values`` or
    ``-predictive_entropy(probs)``. O((n_in + n_out) log n_in) via a sorted search, float64.
    """
    s_in, s_out = _check_scores("scores_in", scores_in), _check_scores("scores_out", scores_out)
    ranked = s_in.sort().values  # (n_in,)
    below_or_equal = torch.searchsorted(ranked, s_out, right=True)  # (n_out,) #{s_in <= s}
    below = torch.searchsorted(ranked, s_out, right=False)  # (n_out,) #{s_in < s}
    greater = (s_in.numel() - below_or_equal).double()
    ties = (below_or_equal - below).double()
    return float((greater + 0.5 * ties).sum() / (s_in.numel() * s_out.numel()))


def ood_aurocs(probs_in: Tensor, probs_out: Tensor) -> dict[str, float]:
    """AUROC of telling ``probs_in`` (N_in, C) from ``probs_out`` (N_out, C) by max-probability
    (``auroc_maxprob``) and by negative predictive entropy (``auroc_entropy``); 0.5 = chance."""
    return {
        "auroc_maxprob": auroc(
            torch.as_tensor(probs_in).max(1).values, torch.as_tensor(probs_out).max(1).values
        ),
        "auroc_entropy": auroc(-predictive_entropy(probs_in), -predictive_entropy(probs_out)),
    }
