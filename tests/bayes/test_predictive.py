"""Predictives against laplace-torch's own and against independent code paths."""

import pytest
import torch

from distlap.bayes.posterior import build_posterior, fit_laplace, posterior_parameters
from distlap.bayes.predictive import ViTSuffix, nn_predictive
from distlap.config import LaplaceConfig
from helpers import loader, lora_model

CPU = torch.device("cpu")


def test_suffix_reproduces_the_full_forward_from_every_block():
    model = lora_model()
    x = torch.randn(5, 1, 28, 28)
    runner = ViTSuffix.try_build(model, x)
    assert runner is not None
    with torch.no_grad():
        full = model(x)
        for start in range(len(runner.blocks) + 1):
            torch.testing.assert_close(runner.logits(runner.prefix(x, start), start), full)


def test_suffix_refuses_models_it_cannot_split():
    assert ViTSuffix.try_build(torch.nn.Linear(3, 2), torch.randn(2, 3)) is None


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_nn_predictive_matches_laplace_torch(structure):
    """Same seed -> the same posterior samples -> laplace-torch's nn predictive, on the 'all' subset."""
    model, cfg = lora_model(), LaplaceConfig(hessian_structure=structure, n_samples=7, n_sample_sets=1)
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=5.0, seed=3)
    la = fit_laplace(model, posterior_parameters(model, "lora", True), loader(), cfg, prior_precision=5.0)
    test = loader(n=20, seed=1)
    ours, labels = nn_predictive(model, post, (0, 1, 2, 3), test, CPU)
    x = torch.cat([b[0] for b in test])
    # (la(x, pred_type="nn") ignores its generator in laplace-torch 0.3; predictive_samples honours it)
    theirs = la.predictive_samples(x, pred_type="nn", n_samples=7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours[0], theirs.mean(0).float(), rtol=1e-4, atol=1e-5)
    assert ours.shape == (1, 20, 3) and labels.shape == (20,)


def test_sample_sets_are_consecutive_independent_draws():
    """3 sets of 4: set k is the mean over draws 4k..4k+3 of laplace-torch's 12 samples (same seed), so
    the mean over sets is the 12-sample predictive and the sets differ (they are independent)."""
    model, cfg = lora_model(), LaplaceConfig(n_samples=4, n_sample_sets=3)
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=5.0, seed=3)
    la = fit_laplace(model, posterior_parameters(model, "lora", True), loader(), cfg, prior_precision=5.0)
    test = loader(n=20, seed=1)
    ours, _ = nn_predictive(model, post, (0, 1, 2, 3), test, CPU)
    x = torch.cat([b[0] for b in test])
    theirs = la.predictive_samples(
        x, pred_type="nn", n_samples=12, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(ours, theirs.float().reshape(3, 4, 20, 3).mean(1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours[0], ours[1])


def test_prefix_cache_changes_nothing():
    model = lora_model()
    post = build_posterior(model, "lora", loader(), LaplaceConfig(n_samples=4), prior_precision=5.0, seed=0)
    test = loader(n=20, seed=1)
    runner = ViTSuffix.try_build(model, torch.randn(2, 1, 28, 28))
    for blocks in [(2,), (1, 3), (0, 1, 2, 3)]:
        cached, _ = nn_predictive(model, post, blocks, test, CPU, runner)  # (3 sets, N, C)
        plain, _ = nn_predictive(model, post, blocks, test, CPU, None)
        torch.testing.assert_close(cached, plain)


def test_parameters_are_restored_to_the_map():
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    post = build_posterior(model, "lora", loader(), LaplaceConfig(n_samples=3), prior_precision=1.0, seed=0)
    nn_predictive(model, post, (1,), loader(n=8), CPU)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_zero_variance_subset_is_the_map():
    model = lora_model()
    post = build_posterior(model, "lora", loader(), LaplaceConfig(n_samples=3), prior_precision=1.0, seed=0)
    post.deltas.zero_()
    probs, _ = nn_predictive(model, post, (0, 1), loader(n=8), CPU)
    x = torch.cat([b[0] for b in loader(n=8)])
    with torch.no_grad():
        for each_set in probs:
            torch.testing.assert_close(each_set, torch.softmax(model(x), -1))


def test_sampling_never_aliases_the_map():
    """Samples are copied into the parameters' own storage: θ* stays what it was, and the parameters
    are not views of the posterior's vectors afterwards (vector_to_parameters would make them so)."""
    model = lora_model()
    post = build_posterior(model, "lora", loader(), LaplaceConfig(n_samples=3), prior_precision=1.0, seed=0)
    theta = post.theta_map.clone()
    nn_predictive(model, post, (0, 1, 2, 3), loader(n=8), CPU)
    assert torch.equal(post.theta_map, theta)
    named = dict(model.named_parameters())
    first = named[post.params[0].name]
    assert first.data_ptr() != post.theta_map.data_ptr()
    with torch.no_grad():
        first.add_(1.0)
    assert torch.equal(post.theta_map, theta)
