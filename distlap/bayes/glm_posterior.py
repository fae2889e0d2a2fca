"""A fitted Laplace posterior as plain tensors at one λ: what the probit GLM predictive of a subset needs.

For each posterior tensor t (laplace-torch's flat order) the file keeps Sigma_t's eigenbasis (none for
diag, Q or Q1, Q2 for kron) and its inverse eigenvalues 1 / (factor h + λ) at the study's global λ,
exactly the terms :func:`distlap.bayes.glm.glm_pass` builds, so that per-example logit variances
v_b(x) = sum_{t in b} sum_k (rotate(J_t(x)))_k^2 inv_k, and with them p_S(y | x), can be computed again
without laplace-torch (:func:`distlap.bayes.glm.batch_pass`). A trial writes the posterior of every block
(``glm_posterior.safetensors``); an exported model keeps only its subset's (:meth:`GLMPosterior.restrict`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from distlap import names
from distlap.bayes.glm import Term, batch_pass, posterior_terms, probit_probs
from distlap.bayes.predictors import GLMPredictive

POSTERIOR_FILE = names.POSTERIOR_FILE
_META = "distlap.glm_posterior"


@dataclass(frozen=True)
class GLMPosterior:
    """The posterior of tensors ``names`` (blocks ``blocks``) at ``prior_precision``; ``terms[i]`` is
    (eigenbasis, inverse eigenvalues (1, numel)) of tensor ``names[i]``; ``n_blocks`` of the model."""

    names: tuple[str, ...]
    blocks: tuple[int, ...]
    terms: tuple[Term, ...]
    prior_precision: float
    n_blocks: int

    def restrict(self, subset: Iterable[int]) -> GLMPosterior:
        """Only the tensors of the blocks in ``subset`` (the restricted posterior's own)."""
        keep = [i for i, b in enumerate(self.blocks) if b in set(subset)]
        return GLMPosterior(
            tuple(self.names[i] for i in keep),
            tuple(self.blocks[i] for i in keep),
            tuple(self.terms[i] for i in keep),
            self.prior_precision,
            self.n_blocks,
        )

    def probs(self, model: nn.Module, x: Tensor, subset: Iterable[int]) -> Tensor:
        """p_S(y | x) of the probit GLM predictive (B, C) for a batch ``x`` (on the model's device)."""
        named = dict(model.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise ValueError(f"the model has no parameter {missing[0]!r} of the posterior; wrong adapter")
        terms = [(tuple(q.to(x.device) for q in basis), inv.to(x.device)) for basis, inv in self.terms]
        logits, variances = batch_pass(model, self.names, terms, self.blocks, x, self.n_blocks)
        return probit_probs(logits, variances, list(subset))


def from_predictive(predictive: GLMPredictive, n_blocks: int) -> GLMPosterior:
    """The posterior of a study's :class:`GLMPredictive` at its own λ (the same terms its passes use)."""
    by_id = {id(p): n for n, p in predictive.model.named_parameters()}
    grid = torch.as_tensor([predictive.prior_precision], dtype=torch.float32)
    terms = tuple(
        (tuple(_own(q.detach().float()) for q in basis), _own(inv.detach()))
        for basis, inv in posterior_terms(predictive.la, grid)
    )
    return GLMPosterior(
        tuple(by_id[id(p)] for p in predictive.la.params),
        tuple(predictive.blocks),
        terms,
        float(predictive.prior_precision),
        n_blocks,
    )


def _own(t: Tensor) -> Tensor:
    """A contiguous CPU copy with storage of its own (safetensors refuses views and shared storage)."""
    return t.cpu().contiguous().clone()


def save(posterior: GLMPosterior, path: Path) -> Path:
    """``path`` as safetensors: ``{i}.inv`` and ``{i}.basis.{k}`` per tensor, the rest as metadata."""
    from safetensors.torch import save_file

    tensors = {}
    for i, (basis, inv) in enumerate(posterior.terms):
        tensors[f"{i}.inv"] = inv
        tensors |= {f"{i}.basis.{k}": q for k, q in enumerate(basis)}
    meta = {
        "names": list(posterior.names),
        "blocks": list(posterior.blocks),
        "bases": [len(basis) for basis, _ in posterior.terms],
        "prior_precision": posterior.prior_precision,
        "n_blocks": posterior.n_blocks,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={_META: json.dumps(meta)})
    return path


def load(path: Path) -> GLMPosterior:
    """What :func:`save` wrote, or a ValueError naming the file and the fix."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META])
            terms = tuple(
                (tuple(f.get_tensor(f"{i}.basis.{k}") for k in range(n)), f.get_tensor(f"{i}.inv"))
                for i, n in enumerate(meta["bases"])
            )
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a distlap GLM posterior ({err}); write it again") from None
    return GLMPosterior(
        tuple(meta["names"]), tuple(meta["blocks"]), terms, float(meta["prior_precision"]), meta["n_blocks"]
    )
