"""One Laplace fit over the tuned block parameters, and restricted posteriors for layer subsets.

The Laplace approximation (MacKay 1992; Daxberger et al. 2021, "Laplace Redux") around the MAP
theta* of the tuned parameters is q(theta) = N(theta*, Sigma), Sigma = (GGN + lambda I)^-1, fitted
once with laplace-torch (``subset_of_weights="all"`` over the parameters with ``requires_grad``).

Restricted posterior for a subset S of transformer blocks: parameters of blocks in S keep their
posterior marginal N(theta*_S, Sigma_SS), all others stay at the MAP. For ``diag`` and ``kron``,
Sigma is block-diagonal over parameter tensors (kron: over modules), and no block straddles two
transformer blocks, so Sigma_SS is the posterior of a fit with only S trainable and a sample of the
restricted posterior is a full-posterior sample with the deviations outside S set to zero. One fit and
one set of samples therefore serve every subset, and all subsets share their random numbers (paired
comparisons between subsets have less Monte-Carlo noise).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from distlap.bayes.layers import block_index
from distlap.config import LaplaceConfig

# laplace-torch backend classes by config name (``exact``: distlap.bayes.curvature.ExactDiagGGN).
BACKENDS = {
    "exact": "ExactDiagGGN",
    "curvlinops": "CurvlinopsGGN",
    "asdl": "AsdlGGN",
    "backpack": "BackPackGGN",
}


def backend_class(name: str):
    """The laplace-torch curvature backend class named ``name`` (a key of :data:`BACKENDS`)."""
    if name == "exact":
        from distlap.bayes.curvature import ExactDiagGGN

        return ExactDiagGGN
    from laplace import curvature

    return getattr(curvature, BACKENDS[name])


def curvature_options(cfg: LaplaceConfig) -> tuple[type, dict, dict]:
    """(backend class, laplace-torch ``backend_kwargs``, ``asdl_fisher_kwargs``) of ``cfg.estimator``.

    diag (distlap's backend): the estimator and ``mc_samples`` are the backend's own options. kron
    (Curvlinops KFAC over the LoRA linear layers): ggn = KFAC of the GGN (curvlinops' type-2), mc =
    its Monte-Carlo Fisher with ``mc_samples`` labels per example, ef = CurvlinopsEF's KFAC."""
    if cfg.curvature == "exact":
        return backend_class("exact"), {"estimator": cfg.estimator, "mc_samples": cfg.mc_samples}, {}
    if cfg.estimator == "ef":
        from laplace.curvature import CurvlinopsEF

        return CurvlinopsEF, {}, {}
    if cfg.estimator == "mc":
        return backend_class(cfg.curvature), {"stochastic": True}, {"mc_samples": cfg.mc_samples}
    return backend_class(cfg.curvature), {}, {}


GRID = torch.logspace(-2, 4, 13)  # lambda grid of prior_method=gridsearch (13 points, 10^-2 .. 10^4)


@dataclass(frozen=True)
class ParamBlock:
    name: str  # parameter name in the model
    start: int  # slice [start, start + numel) of the flat parameter vector
    numel: int
    block: int  # transformer block index


@dataclass
class Posterior:
    """Everything a subset evaluation needs, as plain tensors (cheap to pickle into Ray's object store).

    ``deltas`` are K draws of theta - theta* from the full posterior, (K, P), in ``n_sets`` consecutive
    independent sets of K / n_sets; the restricted posterior of S uses ``deltas * mask(S)``.
    """

    params: list[ParamBlock]
    theta_map: torch.Tensor  # (P,)
    deltas: torch.Tensor  # (K, P)
    variance: torch.Tensor | None  # (P,) marginal variances (diag only)
    prior_precision: float
    n_sets: int = 1

    @property
    def n_params(self) -> int:
        return self.theta_map.numel()

    def mask(self, blocks: Sequence[int]) -> torch.Tensor:
        """(P,) bool: True for the parameters of the given transformer blocks."""
        keep = set(blocks)
        mask = torch.zeros(self.n_params, dtype=torch.bool)
        for p in self.params:
            if p.block in keep:
                mask[p.start : p.start + p.numel] = True
        return mask


def posterior_parameters(model: nn.Module, method: str, include_norms: bool) -> list[str]:
    """Names of the tuned parameters inside transformer blocks that the posterior covers.

    LoRA factors always; LayerNorm weights/biases of ``norm`` / ``hybrid`` if ``include_norms``. The
    head and anything outside the blocks stay at the MAP: no subset could ever select them.
    """
    names = []
    for name, p in model.named_parameters():
        if not p.requires_grad or block_index(name) is None:
            continue
        is_lora = "lora_" in name
        if is_lora or (include_norms and method in ("norm", "hybrid") and "layernorm" in name):
            names.append(name)
    if not names:
        raise ValueError(
            f"peft.method={method} with laplace.include_norms={include_norms} leaves no "
            "tuned parameter inside the transformer blocks for the posterior"
        )
    return names


def fit_laplace(
    model: nn.Module,
    names: Sequence[str],
    train_loader: DataLoader,
    cfg: LaplaceConfig,
    prior_precision: float,
    n_train: int | None = None,
    prior_mean: dict[str, torch.Tensor] | None = None,
    state: dict | None = None,
):
    """A laplace-torch Laplace over exactly the parameters ``names`` (others frozen for the fit).
    ``state``: a fit saved by its ``state_dict()`` (a checkpoint), loaded instead of fitting again.

    The GGN is summed over ``train_loader`` (n examples); when that is a subset of the N = ``n_train``
    examples the MAP was trained on, the likelihood's curvature is scaled by N / n (laplace-torch's
    ``temperature = n / N``) so that it stands for the full training set, as the prior does.
    ``prior_mean``: θ₀ by parameter name (the MAP's own prior, ``distlap.finetune.train.GaussianPrior``);
    None = 0.
    Runs in fp32 (bf16 + kron exits the process silently) and leaves ``requires_grad`` as it found it.
    """
    if cfg.curvature == "asdl" and any("modules_to_save" in n for n in names):
        raise ValueError(
            "laplace.backend=asdl cannot fit the LayerNorm copies peft makes for "
            "peft.method=hybrid (ModulesToSaveWrapper); use laplace.backend=curvlinops or "
            "laplace.include_norms=false"
        )
    chosen = set(names)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    try:
        with warnings.catch_warnings():
            # asdl's torch.jit.script and backward-hook deprecations are laplace-torch's, not the user's.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*")
            la = _laplace(model, names, cfg, prior_precision, prior_mean, len(train_loader.dataset), n_train)
            if state is None:
                la.fit(train_loader, progress_bar=False)
            else:
                la.load_state_dict(state)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return la


def _laplace(
    model, names, cfg: LaplaceConfig, prior_precision: float, prior_mean, n: int, n_train: int | None
):
    """A new laplace-torch Laplace (after changing requires_grad: it reads the trainable set when built)."""
    import laplace

    backend, backend_kwargs, fisher_kwargs = curvature_options(cfg)
    return laplace.Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=cfg.hessian_structure,
        backend=backend,
        backend_kwargs=backend_kwargs,
        asdl_fisher_kwargs=fisher_kwargs,
        prior_precision=prior_precision,
        prior_mean=_flat_mean(model, names, prior_mean),
        temperature=n / (n_train or n),
    )


def _flat_mean(model: nn.Module, names: Sequence[str], means: dict | None) -> torch.Tensor | float:
    """θ₀ as laplace-torch's flat vector (``model.parameters()`` order, as ``names``), or 0."""
    if means is None:
        return 0.0
    device = next(model.parameters()).device
    return torch.cat([means[n].reshape(-1) for n in names]).to(device)


def build_posterior(
    model: nn.Module,
    method: str,
    train_loader: DataLoader,
    cfg: LaplaceConfig,
    *,
    prior_precision: float,
    seed: int,
    n_train: int | None = None,
    prior_mean: dict[str, torch.Tensor] | None = None,
    val_nll=None,
) -> Posterior:
    """Fit once, choose lambda (``cfg.prior_method``), draw ``cfg.n_samples`` posterior deviations.

    ``val_nll(posterior) -> float`` scores a candidate on the validation split (gridsearch only).
    """
    names = posterior_parameters(model, method, cfg.include_norms)
    la = fit_laplace(model, names, train_loader, cfg, prior_precision, n_train, prior_mean)
    params = param_blocks(model, names, la.n_params)

    def draw(lam: float) -> Posterior:
        return sample_posterior(la, params, cfg, prior_precision=lam, seed=seed)

    return draw(choose_prior_precision(la, cfg.prior_method, prior_precision, draw, val_nll))


def sample_posterior(
    la, params: list[ParamBlock], cfg: LaplaceConfig, *, prior_precision: float, seed: int
) -> Posterior:
    """``cfg.n_sample_sets`` independent sets of ``cfg.n_samples`` deviations θ − θ* drawn (seeded) from
    the fitted posterior at ``prior_precision``, set after set."""
    la.prior_precision = prior_precision
    g = torch.Generator(device=la._device).manual_seed(seed)
    mean = la.mean.detach()
    k = cfg.n_samples * cfg.n_sample_sets
    deltas = (la.sample(k, generator=g) - mean.reshape(1, -1)).detach().float().cpu()
    variance = la.posterior_variance.detach().float().cpu() if cfg.hessian_structure == "diag" else None
    return Posterior(params, mean.float().cpu(), deltas, variance, float(prior_precision), cfg.n_sample_sets)


def param_blocks(model: nn.Module, names: Sequence[str], n_params: int) -> list[ParamBlock]:
    """Where each posterior parameter tensor sits in the flat vector, and its transformer block."""
    params, offset = [], 0
    named = dict(model.named_parameters())
    for n in names:  # laplace-torch's flat order is model.parameters() order, as is `names`
        params.append(ParamBlock(n, offset, named[n].numel(), block_index(n)))
        offset += named[n].numel()
    assert offset == n_params, (offset, n_params)
    return params


def choose_prior_precision(la, method: str, prior_precision: float, draw, val_nll) -> float:
    """λ: fixed (the MAP's), the exact maximiser of the marginal likelihood (closed form,
    :func:`distlap.bayes.prior.marglik_prior_precision`), or the best validation NLL of ``draw(λ)`` over
    :data:`GRID`."""
    if method == "marglik":
        from distlap.bayes.prior import block_evidence, marglik_prior_precision

        return marglik_prior_precision(block_evidence(la, [0] * len(la.params)), [0])
    if method == "gridsearch":
        if val_nll is None:
            raise ValueError("laplace.prior_method=gridsearch needs a validation scorer")
        scores = {float(lam): val_nll(draw(float(lam))) for lam in GRID}
        return min(scores, key=lambda k: scores[k] if math.isfinite(scores[k]) else math.inf)
    return prior_precision
