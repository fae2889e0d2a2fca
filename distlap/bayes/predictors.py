"""A fitted study's predictives on any further data: the MAP and every subset's restricted posterior.

After the layer-wise study the same posterior (same fit, same λ) is evaluated on other inputs: shifted
(corrupted) test sets and out-of-distribution images. :class:`GLMPredictive` runs one Jacobian pass per
loader and serves every subset from it; :class:`NNPredictive` samples each subset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distlap.bayes.glm import PassRunner, glm_pass, probit_probs
from distlap.bayes.posterior import Posterior
from distlap.bayes.predictive import ViTSuffix, nn_predictive
from distlap.runtime import predict

Subsets = dict[str, Sequence[int]]


@dataclass
class Predictions:
    """Probabilities of the MAP (N, C) and of each subset's posterior, on one loader's examples."""

    map: Tensor
    subsets: dict[str, Tensor]  # (N, C): for nn the mean over every sample
    labels: Tensor
    sets: dict[str, Tensor] | None = None  # nn: (n_sets, N, C), each set's own predictive


@dataclass
class GLMPredictive:
    """The linearised probit predictive of the fitted ``la`` at prior precision ``prior_precision``;
    ``run`` passes each loader's data (None: in this process)."""

    model: nn.Module
    la: object
    blocks: list[int]
    prior_precision: float
    device: torch.device
    run: PassRunner | None = None

    def __call__(self, loader: DataLoader, subsets: Subsets) -> Predictions:
        if not subsets:  # the MAP alone: no Jacobians
            probs, labels = predict(self.model, loader, self.device)
            return Predictions(probs, {}, labels)
        lam = [self.prior_precision]
        table = glm_pass(self.model, self.la, self.blocks, loader, self.device, lam, self.run)
        probs = {name: probit_probs(table.logits, table.at(0), b) for name, b in subsets.items()}
        return Predictions(table.logits.softmax(-1), probs, table.labels)


@dataclass
class NNPredictive:
    """The Monte-Carlo predictive of ``posterior``'s samples, per subset."""

    model: nn.Module
    posterior: Posterior
    device: torch.device

    def __call__(self, loader: DataLoader, subsets: Subsets) -> Predictions:
        map_probs, labels = predict(self.model, loader, self.device)
        runner = ViTSuffix.try_build(
            self.model.eval().to(self.device), next(iter(loader))[0][:2].to(self.device)
        )
        sets = {
            n: nn_predictive(self.model, self.posterior, b, loader, self.device, runner)[0]
            for n, b in subsets.items()
        }
        return Predictions(map_probs, {n: p.mean(0) for n, p in sets.items()}, labels, sets)
