"""Under the zero anchor, whether the prior alone can switch a LoRA block off: the origin test.

A LoRA update ΔW = s·BA (s = α/r) with the prior N(0, λ⁻¹ I) on A and B: around A = B = 0 the negative
log joint per example is, to second order,

    L ≈ L(0) + s·⟨G, BA⟩ + λ/(2N)·(‖A‖² + ‖B‖²),      G = ∇_W NLL (mean over the N examples),

and min over unit ‖A‖ = ‖B‖ of ⟨G, BA⟩ is −σ_max(G). So A = B = 0 is stationary for every λ and a local
minimum exactly when λ/(N·s) ≥ σ_max(G): the block is *silenced* by the prior, and its linearised
posterior changes nothing whatever its variance (∂f/∂A ∝ B = 0, ∂f/∂B ∝ A = 0). :func:`switch_off_test`
evaluates G per LoRA module at the block's origin (its own factors zeroed, every other parameter where
it is), so that a block the MAP left at zero is explained by numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from distlap.bayes.layers import block_index, num_blocks


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every peft LoRA layer: a frozen ``base_layer`` with ``lora_A`` / ``lora_B``."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling"):
            yield name, module


def switch_off_test(
    model: nn.Module, loader: DataLoader, prior_precision: float, n_train: int, device: torch.device
) -> list[dict]:
    """Per block: ``sigma`` = max over its LoRA modules of σ_max(∇_W NLL) at the block's origin,
    ``threshold`` = λ/(N·s), and ``silenced`` = threshold ≥ sigma (A = B = 0 is a local minimum)."""
    modules = [(block_index(n), m) for n, m in lora_modules(model) if block_index(n) is not None]
    out = []
    for block in range(num_blocks(model)):
        own = [m for b, m in modules if b == block]
        if not own:
            continue
        sigma = max(_origin_sigmas(model, own, loader, n_train, device))
        scaling = max(float(m.scaling[m.active_adapters[0]]) for m in own)
        threshold = prior_precision / (n_train * scaling)
        out.append({"block": block, "sigma": sigma, "threshold": threshold, "silenced": threshold >= sigma})
    return out


def _origin_sigmas(model, modules, loader, n_train: int, device) -> list[float]:
    """σ_max of the mean-NLL gradient in each module's base weight, with the modules' factors at zero."""
    factors = [p for m in modules for p in (*m.lora_A.parameters(), *m.lora_B.parameters())]
    weights = [m.base_layer.weight for m in modules]
    saved = [p.detach().clone() for p in factors]
    flags = [w.requires_grad for w in weights]
    try:
        with torch.no_grad():
            for p in factors:
                p.zero_()
        for w in weights:
            w.requires_grad_(True)
        grads = _full_batch_grad(model, loader, weights, n_train, device)
    finally:
        with torch.no_grad():
            for p, value in zip(factors, saved):
                p.copy_(value)
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return [float(torch.linalg.matrix_norm(g.double(), ord=2)) for g in grads]


def _full_batch_grad(model, loader, weights, n_train: int, device) -> list[torch.Tensor]:
    """∇ of the mean NLL over the loader's examples (divided by ``n_train``) in ``weights``; eval mode."""
    model.eval()
    grads = [torch.zeros_like(w) for w in weights]
    for x, y in loader:
        loss = F.cross_entropy(model(x.to(device)).float(), y.to(device), reduction="sum") / n_train
        for acc, g in zip(grads, torch.autograd.grad(loss, weights)):
            acc += g
    return grads
