import math

import numpy as np
import pytest
import torch
from scipy import stats

from distlap import intervals as I
from distlap import seed_intervals as S


def test_seed_t_interval_hand_computed():
    ci = S.seed_t_interval(torch.tensor([1.0, 2.0, 3.0]), level=0.95)
    half = 4.302652729911275 / math.sqrt(3)  # t_{2, 0.975} * s / sqrt(n), s = 1
    got = (ci.estimate.item(), ci.low.item(), ci.high.item())
    assert got == pytest.approx((2, 2 - half, 2 + half), abs=1e-9)
    ref = stats.t.interval(0.9, 4, loc=np.mean([1, 4, 2, 8, 5]), scale=stats.sem([1, 4, 2, 8, 5]))
    two_cols = S.seed_t_interval(torch.tensor([[1.0, 0], [4, 0], [2, 0], [8, 0], [5, 0]]), level=0.9)
    assert (two_cols.low[0].item(), two_cols.high[0].item()) == pytest.approx(ref, abs=1e-12)
    assert (two_cols.low[1].item(), two_cols.high[1].item(), two_cols.method) == (0.0, 0.0, "t")


def _seed_reps(values, names=("x",)):
    values = torch.as_tensor(values, dtype=torch.float64)[None]  # (1, R)
    return I.Replicates(tuple(names), values.mean(1), values)


def test_across_seeds_crossed_vs_nested_examples():
    """No seed effect, every seed the same example replicates. Shared test set (crossed): all seeds move
    with the same resample, so the width is one seed's width. Nested: n independent draws average out."""
    base = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    per_seed = [_seed_reps(base) for _ in range(9)]
    one = I.percentile_interval(base)
    shared = S.across_seeds(per_seed, shared_examples=True, n_resamples=4000)
    nested = S.across_seeds(per_seed, shared_examples=False, n_resamples=4000)

    def width(rep):
        low, high = I.percentile_interval(rep.replicates[0])
        return (high - low).item()

    assert width(shared) == pytest.approx((one[1] - one[0]).item(), rel=0.1)
    assert width(nested) == pytest.approx((one[1] - one[0]).item() / 3, rel=0.15)  # sqrt(9) = 3
    assert shared.seed_std.item() == pytest.approx(0.0, abs=1e-15)
    assert shared.estimate.item() == pytest.approx(base.mean().item())


def test_across_seeds_adds_the_seed_spread():
    """Seed effects of sd 1, tiny example noise: the interval reflects the seeds, centred on their mean."""
    g = torch.Generator().manual_seed(1)
    effects = torch.randn(8, generator=g)
    per_seed = [_seed_reps(e + 0.01 * torch.randn(500, generator=g)) for e in effects]
    rep = S.across_seeds(per_seed, shared_examples=True, n_resamples=3000, seed=2)
    low, high = I.percentile_interval(rep.replicates[0])
    t = S.seed_t_interval(torch.stack([r.estimate[0] for r in per_seed]))
    assert rep.estimate.item() == pytest.approx(t.estimate.item(), abs=1e-12)
    assert low < rep.estimate.item() < high and (high - low) > 0.5 * (t.high - t.low).item()
    assert rep.seed_std.item() == pytest.approx(effects.std().item(), abs=0.02)
    ci = S.across_seeds_ci(per_seed, shared_examples=True, n_resamples=3000, seed=2)
    assert (ci.low.item(), ci.high.item(), ci.method, ci.n_seeds) == (
        low.item(),
        high.item(),
        "hierarchical-bootstrap",
        8,
    )


def test_across_seeds_refuses_mismatched_names():
    with pytest.raises(ValueError, match="same names"):
        S.across_seeds([_seed_reps([1.0, 2.0]), _seed_reps([1.0, 2.0], names=("y",))], shared_examples=True)
    with pytest.raises(ValueError, match="n_resamples"):
        S.across_seeds([_seed_reps([1.0, 2.0])] * 2, shared_examples=True, n_resamples=0)


def test_one_seed_is_refused_by_name():
    with pytest.raises(ValueError, match="n_seeds >= 2"):
        S.seed_t_interval(torch.tensor([1.0]))
