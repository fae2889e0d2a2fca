"""Moving a fine-tuned θ̂ toward a mode of the negative log joint, within a budget (``train.refine_*``).

The posthoc regime fits its Laplace approximation at θ̂, where Adam's epochs stopped; the answer's
sensitivity to that point is measured by moving θ̂ toward the mode and asking the question again
(:mod:`distlap.robustness`). Two methods, both stopping once the stationarity ratio ‖∇L‖ / ‖∇NLL‖ is at or
below ``target`` (checked on the full training split):

- ``adam`` (default): Adam continued from θ̂ for at most ``train.refine_steps`` epochs at peak learning
  rate ``train.refine_lr`` with a cosine schedule (no warm-up), the stationarity checked every sixth of
  the budget. On the default trial it halves the ratio for λ ≥ 10 in 60 epochs (about 12 s on one core,
  ``benchmarks/map_convergence.py``), where full-batch L-BFGS needs hundreds of steps at weak priors.
- ``lbfgs``: full-batch L-BFGS (:func:`distlap.finetune.train.converge`) for at most ``refine_steps``
  steps: the faster method at strong priors (λ ≥ 100: the mode itself in under 100 steps).
"""

from __future__ import annotations

from torch import nn
from torch.utils.data import DataLoader

from distlap.config import TrainConfig
from distlap.finetune.train import GaussianPrior, converge, fit_map, stationarity


class _Reached(Exception):
    """Raised from an epoch's callback: the target stationarity is reached, stop the epochs."""


def refine(
    model: nn.Module,
    loaders: tuple[DataLoader, DataLoader],
    prior: GaussianPrior,
    cfg: TrainConfig,
    device,
    target: float,
    log=None,
) -> tuple[int, float]:
    """Move ``model``'s tuned parameters toward the mode with ``cfg.refine_method`` until the stationarity
    is at most ``target`` or ``cfg.refine_steps`` is spent; ``loaders`` = (the training split shuffled,
    the training split in order). Returns (epochs or L-BFGS steps taken, stationarity reached)."""
    shuffled, ordered = loaders
    if cfg.refine_method == "lbfgs":
        return converge(model, ordered, prior, cfg, device, log, cfg.refine_steps, target)
    budget = cfg.model_copy(
        update={"epochs": cfg.refine_steps, "lr": cfg.refine_lr, "warmup_fraction": 0.0, "regime": "posthoc"}
    )
    every = max(1, cfg.refine_steps // 6)  # each check is a full pass; mid-schedule it rarely passes
    done = {"epochs": 0, "stationarity": None}

    def check(row: dict, _state: dict) -> None:
        done["epochs"] = row["epoch"]
        if row["epoch"] % every == 0:
            done["stationarity"] = stationarity(model, ordered, prior, device)
            if done["stationarity"] <= target:
                raise _Reached

    try:
        result = fit_map(model, shuffled, None, budget, device, prior=prior, on_epoch=check)
    except _Reached:
        return done["epochs"], done["stationarity"]  # measured at that epoch's end: the point returned
    if result.status != "ok":
        raise FloatingPointError(f"the refinement from theta-hat failed: {result.message}")
    return done["epochs"], result.stationarity
