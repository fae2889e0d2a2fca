"""ECE and NLL of every coalition of blocks, and their bootstrap replicates, in batched tensor code.

The probit predictive of coalition S (bitmask row r of ``shapley.all_masks``) at example n is
p_S(. | x_n) = softmax(mu_n / sqrt(1 + pi/8 var_S,n)), var_S = sum_{b in S} v_b (``glm.subset_probs``'
maths in the pass's dtype, float32 from ``glm_pass``, in its own order of operations: float32 results
agree with subset_probs' to float32 round-off). The sums are built incrementally, one add per
(coalition, example, class): a chunk of 2^m coalitions shares its high bits H, and for its low bits T
    var(H + T) = var(H) + var(T),   var(T) = var(T - {t}) + v_t,   t the top block of T.
Per (coalition, example) only what the scores need is kept: confidence c = max_k p_k, correctness
a = 1[argmax_k p_k = y], calibration bin m (``distlap.metrics``' rule) and l = -log max(p_y, 1e-12).

A resample of the examples is its count weights w_n = #{j: idx_j = n}, n_w = sum_n w_n (= N). Since
|B_m|/n_w |acc(B_m) - conf(B_m)| = |sum_{n in B_m} w_n (a_n - c_n)| / n_w,
    ECE_w(S) = (1/n_w) sum_m |sum_n w_n (a_Sn - c_Sn) 1[m_Sn = m]|,   NLL_w(S) = (1/n_w) sum_n w_n l_Sn,
so every replicate of every coalition is one matmul: counts W (R, N) @ G (N, S M) and W @ L (N, S). The
data itself is w = 1, summed in float64; the replicates' matmuls run in ``Chunking.replicate_dtype``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NLL_EPS = 1e-12  # the clamp of metrics.negative_log_likelihood


@dataclass(frozen=True)
class Chunking:
    """Memory bounds: ``work_bytes`` for one block of probabilities (2^m, n, C) (cache-sized on a CPU),
    ``table_bytes`` for one chunk's ECE terms G (N, 2^m M) (and its (2^m, N) per-example terms); the
    dtype of the replicates' matmuls. Beside them: one scaled copy of the variances and the counts (R, N).
    """

    work_bytes: int = 2**23
    table_bytes: int = 2**28
    replicate_dtype: torch.dtype = torch.float64


@dataclass(frozen=True)
class Pass:
    """A GLM pass as the chunks read it: logits (N, C), pi/8 v_b as (L, N, C) (one block contiguous),
    labels (N,) int64, all on one device."""

    logits: Tensor
    scaled: Tensor
    labels: Tensor


@dataclass(frozen=True)
class Terms:
    """Per (coalition, example) of one chunk, (S, N) each."""

    gap: Tensor  # a - c, float64
    bins: Tensor  # calibration bin, int64
    nll: Tensor  # -log max(p_y, eps), float64


def bin_index(conf: Tensor, n_bins: int) -> Tensor:
    """``distlap.metrics._bin_index`` on ``conf``'s device: the same float32 edges, built on the CPU
    as torchmetrics builds them, bucketize(conf, edges, right=True) - 1, the last bin closed at 1."""
    edges = torch.linspace(0, 1, n_bins + 1).to(conf.device)
    return (torch.bucketize(conf.float(), edges, right=True) - 1).clamp(max=n_bins - 1)


def resample_counts(idx: Tensor, n: int) -> Tensor:
    """Count weights (R, N) float64 of resampled example indices ``idx`` (R, n_w)."""
    counts = torch.zeros(idx.shape[0], n, dtype=torch.float64, device=idx.device)
    return counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


def _variance_table(base: Tensor, low: Tensor) -> Tensor:
    """base + var(T) for every T over the m low blocks: base (n, C), low v_b (m, n, C) -> (2^m, n, C)."""
    table = base.new_empty(2 ** len(low), *base.shape)
    table[0] = base
    for t, v in enumerate(low):  # coalitions [2^t, 2^(t+1)) are those of [0, 2^t) plus block t
        torch.add(table[: 2**t], v, out=table[2**t : 2 ** (t + 1)])
    return table


def _correct(e: Tensor, e_y: Tensor, total: Tensor, labels: Tensor) -> Tensor:
    """1[argmax_k p_k = y] (S, n), ties to the first class as in ``distlap.metrics``. With p = e / s the
    top classes are those with e_k = 1; a second one needs s >= 2, so only those rows take the argmax."""
    correct = e_y == 1
    tied = correct & (total >= 2)
    if tied.any():
        correct[tied] = e[tied].argmax(-1) == labels.expand_as(correct)[tied]
    return correct


def _block_terms(logits: Tensor, scale: Tensor, labels: Tensor, n_bins: int) -> Terms:
    """Terms of one block: logits (n, C), scale = 1 + pi/8 var (S, n, C) (overwritten), labels (n,).

    z = mu / sqrt(scale); with e_k = exp(z_k - max z) and s = sum_k e_k the probabilities are e / s,
    so c = 1 / s and p_y = e_y / s (no normalised tensor is formed).
    """
    z = torch.div(logits, scale.sqrt_(), out=scale)
    e = z.sub_(z.amax(-1, keepdim=True)).exp_()  # (S, n, C), the top class at exp(0) = 1
    total = e.sum(-1)  # (S, n)
    e_y = e.gather(-1, labels.expand(len(e), -1)[..., None])[..., 0]
    conf = 1 / total.double()
    return Terms(
        gap=_correct(e, e_y, total, labels).double() - conf,
        bins=bin_index(conf, n_bins),
        nll=-(e_y.double() * conf).clamp_min(NLL_EPS).log(),
    )


def chunk_terms(glm: Pass, high: int, m: int, n_bins: int, block: int) -> Terms:
    """Terms of coalitions [high, high + 2^m) (high a multiple of 2^m), the examples in blocks of
    ``block``."""
    above = [b for b in range(m, len(glm.scaled)) if high >> b & 1]
    base = 1 + glm.scaled[above].sum(0)  # 1 + pi/8 var(H), (N, C)
    parts = []
    for start in range(0, len(glm.labels), block):
        rows = slice(start, start + block)
        scale = _variance_table(base[rows], glm.scaled[:m, rows])  # 1 + pi/8 var, (2^m, n, C)
        parts.append(_block_terms(glm.logits[rows], scale, glm.labels[rows], n_bins))
    return Terms(*(torch.cat([getattr(p, f) for p in parts], 1) for f in ("gap", "bins", "nll")))


def _ece(sums: Tensor, n_w: int) -> Tensor:
    """ECE from the per-bin sums of w (a - c), (..., S, M) -> (..., S) float64."""
    return sums.double().abs().sum(-1) / n_w


def chunk_values(terms: Terms, n_bins: int) -> dict[str, Tensor]:
    """ECE and NLL of the chunk's coalitions on the data (w = 1), (S,) float64 each."""
    s, n = terms.gap.shape
    key = terms.bins + n_bins * torch.arange(s, device=terms.bins.device)[:, None]
    sums = torch.bincount(key.flatten(), terms.gap.flatten(), minlength=s * n_bins).view(s, n_bins)
    return {"ece": _ece(sums, n), "nll": terms.nll.mean(1)}


