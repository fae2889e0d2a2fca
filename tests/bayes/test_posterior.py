"""The restricted posterior taken from one fit equals a fresh laplace-torch fit with only S trainable."""

import pytest
import torch

from distlap.bayes.layers import block_index
from distlap.bayes.posterior import GRID, build_posterior, fit_laplace, posterior_parameters
from distlap.config import LaplaceConfig
from helpers import loader, lora_model


@pytest.mark.parametrize(
    "method, include_norms, expect, refuse",
    [
        ("lora", True, ["lora_A", "lora_B"], ["layernorm", "classifier"]),
        ("hybrid", False, ["lora_A"], ["layernorm", "classifier"]),
        ("hybrid", True, ["lora_A", "layernorm_before"], ["classifier"]),
        ("norm", True, ["layernorm_after"], ["lora_", "classifier", "vit.layernorm."]),
    ],
)
def test_posterior_parameters(method, include_norms, expect, refuse):
    names = posterior_parameters(lora_model(method), method, include_norms)
    assert all(block_index(n) is not None for n in names)
    for part in expect:
        assert any(part in n for n in names)
    for part in refuse:
        assert not any(part in n for n in names)


def test_norm_without_norms_has_nothing_to_cover():
    with pytest.raises(ValueError, match="leaves no tuned parameter"):
        posterior_parameters(lora_model("norm"), "norm", include_norms=False)


@pytest.mark.parametrize("subset", [(1,), (0, 2), (3,), (0, 1, 2, 3)])
def test_diag_marginal_equals_refit_with_only_subset(subset):
    model, cfg = lora_model(), LaplaceConfig(hessian_structure="diag")
    names = posterior_parameters(model, "lora", True)
    full = fit_laplace(model, names, loader(), cfg, prior_precision=2.0)
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=2.0, seed=0)
    only = fit_laplace(
        model, [n for n in names if block_index(n) in subset], loader(), cfg, prior_precision=2.0
    )
    mask = post.mask(subset)
    torch.testing.assert_close(full.posterior_variance[mask], only.posterior_variance)
    torch.testing.assert_close(post.variance[mask], only.posterior_variance.float())


@pytest.mark.parametrize("subset", [(1,), (0, 3)])
def test_kron_marginal_equals_refit_with_only_subset(subset):
    model, cfg = lora_model(), LaplaceConfig(hessian_structure="kron")
    names = posterior_parameters(model, "lora", True)
    full = fit_laplace(model, names, loader(), cfg, prior_precision=2.0)
    only = fit_laplace(
        model, [n for n in names if block_index(n) in subset], loader(), cfg, prior_precision=2.0
    )
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=2.0, seed=0)
    mask = post.mask(subset)
    cov = full.posterior_precision.to_matrix(exponent=-1)  # (P, P)
    only_cov = only.posterior_precision.to_matrix(exponent=-1)
    torch.testing.assert_close(cov[mask][:, mask], only_cov, rtol=1e-4, atol=1e-6)
    # block-diagonal: S is uncorrelated with the rest, so zeroing deviations outside S is exact
    assert cov[mask][:, ~mask].abs().max() < 1e-6


def test_samples_follow_the_posterior():
    model = lora_model()
    cfg = LaplaceConfig(hessian_structure="diag", n_samples=20000, n_sample_sets=1)
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=2.0, seed=0)
    assert post.deltas.shape == (20000, post.n_params)
    torch.testing.assert_close(post.deltas.var(0), post.variance, rtol=0.06, atol=0)
    again = build_posterior(
        model, "lora", loader(), cfg.model_copy(update={"n_samples": 3}), prior_precision=2.0, seed=0
    )
    torch.testing.assert_close(again.deltas, post.deltas[:3])  # seeded: the same first draws


def test_fit_subset_curvature_is_scaled_to_the_training_set():
    """Fit on n of N examples: posterior precision = (N / n) GGN_n + lambda."""
    model, cfg = lora_model(), LaplaceConfig(hessian_structure="diag")
    names = posterior_parameters(model, "lora", True)
    plain = fit_laplace(model, names, loader(), cfg, prior_precision=2.0)
    scaled = fit_laplace(model, names, loader(), cfg, prior_precision=2.0, n_train=480)
    torch.testing.assert_close(scaled.posterior_precision, 10 * plain.H + 2.0)


def test_prior_methods_choose_lambda():
    """marglik: the exact maximiser of the evidence (laplace-torch's own evidence is flat there);
    gridsearch: the validation scorer's best grid point."""
    model = lora_model()
    marglik = build_posterior(
        model, "lora", loader(), LaplaceConfig(prior_method="marglik"), prior_precision=1.0, seed=0
    )
    la = fit_laplace(model, posterior_parameters(model, "lora", True), loader(), LaplaceConfig(), 1.0)
    evidence = [
        la.log_marginal_likelihood(torch.tensor(marglik.prior_precision * f)).item() for f in (0.9, 1, 1.1)
    ]
    assert marglik.prior_precision != 1.0 and evidence[1] >= max(evidence[0], evidence[2])
    seen = []
    grid = build_posterior(
        model,
        "lora",
        loader(),
        LaplaceConfig(prior_method="gridsearch", n_samples=2),
        prior_precision=1.0,
        seed=0,
        val_nll=lambda post: seen.append(post.prior_precision) or abs(post.prior_precision - 10),
    )
    assert len(seen) == len(GRID) and grid.prior_precision == pytest.approx(10.0)
    with pytest.raises(ValueError, match="validation scorer"):
        build_posterior(
            model, "lora", loader(), LaplaceConfig(prior_method="gridsearch"), prior_precision=1.0, seed=0
        )


def test_asdl_refuses_hybrid_layernorm_copies():
    model = lora_model("hybrid")
    names = posterior_parameters(model, "hybrid", include_norms=True)
    with pytest.raises(ValueError, match="backend=asdl cannot fit the LayerNorm copies"):
        fit_laplace(model, names, loader(), LaplaceConfig(backend="asdl"), prior_precision=1.0)


def test_the_fit_is_centred_on_the_maps_prior_mean():
    model = lora_model()
    names = posterior_parameters(model, "lora", True)
    means = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters() if n in names}
    la = fit_laplace(model, names, loader(), LaplaceConfig(), 2.0, prior_mean=means)
    assert torch.equal(la.prior_mean, torch.full((la.n_params,), 0.5))
