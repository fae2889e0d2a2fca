"""The Monte-Carlo (``nn``) predictive of a restricted posterior; the linearised one is
:mod:`distlap.bayes.glm`.

nn:  p(y|x) ~ (1/K) sum_k softmax(f(x; theta* + delta_k * m_S)), with m_S the subset's mask (model
     averaging, the seeds' method). Blocks before the first block of S are deterministic, so their
     output is computed once per batch (:class:`ViTSuffix`) and only the remaining blocks run for each
     of the K samples. At broad posteriors the sampled LoRA perturbations dwarf the weights (the
     delta_B delta_A term dominates) and this predictive then measures noise tolerance, not calibration.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from distlap.bayes.posterior import Posterior
from distlap.runtime import autocast


def _hf_classifier(model: nn.Module) -> nn.Module:
    """The HF ViT classifier inside ``LogitsModel`` -> ``PeftModel`` -> ``LoraModel`` wrappers."""
    inner = getattr(model, "model", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


class ViTSuffix:
    """Run a ViT classifier from the input of block ``start`` on, to reuse a deterministic prefix.

    ``prefix(x, start)`` is the hidden state entering block ``start`` (B, T, D); ``logits(h, start)``
    finishes the forward pass. Supports transformers 5.x (``vit.layers``) and 4.x
    (``vit.encoder.layer``); :meth:`try_build` checks the split against the full forward pass.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        hf = _hf_classifier(model)
        vit = hf.vit
        self.embeddings, self.norm, self.head = vit.embeddings, vit.layernorm, hf.classifier
        self.blocks = vit.layers if hasattr(vit, "layers") else vit.encoder.layer

    def prefix(self, x: torch.Tensor, start: int) -> torch.Tensor:
        h = self.embeddings(x)  # (B, T, D)
        for block in self.blocks[:start]:
            h = self._run(block, h)
        return h

    def logits(self, h: torch.Tensor, start: int) -> torch.Tensor:
        for block in self.blocks[start:]:
            h = self._run(block, h)
        return self.head(self.norm(h)[:, 0])  # CLS token -> (B, K)

    @staticmethod
    def _run(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        out = block(h)
        return out[0] if isinstance(out, tuple) else out  # 4.x blocks return tuples

    @classmethod
    def try_build(cls, model: nn.Module, x: torch.Tensor) -> ViTSuffix | None:
        """A suffix runner if the split reproduces ``model(x)`` on this batch, else None."""
        try:
            runner = cls(model)
            with torch.no_grad():
                split = runner.logits(runner.prefix(x, len(runner.blocks) // 2), len(runner.blocks) // 2)
                full = model(x)
        except (AttributeError, TypeError):
            return None
        return runner if torch.allclose(split, full, atol=1e-4, rtol=1e-4) else None


def _live_params(model: nn.Module, posterior: Posterior) -> list[nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[p.name] for p in posterior.params]


def _load(vector: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Copy ``vector`` into the parameters' own storage (``vector_to_parameters`` would make them views
    of ``vector``, so that θ* itself changed with the next sample)."""
    offset = 0
    for p in params:
        p.data.copy_(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


@torch.no_grad()
def nn_predictive(
    model: nn.Module,
    posterior: Posterior,
    blocks: Sequence[int],
    loader: DataLoader,
    device: torch.device,
    runner: ViTSuffix | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MC model average of the restricted posterior of ``blocks``, per sample set: probs (sets, N, C)
    fp32 (``posterior.n_sets`` sets; their mean is the average over every sample) and labels (N,)."""
    model.eval().to(device)
    params = _live_params(model, posterior)
    theta = posterior.theta_map.to(device)
    deltas = (posterior.deltas * posterior.mask(blocks)).to(device)  # (S, P)
    start = min(blocks) if runner is not None else 0
    probs, labels = [], []
    try:
        for x, y in loader:
            x = x.to(device)
            with autocast(device):
                h = runner.prefix(x, start) if runner is not None else x  # deterministic part, once
            sets = []
            for chunk in deltas.chunk(posterior.n_sets):
                total = 0.0
                for delta in chunk:
                    _load(theta + delta, params)
                    with autocast(device):
                        logits = runner.logits(h, start) if runner is not None else model(h)
                    total = total + torch.softmax(logits.float(), dim=-1)
                sets.append(total / len(chunk))
            probs.append(torch.stack(sets).cpu())
            labels.append(y)
    finally:
        _load(theta, params)  # back to the MAP, exactly
    return torch.cat(probs, dim=1), torch.cat(labels)
