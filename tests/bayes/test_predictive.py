"""Predictives against laplace-torch's own and against independent code paths."""

import pytest
import torch

from distlap.bayes.posterior import build_posterior, fit_laplace, posterior_parameters
from distlap.bayes.predictive import ViTSuffix, glm_predictive, nn_predictive
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
    model, cfg = lora_model(), LaplaceConfig(hessian_structure=structure, n_samples=7)
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=5.0, seed=3)
    la = fit_laplace(model, posterior_parameters(model, "lora", True), loader(), cfg, prior_precision=5.0)
    test = loader(n=20, seed=1)
    ours, labels = nn_predictive(model, post, (0, 1, 2, 3), test, CPU)
    x = torch.cat([b[0] for b in test])
    # (la(x, pred_type="nn") ignores its generator in laplace-torch 0.3; predictive_samples honours it)
    theirs = la.predictive_samples(x, pred_type="nn", n_samples=7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs.mean(0).float(), rtol=1e-4, atol=1e-5)
    assert labels.shape == (20,)


def test_prefix_cache_changes_nothing():
    model = lora_model()
    post = build_posterior(model, "lora", loader(), LaplaceConfig(n_samples=4), prior_precision=5.0, seed=0)
    test = loader(n=20, seed=1)
    runner = ViTSuffix.try_build(model, torch.randn(2, 1, 28, 28))
    for blocks in [(2,), (1, 3), (0, 1, 2, 3)]:
        cached, _ = nn_predictive(model, post, blocks, test, CPU, runner)
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
        torch.testing.assert_close(probs, torch.softmax(model(x), -1))


def test_glm_probit_matches_laplace_torch():
    model, cfg = lora_model(), LaplaceConfig(hessian_structure="diag")
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=5.0, seed=0)
    la = fit_laplace(model, posterior_parameters(model, "lora", True), loader(), cfg, prior_precision=5.0)
    test = loader(n=12, seed=1)
    ours, _ = glm_predictive(model, post, {"all": (0, 1, 2, 3)}, test, CPU, "probit", chunk=5)
    x = torch.cat([b[0] for b in test])
    theirs = la(x, pred_type="glm", link_approx="probit")
    torch.testing.assert_close(ours["all"], theirs.float(), rtol=1e-4, atol=1e-5)


def test_glm_mc_is_the_linearised_model_at_each_sample():
    """softmax(f(theta*) + J delta) with J delta from a forward-mode JVP (an independent code path)."""
    from torch.func import functional_call, jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = lora_model()
    post = build_posterior(
        model,
        "lora",
        loader(),
        LaplaceConfig(hessian_structure="kron", n_samples=3),
        prior_precision=5.0,
        seed=0,
    )
    blocks = (1, 2)
    test = loader(n=6, seed=1)
    ours, _ = glm_predictive(model, post, {"s": blocks}, test, CPU, "mc")
    x = torch.cat([b[0] for b in test])
    named = dict(model.named_parameters())
    names = [p.name for p in post.params]
    masked = post.deltas * post.mask(blocks)
    probs = 0
    for delta in masked:
        tangents = {p.name: delta[p.start : p.start + p.numel].view_as(named[p.name]) for p in post.params}
        primals = {n: named[n].detach() for n in names}
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no forward-mode AD
            mu, jd = jvp(lambda ps: functional_call(model, ps, (x,)), (primals,), (tangents,))
        probs = probs + torch.softmax(mu + jd, -1)
    torch.testing.assert_close(ours["s"], probs / len(masked), rtol=1e-4, atol=1e-5)


def test_probit_needs_diag():
    model = lora_model()
    post = build_posterior(
        model,
        "lora",
        loader(),
        LaplaceConfig(hessian_structure="kron", n_samples=2),
        prior_precision=1.0,
        seed=0,
    )
    with pytest.raises(ValueError, match="link_approx=probit needs laplace.hessian_structure=diag"):
        glm_predictive(model, post, {"all": (0,)}, loader(n=4), CPU, "probit")
