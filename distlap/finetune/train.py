"""Fine-tuning of the tuned parameters θ under a Gaussian prior: the posthoc θ̂, or a stationary point.

With the prior N(θ₀, λ⁻¹ I) on the tuned parameters and N training examples, the negative log joint per
example (the objective) is

    L(θ) = mean_i CE(f_θ(x_i), y_i) + λ / (2N) ||θ − θ₀||²,

θ₀ from :func:`distlap.finetune.anchor.prior_mean` (LoRA A at its initialisation or 0, B and the fresh
head at 0, LayerNorms at their pretrained value). The penalty is inside the gradient (coupled): AdamW's
decoupled decay is not this prior under Adam (its effective precision is about λ·sqrt(v̂) per
parameter). Training is Adam with warm-up and a schedule for ``train.epochs``. ``train.regime=mode``
then runs full-batch L-BFGS until θ* is stationary, ‖∇L(θ*)‖ ≤ ``train.stationarity_tol`` · ‖∇NLL(θ*)‖;
``posthoc`` stops after the epochs (Laplace-LoRA's convention) and :mod:`distlap.robustness` measures
what that costs. The ratio reached is always recorded (``stationarity``); a weak prior (small λ/N) makes
L ill-conditioned and a mode far away.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from distlap import metrics, names
from distlap.config import REFINE_UNITS, TrainConfig
from distlap.runtime import autocast, predict


@dataclass
class GaussianPrior:
    """p(θ) = N(θ₀, λ⁻¹ I) on the tuned parameters; ``means`` maps each parameter's name (as the trained
    model names it) to θ₀. ``penalty`` is −log p(θ) / N up to a constant."""

    precision: float
    means: dict[str, torch.Tensor]
    n_train: int

    def penalty(self, model: nn.Module) -> torch.Tensor:
        named = dict(model.named_parameters())
        sq = sum(((named[n] - m.to(named[n].device)) ** 2).sum() for n, m in self.means.items())
        return self.precision / (2 * self.n_train) * sq


@dataclass
class TrainResult:
    status: str  # "ok" | "failed"
    message: str = ""
    history: list[dict[str, float]] = field(default_factory=list)  # one row per finished epoch
    stationarity: float = float("nan")  # ‖∇L(θ*)‖ / ‖∇NLL(θ*)‖, full batch (nan: no prior, e.g. pretraining)
    lbfgs_steps: int = 0

    @property
    def time_per_epoch_s(self) -> float:
        times = [row[names.EPOCH_TIME] for row in self.history]
        return sum(times) / len(times) if times else float("nan")


class NonFiniteLoss(RuntimeError):
    pass


class TrainingFailed(RuntimeError):
    """Fine-tuning ended with ``status="failed"`` (e.g. a non-finite loss), raised where nothing can go on
    without the fine-tuned model (a sweep's trial); deterministic, so a sweep never retries it."""


class LogitsModel(nn.Module):
    """``x -> logits``: the tensor-in / tensor-out view of an HF classifier (training and laplace-torch)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        return self.model(pixel_values=pixel_values).logits


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimiser step ``s``: linear warm-up, then the schedule."""
    warmup = int(cfg.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def fit_map(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    cfg: TrainConfig,
    device: torch.device,
    *,
    prior: GaussianPrior | None = None,
    n_bins: int = 15,
    on_epoch: Callable[[dict[str, float], dict], None] | None = None,
    resume: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train the parameters with ``requires_grad`` (``model``: pixel_values -> logits) to the MAP.

    With ``prior``: Adam on the negative log joint, then L-BFGS to stationarity (module doc). Without
    (distlap's own backbone pretraining): AdamW with weight decay λ/N, plain regularised training.
    ``on_epoch(row, state)`` receives each epoch's row and the optimiser state; ``fit_map(...,
    resume=state)`` continues after that epoch with the same numbers; ``log`` receives L-BFGS progress
    lines (every :data:`LBFGS_EVERY` steps). A non-finite loss returns
    ``status="failed"`` with the reason; it never raises, so a sweep records the failure and goes on.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; apply a PEFT method first")
    model.to(device)
    optimiser, schedule = _optimiser(params, train_loader, cfg, prior)
    fit = _Fit(
        model=model,
        loader=train_loader,
        val_loader=val_loader,
        optimiser=optimiser,
        schedule=schedule,
        cfg=cfg,
        prior=prior,
        device=device,
        n_bins=n_bins,
    )
    result = TrainResult(status="ok", history=list((resume or {}).get("history", [])))
    if resume is not None:
        _load_state(resume, optimiser, schedule, train_loader)
    failure = _epochs(fit, result.history, on_epoch)
    if failure is not None:
        return TrainResult("failed", failure, result.history)
    if prior is not None and cfg.regime == "mode":
        result.lbfgs_steps, result.stationarity = converge(model, train_loader, prior, cfg, device, log)
    elif prior is not None:  # posthoc: no L-BFGS, but how far θ̂ is from a mode is always recorded
        result.stationarity = stationarity(model, train_loader, prior, device)
    return result


def _optimiser(params, loader: DataLoader, cfg: TrainConfig, prior: GaussianPrior | None):
    if prior is None:  # decoupled decay: regularised training, no MAP claim (pretraining)
        optimiser = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.prior_precision / len(loader.dataset)
        )
    else:  # the prior is in the loss: coupled
        optimiser = torch.optim.Adam(params, lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_lambda(cfg, cfg.epochs * len(loader)))
    return optimiser, schedule


def _state(optimiser, schedule, loader: DataLoader, history: list[dict]) -> dict:
    """Everything but the parameters that the next epoch depends on (the caller saves the parameters);
    a copy, so that training on does not change it."""
    state = {"optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(), "history": list(history)}
    shuffle = loader.generator.get_state() if loader.generator is not None else None
    return copy.deepcopy(state) | {"shuffle": shuffle}


def _load_state(state: dict, optimiser, schedule, loader: DataLoader) -> None:
    optimiser.load_state_dict(state["optimiser"])
    schedule.load_state_dict(state["schedule"])
    if state.get("shuffle") is not None and loader.generator is not None:
        loader.generator.set_state(state["shuffle"])


@dataclass(frozen=True)
class _Fit:
    """What every epoch of one :func:`fit_map` call works on (the epochs change the model's and the
    optimiser's state, never which objects these are)."""

    model: nn.Module
    loader: DataLoader  # the training split, shuffled
    val_loader: DataLoader | None  # None: no per-epoch validation scores
    optimiser: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    cfg: TrainConfig
    prior: GaussianPrior | None  # None: decoupled weight decay, no MAP (pretraining)
    device: torch.device
    n_bins: int  # ECE bins of the validation scores


def _epochs(fit: _Fit, history: list[dict], on_epoch: Callable[[dict, dict], None] | None) -> str | None:
    """The epochs after those in ``history`` (appended to it, each passed to ``on_epoch`` with the
    optimiser state); None, or why an epoch failed."""
    for epoch in range(len(history) + 1, fit.cfg.epochs + 1):
        row = _epoch(fit, epoch)
        if isinstance(row, str):
            return row
        history.append(row)
        if on_epoch is not None:
            on_epoch(row, _state(fit.optimiser, fit.schedule, fit.loader, history))
    return None


def _epoch(fit: _Fit, epoch: int) -> dict | str:
    """One epoch's training steps and validation scores: the history row, or why it failed."""
    start, cfg = time.perf_counter(), fit.cfg
    try:
        train_loss = _train_epoch(fit)
    except NonFiniteLoss as err:
        return (
            f"{err} at epoch {epoch}; lower train.lr (now {cfg.lr:g}) or keep "
            f"train.max_grad_norm set (now {cfg.max_grad_norm})"
        )
    row = {"epoch": epoch, names.TRAIN_LOSS: train_loss, names.EPOCH_TIME: time.perf_counter() - start}
    if fit.val_loader is not None:
        probs, labels = predict(fit.model, fit.val_loader, fit.device)
        row.update({names.epoch_score(k): v for k, v in metrics.summarize(probs, labels, fit.n_bins).items()})
    return row


def _train_epoch(fit: _Fit) -> float:
    """Minibatch steps; returns the mean objective of the epoch's batches (the NLL, plus the prior term)."""
    model, optimiser, device = fit.model, fit.optimiser, fit.device
    model.train()
    total, count = 0.0, 0
    for step, (x, y) in enumerate(fit.loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            logits = model(x)  # (B, K)
        loss = F.cross_entropy(logits.float(), y)
        if fit.prior is not None:
            loss = loss + fit.prior.penalty(model)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss ({loss.item()}) at step {step}")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if fit.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimiser.param_groups for p in g["params"]], fit.cfg.max_grad_norm
            )
        optimiser.step()
        fit.schedule.step()
        total += loss.item() * len(y)
        count += len(y)
    return total / count


# --- convergence to a stationary point -------------------------------------------------------------


def full_batch_gradients(model: nn.Module, loader: DataLoader, prior: GaussianPrior, device) -> tuple:
    """L(θ), ∇NLL(θ) and ∇L(θ) over the whole training set, in fp32 and eval mode (no dropout: the
    likelihood the Laplace fit sees). Gradients as flat vectors in ``model.parameters()`` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    total = 0.0
    nll_grad = [torch.zeros_like(p) for p in params]
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x).float(), y, reduction="sum") / prior.n_train
        for acc, g in zip(nll_grad, torch.autograd.grad(loss, params)):
            acc += g
        total += loss.item()
    penalty = prior.penalty(model)
    prior_grad = torch.autograd.grad(penalty, params)
    flat = torch.cat([g.reshape(-1) for g in nll_grad])
    joint = flat + torch.cat([g.reshape(-1) for g in prior_grad])
    return total + penalty.item(), flat, joint


def stationarity(model: nn.Module, loader: DataLoader, prior: GaussianPrior, device) -> float:
    """‖∇L(θ)‖ / ‖∇NLL(θ)‖: 0 at a stationary point of the negative log joint."""
    _, nll, joint = full_batch_gradients(model, loader, prior, device)
    return (joint.norm() / nll.norm().clamp_min(1e-30)).item()


LBFGS_EVERY = 50  # L-BFGS steps between progress lines


def regime_note(cfg: TrainConfig) -> str:
    """What the training regime assumes, in one line (said once per run, not once per trial)."""
    if cfg.regime == "mode":
        return (
            f"regime mode: L-BFGS after the epochs until ||grad log joint|| <= {cfg.stationarity_tol:g} "
            f"||grad NLL|| (at most {cfg.max_lbfgs_steps} steps); a trial that stops short says so"
        )
    return (
        "regime posthoc (Laplace-LoRA's convention): the Laplace fit at the fine-tuned theta-hat, which is "
        "not a mode at weak priors; each trial records its stationarity and recomputes the layer-wise "
        f"answer after up to {cfg.refine_steps} more {REFINE_UNITS[cfg.refine_method]} toward the mode "
        "(robustness/...)"
    )


def converge(
    model: nn.Module,
    loader: DataLoader,
    prior: GaussianPrior,
    cfg: TrainConfig,
    device,
    log=None,
    max_steps: int | None = None,
    target: float | None = None,
):
    """Full-batch L-BFGS (scipy's L-BFGS-B, Byrd et al. 1995: its Moré-Thuente line search is robust to
    the fp32 noise that stalls torch's) on L, until ``stationarity ≤ target`` (default
    ``train.stationarity_tol``) or ``max_steps`` iterations (default ``train.max_lbfgs_steps``); returns
    (iterations, stationarity reached)."""
    max_steps = cfg.max_lbfgs_steps if max_steps is None else max_steps
    target = cfg.stationarity_tol if target is None else target
    params, last = [p for p in model.parameters() if p.requires_grad], {}

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        _load_flat(params, x)
        value, nll, joint = full_batch_gradients(model, loader, prior, device)
        last.update(x=x.copy(), ratio=(joint.norm() / nll.norm().clamp_min(1e-30)).item())
        return value, joint.double().cpu().numpy()

    def stop_when_stationary(intermediate_result) -> None:
        if not np.array_equal(last["x"], intermediate_result.x):
            objective(intermediate_result.x)
        last["steps"] = last.get("steps", 0) + 1
        _progress(log, last["steps"], max_steps, last["ratio"])
        if last["ratio"] <= target:
            raise StopIteration

    x0 = torch.cat([p.detach().reshape(-1) for p in params]).double().cpu().numpy()
    objective(x0)
    if last["ratio"] <= target or max_steps == 0:
        return 0, last["ratio"]
    options = {"maxiter": max_steps, "maxcor": 20, "ftol": 0.0, "gtol": 0.0}
    result = minimize(
        objective, x0, jac=True, method="L-BFGS-B", callback=stop_when_stationary, options=options
    )
    if not np.array_equal(last["x"], result.x):
        objective(result.x)
    return int(result.nit), last["ratio"]


def _progress(log, step: int, max_steps: int, ratio: float) -> None:
    if log is not None and step % LBFGS_EVERY == 0:
        log(f"[distlap] L-BFGS step {step}/{max_steps}: stationarity {ratio:.2e}")


def _load_flat(params: list[nn.Parameter], x: np.ndarray) -> None:
    """Copy the flat vector ``x`` into the parameters (their own storage, their own dtype)."""
    flat = torch.from_numpy(x)
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
