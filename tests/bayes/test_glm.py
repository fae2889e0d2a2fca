"""The one-pass GLM engine (distlap.bayes.glm) against independent laplace-torch fits per subset.

Peer: for each subset S a NEW laplace-torch ``Laplace`` in which only S's parameters are trainable (same
fit data, prior precision, prior mean and temperature), ``la_S(x, pred_type="glm", link_approx="probit")``.
"""

import laplace
import pytest
import torch
from laplace_peer import (
    CONFIGS,
    CPU,
    PRIOR,
    SUBSETS,
    fit,
    inputs,
    loader,
    lora_model,
    lora_names,
    refit,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

from distlap.bayes.glm import glm_pass, param_blocks, probit_probs, subset_metrics
from distlap.bayes.layers import block_index
from distlap.metrics import accuracy, expected_calibration_error, negative_log_likelihood


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: "-".join(c))
def fitted(request):
    structure, backend = request.param
    model = lora_model()
    la = fit(model, lora_names(model), structure, backend)
    return model, la, structure, backend


def test_param_blocks_follow_laplace_torch_order(fitted):
    model, la, *_ = fitted
    names = lora_names(model)
    assert la.n_params == sum(p.numel() for p in la.params)
    assert param_blocks(model, la) == [block_index(n) for n in names]


@pytest.mark.slow
def test_subset_probit_equals_a_refit_with_only_the_subset_trainable(fitted):
    model, la, structure, backend = fitted
    test = loader(n=20, seed=1, batch_size=8)
    table = glm_pass(model, la, param_blocks(model, la), test, CPU)
    assert table.variances.shape == (20, 4, 3) and table.logits.dtype == torch.float32
    map_probs = torch.softmax(table.logits, -1)
    for subset in SUBSETS:
        theirs = refit(model, structure, backend, subset)(inputs(test), pred_type="glm", link_approx="probit")
        ours = probit_probs(table.logits, table.variances, subset)
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)
        assert (ours - map_probs).abs().max() > 1e-2, "the posterior must move the predictive (non-vacuous)"


def test_empty_subset_is_the_map_from_the_same_pass(fitted):
    model, la, *_ = fitted
    test = loader(n=20, seed=1, batch_size=8)
    table = glm_pass(model, la, param_blocks(model, la), test, CPU)
    assert torch.equal(probit_probs(table.logits, table.variances, ()), torch.softmax(table.logits, -1))
    with torch.no_grad():
        torch.testing.assert_close(table.logits, model(inputs(test)), rtol=1e-6, atol=1e-6)
    assert torch.equal(table.labels, torch.cat([y for _, y in test]))


def test_lambda_grid_equals_one_pass_per_lambda(fitted):
    """Sigma_b(lambda) = (factor H_b + lambda)^-1 for each grid point, as laplace-torch adds lambda."""
    model, la, *_ = fitted
    test, grid = loader(n=12, seed=2, batch_size=6), [0.1, 1.0, 30.0]
    blocks = param_blocks(model, la)
    table = glm_pass(model, la, blocks, test, CPU, prior_precisions=grid)
    assert table.variances.shape == (3, 12, 4, 3)
    try:
        for g, lam in enumerate(grid):
            la.prior_precision = lam
            single = glm_pass(model, la, blocks, test, CPU)
            torch.testing.assert_close(table.at(g), single.variances, rtol=1e-5, atol=0)
    finally:
        la.prior_precision = PRIOR
    assert (table.variances[0] > table.variances[2]).all()  # more prior precision, less variance


def test_subset_metrics_are_distlap_metrics_on_each_subset():
    model = lora_model()
    la = fit(model, lora_names(model), "diag", "exact")
    table = glm_pass(model, la, param_blocks(model, la), loader(n=40, seed=3, batch_size=16), CPU)
    masks = (torch.arange(16)[:, None] >> torch.arange(4)) & 1 == 1  # all 2^4 subsets
    scores = subset_metrics(table.logits, table.variances, table.labels, masks, n_bins=5, max_bytes=1000)
    for r, mask in enumerate(masks):
        probs = probit_probs(table.logits, table.variances, mask.nonzero().flatten().tolist())
        assert scores["ece"][r].item() == pytest.approx(
            expected_calibration_error(probs, table.labels, 5), abs=1e-12
        )
        nll = negative_log_likelihood(probs, table.labels)
        assert scores["nll"][r].item() == pytest.approx(nll, abs=1e-12)
        assert scores["accuracy"][r].item() == accuracy(probs, table.labels)
    assert scores["ece"].std() > 0


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_memory_is_bounded_by_the_batch_not_by_n():
    """No op of the pass produces anything growing with N, nor even one batch's Jacobian (b x C x P)."""
    model = lora_model()
    la = fit(model, lora_names(model), "kron", "curvlinops")
    blocks, largest = param_blocks(model, la), {}
    for n in (24, 96):
        data = loader(n=n, seed=4, batch_size=8)
        with LargestTensor() as mode:
            glm_pass(model, la, blocks, data, CPU, prior_precisions=[1.0, 10.0])
        largest[n] = mode.largest
    assert largest[24] == largest[96]
    assert largest[96] < 8 * 3 * la.n_params < 96 * 3 * la.n_params


def test_damped_kron_and_uncovered_modules_are_refused():
    model = lora_model()
    la = laplace.Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="kron", damping=True
    )
    with pytest.raises(ValueError, match="damping"):
        glm_pass(model, la, [0] * len(la.params), loader(n=4), CPU)
    conv = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    la = laplace.Laplace(conv, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(DataLoader(TensorDataset(torch.randn(6, 1, 4), torch.randint(0, 3, (6,))), batch_size=3))
    with pytest.raises(ValueError, match="0.weight belongs to a Conv1d"):
        glm_pass(
            conv,
            la,
            [0] * len(la.params),
            DataLoader(TensorDataset(torch.randn(2, 1, 4), torch.zeros(2))),
            CPU,
        )
