"""A GLM pass over contiguous shards (distlap.bayes.glm_shards) equals the one pass over all the data."""

import pickle

import pytest
import torch
from laplace_peer import CPU, fit, loader, lora_model, lora_names
from torch.utils.data import DataLoader

from distlap.bayes.glm import glm_pass, param_blocks, prepare_pass, probit_probs, run_pass
from distlap.bayes.glm_shards import shard_bounds, sharded

GRID = [0.1, 1.0, 30.0]


@pytest.fixture(scope="module", params=[("diag", "exact"), ("kron", "curvlinops")], ids="-".join)
def fitted(request):
    model = lora_model()
    la = fit(model, lora_names(model), *request.param)
    return model, la, param_blocks(model, la)


def test_shard_bounds_are_contiguous_and_even():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(5, 1) == [(0, 5)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2)]  # never an empty shard
    for n, k in ((19, 2), (19, 3), (7, 7), (100, 6)):
        bounds = shard_bounds(n, k)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        assert max(h - lo for lo, h in bounds) - min(h - lo for lo, h in bounds) <= 1
    with pytest.raises(ValueError, match="k >= 1"):
        shard_bounds(5, 0)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("grid", [None, GRID], ids=["own-prior", "grid"])
def test_sharded_pass_equals_the_unsharded_pass(fitted, k, grid):
    """19 examples in batches of 8: the shards (19, 9+10, 6+6+7) cut batches unevenly. Variances of order
    10 agree to 1e-6 relative (fp32 rounding of other batch shapes), probabilities to 1e-6 absolute."""
    model, la, blocks = fitted
    data = loader(n=19, seed=3, batch_size=8)
    whole = glm_pass(model, la, blocks, data, CPU, grid)
    parts = glm_pass(model, la, blocks, data, CPU, grid, run=sharded(k))
    assert parts.variances.shape == whole.variances.shape
    torch.testing.assert_close(parts.logits, whole.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(parts.variances, whole.variances, rtol=1e-6, atol=1e-6)
    assert torch.equal(parts.labels, whole.labels)
    for subset in ((), (1,), (0, 2, 3)):
        torch.testing.assert_close(
            probit_probs(parts.logits, parts.at(0), subset),
            probit_probs(whole.logits, whole.at(0), subset),
            rtol=0,
            atol=1e-6,
        )
    assert parts.prior_precisions is whole.prior_precisions or torch.equal(
        parts.prior_precisions, whole.prior_precisions
    )


def test_a_pass_runs_on_a_deserialised_copy_of_model_and_posterior(fitted):
    """What a Ray task gets: pickled copies; the tensors are found by name, not by object identity."""
    model, la, blocks = fitted
    data = loader(n=10, seed=4, batch_size=4)
    prepared = prepare_pass(model, la, blocks, GRID)
    copy_model, copy_prepared = pickle.loads(pickle.dumps((model, prepared)))
    theirs = run_pass(copy_model, copy_prepared, data, CPU)
    ours = run_pass(model, prepared, data, CPU)
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=0, atol=0)
    torch.testing.assert_close(theirs.variances, ours.variances, rtol=0, atol=0)


def test_a_shuffled_loader_is_refused(fitted):
    model, la, blocks = fitted
    data = loader(n=10, seed=4, batch_size=4)
    shuffled = DataLoader(data.dataset, batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        glm_pass(model, la, blocks, shuffled, CPU, run=sharded(2))
