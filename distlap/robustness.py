"""What the layer-wise answer owes to θ̂ not being a mode: the study again after further optimisation.

In the ``posthoc`` regime (Laplace-LoRA's convention, :class:`distlap.config.TrainConfig`) the Laplace
approximation is fitted at the fine-tuned θ̂, which on few-shot data is far from a stationary point of
the negative log joint (stationarity ‖∇L‖ / ‖∇NLL‖ near 1 after Adam). Laplace assumes a mode, so every
posthoc trial measures what that assumption costs: θ̂ moved toward the mode within ``train.refine_*``
(:func:`distlap.finetune.refine.refine`: Adam continued, or L-BFGS, until the stationarity is
``train.refine_to`` times its value at θ̂), the layer-wise study again at the refined point (same λ, glm,
no bootstrap), and a comparison of the two answers:

- Kendall's τ_b between the single blocks' test Δ_ECE at θ̂ and after (1: the same order; differences
  below :data:`RESOLUTION` are ties, and with every block tied at either point τ is undefined, NaN);
- whether the top single block and the best of early / mid / late agree, each chosen on validation
  Δ_ECE as the report chooses them;
- the largest change of any subset's test Δ_ECE, and the stationarity at both points.

A refinement that does not at least halve the stationarity ratio (or reach the mode tolerance) measured
nothing (``robustness/moved`` false), and the report says so. θ̂ is restored afterwards: every other
result of the trial, and its saved adapter, stay at θ̂.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from scipy.stats import kendalltau

from distlap import names
from distlap.bayes.layerwise import Study
from distlap.config import REFINE_UNITS
from distlap.finetune.refine import refine
from distlap.finetune.run import FineTuned
from distlap.runtime import Timer

GROUPS = ("early", "mid", "late")
RESOLUTION = 1e-3  # Δ_ECE differences below this are ties: far below what a test set of 10^3 resolves


def robustness(ft: FineTuned, study: Study, restudy: Callable[[float], Study], log=print) -> dict:
    """``robustness/...`` for ``ft`` whose layer-wise ``study`` was made at θ̂; ``restudy(λ)`` makes the
    study again (glm, fixed λ) at the model's current parameters. Restores θ̂ before returning."""
    cfg = ft.cfg.train
    before = ft.train.stationarity
    theta_hat = [p.detach().clone() for p in ft.model.parameters() if p.requires_grad]
    loaders = (ft.loader("train", batch_size=cfg.batch_size, shuffle=True), ft.loader("train"))
    target = max(cfg.refine_to * before, cfg.stationarity_tol)
    log(
        f"[distlap] robustness: {cfg.refine_method} from theta-hat, at most {cfg.refine_steps} "
        f"{REFINE_UNITS[cfg.refine_method]}, until stationarity <= {target:.2e}"
    )
    try:
        with Timer() as t:
            steps, after = refine(ft.model, loaders, ft.prior, cfg, ft.device, target, log)
            again = restudy(study.result[names.PRIOR_PRECISION])
    except FloatingPointError as err:  # a diverged refinement measured nothing; the trial goes on
        log(f"[distlap] robustness unmeasured: {err}")
        return _unmeasured(before)
    finally:
        _restore(ft, theta_hat)
    out = {
        names.ROBUST_METHOD: cfg.refine_method,
        names.ROBUST_STEPS: steps,
        names.ROBUST_TIME: t.seconds,
        names.ROBUST_BEFORE: before,
        names.ROBUST_AFTER: after,
        names.ROBUST_MOVED: bool(after <= max(before / 2, cfg.stationarity_tol)),
        **compare(study.result, again.result),
    }
    log(f"[distlap] {summary_line(out)}")
    return out


def _unmeasured(before: float) -> dict:
    keys = (names.ROBUST_TIME, names.ROBUST_AFTER, names.ROBUST_TAU, names.ROBUST_CHANGE)
    return (
        {names.ROBUST_STEPS: 0, names.ROBUST_BEFORE: before, names.ROBUST_MOVED: False}
        | dict.fromkeys(keys, math.nan)
        | {names.ROBUST_TOP: None, names.ROBUST_GROUP: None}
    )


def _restore(ft: FineTuned, theta_hat: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip((p for p in ft.model.parameters() if p.requires_grad), theta_hat):
            p.copy_(value)


def compare(first: dict, second: dict) -> dict:
    """The comparison of two layer-wise results (module docstring): τ, top block, best group, change."""
    test = names.delta("subset", "test", "ece")
    rows1, rows2 = first["subsets"], second["subsets"]
    blocks = [n for n in rows1 if len(rows1[n][names.BLOCKS]) == 1 and n.startswith("layer_")]
    d1 = [_tied(rows1[n]["metrics"][test]) for n in blocks]
    d2 = [_tied(rows2[n]["metrics"][test]) for n in blocks]
    tau = kendalltau(d1, d2).statistic if len(blocks) > 1 and len(set(d1)) > 1 < len(set(d2)) else math.nan
    groups = [g for g in GROUPS if g in rows1 and g in rows2]
    return {
        names.ROBUST_TAU: float(tau),
        names.ROBUST_TOP: _chosen(first, blocks) == _chosen(second, blocks),
        names.ROBUST_GROUP: (_chosen(first, groups) == _chosen(second, groups)) if groups else None,
        names.ROBUST_CHANGE: max(abs(rows2[n]["metrics"][test] - rows1[n]["metrics"][test]) for n in rows1),
    }


def _tied(value: float) -> int:
    """``value`` in units of :data:`RESOLUTION`: equal where the difference is below it."""
    return round(value / RESOLUTION)


def _chosen(result: dict, candidates: list[str]) -> str:
    """The candidate with the largest validation Δ_ECE (ECE_MAP − ECE_S on validation, to
    :data:`RESOLUTION`); the first of ties, so that equal blocks (e.g. all switched off) agree."""
    map_val = result["map"]["metrics"][names.score("map", "val", "ece")]
    val = names.score("subset", "val", "ece")
    return max(candidates, key=lambda n: _tied(map_val - result["subsets"][n]["metrics"][val]))


def _tau(tau: float) -> str:
    return "n/a (every block tied)" if math.isnan(tau) else f"{tau:+.2f}"


def summary_line(r: dict) -> str:
    """One line: how far the refinement moved θ̂ and whether the answer moved with it."""
    moved = "" if r[names.ROBUST_MOVED] else " (did not halve it: the answer's robustness is unmeasured)"
    return (
        f"robustness: {r[names.ROBUST_STEPS]} refinement steps, stationarity {r[names.ROBUST_BEFORE]:.2e} -> "
        f"{r[names.ROBUST_AFTER]:.2e}{moved}; single-block ranking Kendall tau {_tau(r[names.ROBUST_TAU])}, "
        f"top block {'agrees' if r[names.ROBUST_TOP] else 'changes'}, best group "
        f"{ {True: 'agrees', False: 'changes', None: 'n/a'}[r[names.ROBUST_GROUP]] }, largest change of a "
        f"Δ_ECE {r[names.ROBUST_CHANGE]:.4f} ({r[names.ROBUST_TIME]:.0f}s)"
    )
