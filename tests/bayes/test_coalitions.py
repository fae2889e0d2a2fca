"""The pieces of the batched coalition scores (distlap.bayes.coalitions): the incremental variance table
against the mask matmul of glm.subset_probs, the calibration bins against distlap.metrics' rule, the
resample counts against the indices. Their scores against the scalar metrics per coalition and per
resample: tests/bayes/test_attribution.py."""

import math

import torch

from distlap import metrics
from distlap.bayes import coalitions as K
from distlap.bayes import shapley
from distlap.intervals import bootstrap_indices


def test_variance_table_is_the_sum_over_each_coalition_of_its_blocks():
    """Chunks of 2^2 coalitions of 4 blocks: base 1 + pi/8 var(high bits), doubled over the low bits,
    equals 1 + pi/8 (masks @ variances) row by row (row = bitmask)."""
    g = torch.Generator().manual_seed(0)
    variances = torch.rand(6, 4, 3, generator=g, dtype=torch.float64)  # (N, L, C)
    glm = K.Pass(torch.zeros(6, 3), math.pi / 8 * variances.transpose(0, 1), torch.zeros(6))
    masks = torch.as_tensor(shapley.all_masks(4), dtype=torch.float64)  # (16, L)
    expected = 1 + math.pi / 8 * torch.einsum("sb,nbc->snc", masks, variances)  # (16, N, C)
    for high in range(0, 16, 4):
        above = [b for b in range(2, 4) if high >> b & 1]
        base = 1 + glm.scaled[above].sum(0)
        table = K._variance_table(base, glm.scaled[:2])
        torch.testing.assert_close(table, expected[high : high + 4], rtol=0, atol=1e-15)


def test_bins_follow_the_metrics_rule_at_the_edges():
    edges = torch.linspace(0, 1, 16)
    conf = torch.cat([edges, edges.double() + 1e-9, edges.double() - 1e-9, torch.rand(500).double()])
    conf = conf.clamp(0, 1)
    assert torch.equal(K.bin_index(conf, 15), metrics._bin_index(conf, 15))


def test_resample_counts_are_the_multiplicities_of_the_indices():
    idx = bootstrap_indices(50, 8, seed=3)
    counts = K.resample_counts(idx, 50)
    assert torch.equal(counts, torch.stack([torch.bincount(r, minlength=50) for r in idx]).double())
