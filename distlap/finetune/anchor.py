"""θ₀, the centre of the Gaussian prior N(θ₀, λ⁻¹ I) on the tuned parameters, and its file beside the adapter.

Anchors of the LoRA factors (``train.prior_anchor``), for an update ΔW = s·BA (s = α/r):

- ``init`` (default): A's θ₀ is its own seeded initialisation A₀ and B's is 0, so θ₀ is still "no change"
  (B₀A₀ = 0). At B = 0, A = A₀ the Jacobian in B is ∂f/∂B = s·(∂f/∂W)·A₀ᵀ ≠ 0: the prior cannot switch a
  block off, and the posterior of every block acts on the predictive.
- ``zero``: A and B anchored at 0 (Laplace-LoRA's prior). (‖A‖² + ‖B‖²)/2 ≥ ‖BA‖_* makes the prior a
  nuclear-norm penalty on BA; A = B = 0 is stationary for every λ and a local minimum of the negative log
  joint once λ/(N·s) exceeds the top singular value of the block's ∇_W NLL (mean over N examples). There
  ∂f/∂A ∝ B = 0 and ∂f/∂B ∝ A = 0, so the block's linearised posterior changes nothing, whatever its
  variance: a null made by the prior, not by the data (:func:`distlap.bayes.switch_off.switch_off_test`).

The fresh head is anchored at 0 and LayerNorm parameters (norm / hybrid) at their pretrained values.
θ₀ depends on the initialisation, so it is read ONCE from the freshly applied adapter
(:func:`prior_mean`), saved beside the adapter (:func:`save_prior_mean`) and restored from there
(:func:`load_prior_mean`); re-deriving it from a loaded adapter would make θ₀_A the trained A.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distlap.finetune.adapters import HEAD

ANCHORS = ("init", "zero")
PRIOR_MEAN_FILE = "prior_mean.safetensors"
# where a tuned copy's pretrained original lives: peft's modules_to_save and LN-tuning wrappers
_ORIGINALS = {"modules_to_save.default.": "original_module.", "ln_tuning_layers.default.": "base_layer."}


def prior_mean(model: nn.Module, anchor: str = "init") -> dict[str, torch.Tensor]:
    """θ₀ of every tuned parameter of a FRESHLY adapted ``model`` (detached copies, by parameter name).

    LoRA A: its current (= seeded initial) value for ``anchor="init"``, 0 for ``"zero"``; LoRA B and the
    head: 0; any other tuned tensor (LayerNorm weights and biases): the frozen pretrained original peft
    keeps beside the tuned copy.
    """
    if anchor not in ANCHORS:
        raise ValueError(f"train.prior_anchor={anchor!r} is not one of {', '.join(ANCHORS)}")
    named = dict(model.named_parameters())
    means = {}
    for name, p in named.items():
        if not p.requires_grad:
            continue
        if "lora_A" in name and anchor == "init":
            means[name] = p.detach().clone()
        elif "lora_" in name or f".{HEAD}." in f".{name}":
            means[name] = torch.zeros_like(p).detach()
        else:
            original = next((name.replace(a, b) for a, b in _ORIGINALS.items() if a in name), name)
            means[name] = named[original].detach().clone()
    return means


def save_prior_mean(means: dict[str, torch.Tensor], folder: Path) -> Path:
    """θ₀ as ``folder/prior_mean.safetensors`` (tensors by parameter name, bit for bit)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PRIOR_MEAN_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in means.items()}, str(path))
    return path


def load_prior_mean(folder: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """θ₀ saved by :func:`save_prior_mean`, checked against ``model``'s tuned parameters: the same names
    and shapes, or a ValueError naming the file, the mismatch and the fix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / PRIOR_MEAN_FILE
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: the adapter in {folder} has no saved prior mean theta0; "
            "fine-tune the trial again (theta0 cannot be re-derived from a trained adapter)"
        )
    try:
        means = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); fine-tune again") from None
    tuned = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(tuned) - set(means)), sorted(set(means) - set(tuned))
    shapes = [n for n in set(tuned) & set(means) if tuple(tuned[n].shape) != tuple(means[n].shape)]
    if missing or extra or shapes:
        raise ValueError(
            f"{path} does not match the adapter's tuned parameters (missing {missing[:3]}, unexpected "
            f"{extra[:3]}, other shape {sorted(shapes)[:3]}); it belongs to another adapter or peft config"
        )
    return {n: means[n].to(tuned[n].dtype) for n in tuned}
