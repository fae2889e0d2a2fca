"""The restricted posterior taken from one fit over every block equals a fresh laplace-torch fit with only
S trainable (marginal variances, KFAC factors, the GLM probit predictive) and, for diag, the inverse of
the brute-force GGN diagonal summed here per example with torch.func."""

import pytest
import torch
from laplace_peer import fit

from distlap.bayes.glm import glm_pass, param_blocks, probit_probs
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


N_TRAIN = 480  # the fit's 48 examples stand for 480: likelihood curvature x 10 (temperature 48 / 480)


def _names_in(model, subset) -> list[str]:
    return [n for n in posterior_parameters(model, "lora", True) if block_index(n) in subset]


def _dense_ggn(model, names: list[str], dl) -> torch.Tensor:
    """The exact GGN over ``names``, dense and float64, by brute force: sum over the examples of
    J_n^T (diag(p_n) - p_n p_n^T) J_n, J_n the (C, P) Jacobian of ONE example's logits, row by row
    (one backward pass per example and class)."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    total = 0
    for x in torch.cat([x for x, _ in dl]):
        f = model(x[None])[0]  # (C,)
        rows = [torch.autograd.grad(f[c], params, retain_graph=True) for c in range(len(f))]
        J = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows]).double()  # (C, P)
        p = f.detach().softmax(-1).double()
        total = total + J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return total


@pytest.fixture(scope="module")
def diag_fit():
    """One diag fit over every block (distlap's, as the study makes it) and the brute-force GGN."""
    model, cfg = lora_model(), LaplaceConfig(hessian_structure="diag")
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=2.0, seed=0, n_train=N_TRAIN)
    ggn = _dense_ggn(model, posterior_parameters(model, "lora", True), loader())  # (P, P)
    return model, post, ggn


@pytest.mark.slow  # the brute-force GGN and a laplace-torch refit per subset
@pytest.mark.parametrize("subset", [(1,), (0, 2), (0, 1, 2, 3)])
def test_diag_marginal_is_a_laplace_torch_refit_and_the_brute_force_ggn(diag_fit, subset):
    """The restricted diag posterior of S, taken from ONE fit over every block: its marginal variances
    equal (a) a fresh laplace-torch fit (its Curvlinops GGN) with only S's tensors trainable and (b)
    1 / ((N/n) diag(GGN)_S + λ) with the GGN summed here by brute force."""
    model, post, ggn = diag_fit
    names = _names_in(model, subset)
    refit = fit(
        model, names, "diag", "curvlinops", prior_precision=2.0, temperature=48 / N_TRAIN, data=loader()
    )
    mask = post.mask(subset)
    brute = 1 / ((N_TRAIN / 48) * ggn.diagonal()[mask] + 2.0)
    assert mask.sum() == refit.n_params == len(brute)
    torch.testing.assert_close(post.variance[mask].double(), brute, rtol=1e-5, atol=0)
    torch.testing.assert_close(refit.posterior_variance.double(), brute, rtol=1e-5, atol=0)
    assert (brute < 0.25).float().mean() > 0.3  # curvature, not the prior alone (1 / λ = 0.5): LoRA B


def _kron_of(la, names: set[str], model) -> list[list[torch.Tensor]]:
    """laplace-torch's KFAC factors Q diag(l) Q^T of the tensors ``names`` (one [G, A] pair per LoRA
    weight), rebuilt from its eigendecomposition (eigenvectors are defined up to sign)."""
    ids = {id(p) for n, p in model.named_parameters() if n in names}
    H = la.H
    assert len(H.eigenvectors) == len(la.params)  # LoRA Linear layers have no bias: one pair per tensor
    factors = [
        [q @ torch.diag(e) @ q.T for q, e in zip(qs, ls, strict=True)]
        for qs, ls in zip(H.eigenvectors, H.eigenvalues)
    ]
    return [f for f, p in zip(factors, la.params, strict=True) if id(p) in ids]


@pytest.mark.slow  # a laplace-torch refit and its Jacobians per subset
@pytest.mark.parametrize("subset", [(1,), (0, 3)])
def test_kron_marginal_is_a_laplace_torch_refit(subset):
    """The restricted KFAC posterior of S from one fit over every block against a fresh laplace-torch
    fit with only S trainable: the same Kronecker factors, the same marginal covariance, the same GLM
    probit predictive (laplace-torch's own, on the refit), and samples with that covariance."""
    model = lora_model()
    cfg = LaplaceConfig(hessian_structure="kron", n_samples=4000, n_sample_sets=1)
    full = fit_laplace(model, posterior_parameters(model, "lora", True), loader(), cfg, 2.0, n_train=N_TRAIN)
    names = _names_in(model, subset)
    refit = fit(
        model, names, "kron", "curvlinops", prior_precision=2.0, temperature=48 / N_TRAIN, data=loader()
    )
    for ours, theirs in zip(
        _kron_of(full, set(names), model), _kron_of(refit, set(names), model), strict=True
    ):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=2.0, seed=0, n_train=N_TRAIN)
    mask = post.mask(subset)
    cov = full.posterior_precision.to_matrix(exponent=-1)[mask][:, mask]
    theirs = refit.posterior_precision.to_matrix(exponent=-1)
    torch.testing.assert_close(cov, theirs, rtol=1e-4, atol=1e-6)
    assert (theirs - torch.diag(theirs.diagonal())).abs().max() > 1e-4  # KFAC couples within a tensor
    test = loader(n=16, seed=1)
    table = glm_pass(model, full, param_blocks(model, full), test, torch.device("cpu"))
    expected = torch.cat([refit(x, pred_type="glm", link_approx="probit") for x, _ in test])
    torch.testing.assert_close(
        probit_probs(table.logits, table.variances, subset), expected, rtol=0, atol=1e-5
    )
    torch.testing.assert_close(post.deltas[:, mask].var(0), theirs.diagonal(), rtol=0.12, atol=0)


def test_samples_follow_the_posterior():
    model = lora_model()
    cfg = LaplaceConfig(hessian_structure="diag", n_samples=10000, n_sample_sets=2)
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=2.0, seed=0)
    assert post.deltas.shape == (20000, post.n_params) and post.n_sets == 2  # n_samples per set
    torch.testing.assert_close(post.deltas.var(0), post.variance, rtol=0.06, atol=0)
    again = build_posterior(
        model,
        "lora",
        loader(),
        cfg.model_copy(update={"n_samples": 3, "n_sample_sets": 1}),
        prior_precision=2.0,
        seed=0,
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