def chunk_replicates(terms: Terms, counts: Tensor, n_bins: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """ECE and NLL of the chunk's coalitions on each resample (counts (R, N)), (R, S) float64 each."""
    s, n = terms.gap.shape
    n_w = round(counts[0].sum().item())
    slot = (terms.bins + n_bins * torch.arange(s, device=terms.bins.device)[:, None]).T  # (N, S)
    table = torch.zeros(n, s * n_bins, dtype=dtype, device=counts.device)
    table.scatter_(1, slot, terms.gap.T.to(dtype))  # G (N, S M): row n holds w-free a - c in its bin
    sums = (counts.to(dtype) @ table).view(-1, s, n_bins)  # (R, S, M)
    nll = counts @ terms.nll.T / n_w  # (R, S), float64: few flops, large terms
    return {"ece": _ece(sums, n_w), "nll": nll}


def _span(n: int, n_blocks: int, n_bins: int, chunking: Chunking) -> int:
    """m: the largest chunk of 2^m coalitions (m <= L) whose ECE terms G fit ``table_bytes``."""
    itemsize = torch.finfo(chunking.replicate_dtype).bits // 8
    per_coalition = n * max(n_bins * itemsize, 24)  # G's columns, or the (S, N) terms without bootstrap
    return min(n_blocks, max(0, int(math.log2(max(1, chunking.table_bytes // per_coalition)))))


def coalition_scores(
    logits: Tensor, variances: Tensor, labels: Tensor, n_bins: int, idx: Tensor | None, chunking: Chunking
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """{"ece", "nll"}: (scores of all 2^L coalitions (2^L,), their replicates on the resamples ``idx``
    (R, N) as (R, 2^L), or None without ``idx``), float64, on the device of ``logits``; row = bitmask.

    ``variances`` (N, L, C) >= 0 and ``logits`` (N, C) in one float dtype, which the probabilities use.
    """
    n, n_blocks, n_classes = variances.shape
    scaled = (math.pi / 8) * variances.transpose(0, 1).contiguous()  # (L, N, C)
    glm = Pass(logits, scaled, labels.to(logits.device).long())
    counts = None if idx is None else resample_counts(idx.to(logits.device), n)
    m = _span(n, n_blocks, n_bins, chunking)
    block = max(1, chunking.work_bytes // (2**m * n_classes * variances.element_size()))
    values, reps = {"ece": [], "nll": []}, {"ece": [], "nll": []}
    for high in range(0, 2**n_blocks, 2**m):
        terms = chunk_terms(glm, high, m, n_bins, block)
        for name, v in chunk_values(terms, n_bins).items():
            values[name].append(v)
        if counts is not None:
            for name, r in chunk_replicates(terms, counts, n_bins, chunking.replicate_dtype).items():
                reps[name].append(r)
    return {
        name: (torch.cat(values[name]), torch.cat(reps[name], 1) if counts is not None else None)
        for name in values
    }
