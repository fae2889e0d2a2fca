"""Moving θ̂ toward the mode: both methods lower the stationarity to the target within their budget (checked
against a ratio computed here from autograd over the whole data), stop early there, and fail loudly."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from distlap.config import TrainConfig
from distlap.finetune.refine import refine
from distlap.finetune.train import GaussianPrior

CPU = torch.device("cpu")
N = 200


def _data(shuffle: bool) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % 3
    x = torch.randn(N, 4, generator=g) * 0.3 + F.one_hot(y, 4).float() * 2  # separable: a far mode
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=shuffle, generator=torch.Generator())


def _ratio(model, prior) -> float:
    """‖∇(mean NLL + λ/(2N)‖θ‖²)‖ / ‖∇ mean NLL‖ on all N examples at once (no batching, no helper)."""
    x, y = _data(False).dataset.tensors
    params = list(model.parameters())
    nll = F.cross_entropy(model(x), y)
    joint = nll + prior.precision / (2 * N) * sum((p**2).sum() for p in params)
    g_nll = torch.cat([g.reshape(-1) for g in torch.autograd.grad(nll, params, retain_graph=True)])
    g_joint = torch.cat([g.reshape(-1) for g in torch.autograd.grad(joint, params)])
    return (g_joint.norm() / g_nll.norm()).item()


def _start(lam: float):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    prior = GaussianPrior(lam, {n: torch.zeros_like(p) for n, p in model.named_parameters()}, N)
    return model, prior


@pytest.mark.parametrize("method, budget", [("adam", 200), ("lbfgs", 200)])
def test_refinement_reaches_the_target_and_stops_there(method, budget):
    model, prior = _start(lam=10.0)
    before = _ratio(model, prior)
    cfg = TrainConfig(refine_method=method, refine_steps=budget, refine_lr=0.05)
    steps, after = refine(model, (_data(True), _data(False)), prior, cfg, CPU, target=before / 4)
    assert after == pytest.approx(_ratio(model, prior), rel=1e-4)  # what it reports is where it is
    assert after <= before / 4 and 0 < steps < budget  # stopped at the target, not at the budget


def test_a_budget_too_small_stops_at_the_budget():
    model, prior = _start(lam=1.0)
    before = _ratio(model, prior)
    cfg = TrainConfig(refine_steps=3, refine_lr=1e-4)
    steps, after = refine(model, (_data(True), _data(False)), prior, cfg, CPU, target=before / 100)
    assert steps == 3 and after == pytest.approx(_ratio(model, prior), rel=1e-4) and after > before / 100


def test_a_diverging_refinement_fails_loudly():
    class Exploding(nn.Linear):
        def forward(self, x):
            return super().forward(x) * float("nan")

    torch.manual_seed(0)
    model = Exploding(4, 3)
    prior = GaussianPrior(1.0, {n: torch.zeros_like(p) for n, p in model.named_parameters()}, N)
    with pytest.raises(FloatingPointError, match="the refinement from theta-hat failed: non-finite"):
        refine(model, (_data(True), _data(False)), prior, TrainConfig(refine_steps=2), CPU, target=0.0)
