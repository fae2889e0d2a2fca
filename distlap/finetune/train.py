"""MAP fine-tuning of the tuned parameters, and MAP prediction.

With an isotropic Gaussian prior N(0, 1/lambda) on the tuned parameters theta and N training
examples, the negative log joint per example is

    mean_i CE(f_theta(x_i), y_i) + lambda / (2N) * ||theta||^2,

so MAP estimation is cross-entropy training with weight decay lambda / N on theta (decoupled, as in
AdamW; Loshchilov & Hutter 2019). Frozen backbone weights get no decay and no gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from distlap import metrics, names
from distlap.config import TrainConfig
from distlap.runtime import autocast, predict


@dataclass
class TrainResult:
    status: str  # "ok" | "failed"
    message: str = ""
    history: list[dict[str, float]] = field(default_factory=list)  # one row per finished epoch

    @property
    def time_per_epoch_s(self) -> float:
        times = [row[names.EPOCH_TIME] for row in self.history]
        return sum(times) / len(times) if times else float("nan")


class NonFiniteLoss(RuntimeError):
    pass


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
    n_bins: int = 15,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train the parameters with ``requires_grad`` (``model``: pixel_values -> logits) to the MAP.

    A non-finite loss stops training and returns ``status="failed"`` with the reason; it never raises,
    so a sweep can record the failure and go on. ``on_epoch`` receives each epoch's row.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; apply a PEFT method first")
    n_train = len(train_loader.dataset)
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.prior_precision / n_train)
    total_steps = cfg.epochs * len(train_loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_lambda(cfg, total_steps))
    model.to(device)
    result = TrainResult(status="ok")
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        try:
            train_loss = _train_epoch(model, train_loader, optimiser, schedule, cfg, device)
        except NonFiniteLoss as err:
            result.status = "failed"
            result.message = (
                f"{err} at epoch {epoch}; lower train.lr (now {cfg.lr:g}) or keep "
                f"train.max_grad_norm set (now {cfg.max_grad_norm})"
            )
            return result
        row = {"epoch": epoch, names.TRAIN_LOSS: train_loss, names.EPOCH_TIME: time.perf_counter() - start}
        if val_loader is not None:
            probs, labels = predict(model, val_loader, device)
            row.update({names.epoch_score(k): v for k, v in metrics.summarize(probs, labels, n_bins).items()})
        result.history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return result


def _train_epoch(model, loader, optimiser, schedule, cfg: TrainConfig, device) -> float:
    model.train()
    total, count = 0.0, 0
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            logits = model(x)  # (B, K)
        loss = F.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss ({loss.item()}) at step {step}")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimiser.param_groups for p in g["params"]], cfg.max_grad_norm
            )
        optimiser.step()
        schedule.step()
        total += loss.item() * len(y)
        count += len(y)
    return total / count
