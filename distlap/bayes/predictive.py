"""Posterior predictives of a restricted posterior: Monte-Carlo model averaging (``nn``) and the
linearised GLM predictive (``glm``, Immer et al. 2021; MacKay 1992).

nn:  p(y|x) ~ (1/K) sum_k softmax(f(x; theta* + delta_k * m_S)), with m_S the subset's mask.
     Blocks before the first block of S are deterministic, so their output is computed once per
     batch (:class:`ViTSuffix`) and only the remaining blocks run for each of the K samples.
glm: f_lin(x; theta) = f(x; theta*) + J(x) (theta - theta*), J = df/dtheta at theta*: logits are
     Gaussian with mean f(x; theta*) and covariance J_S Sigma_SS J_S^T. ``probit``:
     softmax(mu / sqrt(1 + pi/8 diag V)) (diag posteriors: diag V is additive over parameters, so one
     Jacobian pass gives every subset); ``mc``: average softmax(mu + J_S delta_k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import vector_to_parameters
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
    (``vit.encoder.layer``); :meth:`exact` checks the split against the full forward pass.
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


@torch.no_grad()
def nn_predictive(
    model: nn.Module,
    posterior: Posterior,
    blocks: Sequence[int],
    loader: DataLoader,
    device: torch.device,
    runner: ViTSuffix | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MC model average of the restricted posterior of ``blocks``: probs (N, K) fp32 and labels (N,)."""
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
            total = 0.0
            for delta in deltas:
                vector_to_parameters(theta + delta, params)
                with autocast(device):
                    logits = runner.logits(h, start) if runner is not None else model(h)
                total = total + torch.softmax(logits.float(), dim=-1)
            probs.append((total / len(deltas)).cpu())
            labels.append(y)
    finally:
        vector_to_parameters(theta, params)  # back to the MAP, exactly
    return torch.cat(probs), torch.cat(labels)


def _jacobian(model: nn.Module, posterior: Posterior, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) and their Jacobian (B, C, P) w.r.t. the posterior's parameters at the MAP."""
    from torch.func import functional_call, jacrev

    names = [p.name for p in posterior.params]
    named = dict(model.named_parameters())
    primals = {n: named[n].detach() for n in names}

    def f(ps):
        out = functional_call(model, ps, (x,))
        return out, out

    jac, logits = jacrev(f, has_aux=True)(primals)
    flat = torch.cat([jac[n].reshape(*logits.shape, -1) for n in names], dim=-1)  # (B, C, P)
    return logits.detach(), flat.detach()


def glm_predictive(
    model: nn.Module,
    posterior: Posterior,
    subsets: dict[str, Sequence[int]],
    loader: DataLoader,
    device: torch.device,
    link_approx: str,
    chunk: int = 32,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Linearised predictive for every subset from one Jacobian pass per batch.

    Returns {subset: probs (N, C)} and labels (N,). Memory is bounded by ``chunk`` examples' Jacobians
    (chunk x C x P floats). ``probit`` needs the marginal variances of a ``diag`` posterior.
    """
    if link_approx == "probit" and posterior.variance is None:
        raise ValueError(
            "laplace.link_approx=probit needs laplace.hessian_structure=diag "
            "(kron: use laplace.link_approx=mc)"
        )
    model.eval().to(device)
    masks = {name: posterior.mask(blocks).to(device) for name, blocks in subsets.items()}
    probs = {name: [] for name in subsets}
    labels = []
    for x, y in loader:
        for xc in x.to(device).split(chunk):
            mu, jac = _jacobian(model, posterior, xc)  # (b, C), (b, C, P)
            for name, mask in masks.items():
                probs[name].append(_glm_probs(mu, jac * mask, posterior, link_approx, device).cpu())
        labels.append(y)
    return {name: torch.cat(p) for name, p in probs.items()}, torch.cat(labels)


def _glm_probs(mu, jac, posterior: Posterior, link_approx: str, device) -> torch.Tensor:
    if link_approx == "probit":
        var = (jac.pow(2) * posterior.variance.to(device)).sum(-1)  # (b, C): diag J Sigma J^T
        return torch.softmax(mu / torch.sqrt(1 + math.pi / 8 * var), dim=-1)
    deltas = posterior.deltas.to(device)  # (S, P)
    logits = mu[None] + torch.einsum("bcp,sp->sbc", jac, deltas)  # (S, b, C)
    return torch.softmax(logits, dim=-1).mean(0)
