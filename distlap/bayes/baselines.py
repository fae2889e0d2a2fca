"""Baselines every layer subset stands beside, on the same fine-tuned model: temperature scaling and
last-layer Laplace.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T > 0,

    T* = argmin_T  -(1/N) sum_i log softmax(z_i / T)_{y_i}     on VALIDATION logits z (N, C),

then p = softmax(z / T). The NLL is convex in 1/T, hence unimodal in log T; a bounded Brent search over
log T finds the minimum (float64).

Last-layer Laplace (Daxberger et al. 2021, "Laplace Redux", their recommended default): laplace-torch's
``Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")`` fitted on
the training loader, prior precision by ``optimize_prior_precision(method="marglik")``, predictive
``pred_type="glm", link_approx="probit"``: logits N(f(x), J Sigma J^T), p = softmax(f / sqrt(1 + pi/8 diag)).
On a peft model the head is a ``ModulesToSaveWrapper`` holding a frozen ``original_module`` and the
trained copy ``modules_to_save.<adapter>``; :func:`head_module_name` names the copy, which is the one the
forward pass runs, and laplace-torch gets it as ``last_layer_name``.

``model`` is always a tensor-in / logits-out module (distlap's ``LogitsModel``), in fp32.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import Tensor, nn
from torch.utils.data import DataLoader

# ---------------------------------------------------------------------------------- temperature scaling


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float  # T*
    nll_before: float  # validation NLL at T = 1
    nll_after: float  # validation NLL at T*
    fit_s: float
    at_bound: bool  # T* within 0.1% of 1/max_temperature or max_temperature: the search hit its limit


@torch.no_grad()
def collect_logits(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """The model's logits (N, C) float32 and labels (N,) over a loader, on the CPU (eval, no autocast)."""
    model.eval().to(device)
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def _check_logits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    logits, labels = torch.as_tensor(logits).detach(), torch.as_tensor(labels).detach()
    if logits.ndim != 2 or not logits.is_floating_point() or logits.numel() == 0:
        raise ValueError(
            f"logits must be a non-empty 2-D float tensor (N, C), got {logits.dtype} {tuple(logits.shape)}"
        )
    if labels.shape != (logits.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer tensor of shape ({logits.shape[0]},), got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("logits must be finite")
    return logits.double(), labels.long()


def fit_temperature(logits: Tensor, labels: Tensor, *, max_temperature: float = 100.0) -> TemperatureFit:
    """T* minimising the NLL of softmax(logits / T) on (validation) logits (N, C), T in [1/max, max].

    ``at_bound`` flags a T* at the edge of the range (no interior minimum: uninformative or perfectly
    separated logits); report it rather than the temperature.
    """
    if not max_temperature > 1:
        raise ValueError(f"max_temperature must be > 1, got {max_temperature}")
    z, y = _check_logits(logits, labels)
    start = time.perf_counter()

    def nll(log_t: float) -> float:
        return F.cross_entropy(z / math.exp(log_t), y).item()

    bound = math.log(max_temperature)
    res = minimize_scalar(nll, bounds=(-bound, bound), method="bounded", options={"xatol": 1e-10})
    at_bound = abs(abs(res.x) - bound) < 1e-3  # e.g. logits unrelated to the labels: T* -> infinity
    return TemperatureFit(math.exp(res.x), nll(0.0), float(res.fun), time.perf_counter() - start, at_bound)


def temperature_scale(logits: Tensor, temperature: float) -> Tensor:
    """softmax(logits / T): (N, C) logits -> (N, C) float32 probabilities."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(torch.as_tensor(logits).double() / temperature, dim=-1).float()


# ----------------------------------------------------------------------------------- last-layer Laplace


@dataclass
class LastLayerLaplace:
    la: object  # laplace-torch's KronLLLaplace, holding its own deep copy of the model
    head: str  # the Linear it covers (model.named_modules() name)
    prior_precision: float  # after marglik (or as given)
    fit_s: float  # fit + prior optimisation, seconds


def head_module_name(model: nn.Module, head: str = "classifier") -> str:
    """The name of the TRAINED linear head: peft's active ``modules_to_save`` copy when ``head`` is a
    ``ModulesToSaveWrapper`` (the forward pass runs that copy; ``original_module`` is frozen), else the
    module ``head`` itself. Refuses a head that is not an ``nn.Linear`` or not trainable."""
    modules = dict(model.named_modules())
    found = [n for n in modules if n == head or n.endswith("." + head)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no module named {head!r} (the classifier head)")
    name, module = found[0], modules[found[0]]
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict):  # peft ModulesToSaveWrapper
        active = list(getattr(module, "active_adapters", []))
        if getattr(module, "disable_adapters", False) or not active or active[0] not in copies:
            raise ValueError(
                f"{name}: peft runs the frozen original head (adapters disabled or no active "
                f"copy among {list(copies)}); enable the adapter that was fine-tuned"
            )
        name, module = f"{name}.modules_to_save.{active[0]}", copies[active[0]]
    if not isinstance(module, nn.Linear):
        raise ValueError(f"last-layer Laplace needs an nn.Linear head, {name} is a {type(module).__name__}")
    if not all(p.requires_grad for p in module.parameters()):
        raise ValueError(
            f"head {name} is frozen (requires_grad=False); last-layer Laplace covers the trained head"
        )
    return name


def fit_last_layer_laplace(
    model: nn.Module,
    train_loader: DataLoader,
    *,
    head: str = "classifier",
    prior_precision: float = 1.0,
    optimize_prior: bool = True,
    n_train: int | None = None,
) -> LastLayerLaplace:
    """KFAC last-layer Laplace over the trained head, prior precision by marglik (module doc).

    ``train_loader`` yields (x, y) the model takes; when it is a subset of the N = ``n_train`` training
    examples, the likelihood curvature is scaled by N / n (laplace-torch's ``temperature = n / N``), as
    :func:`distlap.bayes.posterior.fit_laplace` does. ``model`` itself is left untouched: laplace-torch
    deep-copies it, and in that copy only the head keeps ``requires_grad`` (no autograd graph through
    the backbone).
    """
    name = head_module_name(model, head)
    n = len(train_loader.dataset)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # asdl's torch.jit.script deprecation (laplace-torch imports it) is not the user's business.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*")
        # marglik warns on every call that the probit link is the default; we use exactly that link.
        warnings.filterwarnings(
            "ignore", message="By default `link_approx` is `probit`", category=UserWarning
        )
        import laplace

        la = laplace.Laplace(
            model,
            "classification",
            subset_of_weights="last_layer",
            hessian_structure="kron",
            last_layer_name=name,
            prior_precision=prior_precision,
            temperature=n / (n_train or n),
        )
        for pname, p in la.model.model.named_parameters():  # the deep copy; before the backend exists
            p.requires_grad_(pname.startswith(name + "."))
        la.fit(train_loader, progress_bar=False)
        if optimize_prior:
            la.optimize_prior_precision(
                pred_type="glm", method="marglik", prior_structure="scalar", init_prior_prec=prior_precision
            )
    lam = float(torch.as_tensor(la.prior_precision).reshape(-1)[0])
    return LastLayerLaplace(la, name, lam, time.perf_counter() - start)


@torch.no_grad()
def last_layer_logit_moments(fit: LastLayerLaplace, loader: DataLoader) -> tuple[Tensor, Tensor, Tensor]:
    """GLM logit mean f(x) (N, C) (the MAP logits), covariance (N, C, C) and labels (N,), on the CPU."""
    la, means, covs, labels = fit.la, [], [], []
    for x, y in loader:
        jacobians, f_mu = la.backend.last_layer_jacobians(x.to(la._device))  # (B, C, P), (B, C)
        f_var = la.functional_variance(jacobians)  # (B, C, C)
        means.append(f_mu.float().cpu())
        covs.append(f_var.float().cpu())
        labels.append(y)
    return torch.cat(means), torch.cat(covs), torch.cat(labels)


@torch.no_grad()
def last_layer_predict(
    fit: LastLayerLaplace, loader: DataLoader, *, link_approx: str = "probit"
) -> tuple[Tensor, Tensor]:
    """The GLM predictive p(y | x) (N, C) float32 and labels (N,), on the CPU."""
    probs, labels = [], []
    for x, y in loader:
        probs.append(fit.la(x.to(fit.la._device), pred_type="glm", link_approx=link_approx).float().cpu())
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)
