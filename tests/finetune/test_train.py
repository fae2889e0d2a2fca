import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distlap import names
from distlap.config import TrainConfig
from distlap.finetune.train import GaussianPrior, fit_map, full_batch_gradients, lr_lambda, stationarity

CPU = torch.device("cpu")


def blobs(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=g) * 0.3 + nn.functional.one_hot(y, 4).float() * 2
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def test_fit_map_learns_and_records_history():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    result = fit_map(model, blobs(), blobs(seed=1), TrainConfig(epochs=3, lr=0.1), CPU)
    assert result.status == "ok"
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.history[-1][names.TRAIN_LOSS] < result.history[0][names.TRAIN_LOSS]
    assert result.history[-1]["epoch/val/accuracy"] > 0.9
    assert {"epoch/val/ece", "epoch/val/nll", "epoch/val/brier", names.EPOCH_TIME} <= set(result.history[0])
    assert result.time_per_epoch_s > 0


def _prior(model, lam, n, means=None):
    means = means or {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    return GaussianPrior(lam, means, n)


def _objective(model, loader, prior):
    """The negative log joint in one naive expression over the whole data set (the reference)."""
    x, y = (torch.cat(t) for t in zip(*loader))
    return torch.nn.functional.cross_entropy(model(x), y) + prior.penalty(model)


def test_full_batch_gradients_equal_the_naive_objective():
    torch.manual_seed(0)
    model, loader = nn.Linear(4, 3), blobs()
    prior = _prior(model, 7.0, 200, {"weight": torch.ones(3, 4), "bias": torch.zeros(3)})
    value, nll, joint = full_batch_gradients(model, loader, prior, CPU)
    reference = _objective(model, loader, prior)
    grads = torch.autograd.grad(reference, list(model.parameters()))
    torch.testing.assert_close(joint, torch.cat([g.reshape(-1) for g in grads]), rtol=1e-5, atol=1e-7)
    assert value == pytest.approx(reference.item(), rel=1e-6)
    assert (joint - nll).norm() > 0  # the prior is inside the gradient


@pytest.mark.parametrize("lam", [1.0, 100.0])
def test_map_is_stationary_for_the_stated_prior(lam):
    """Adam, then L-BFGS: ||grad log joint|| <= 1e-2 ||grad NLL|| at theta*, and the optimum moved
    with the prior (coupled: the penalty is in the gradient)."""
    torch.manual_seed(0)
    model, loader = nn.Linear(4, 3), blobs()
    prior = _prior(model, lam, 200)
    result = fit_map(model, loader, None, TrainConfig(epochs=2, lr=0.05, regime="mode"), CPU, prior=prior)
    assert result.status == "ok" and result.stationarity <= 1e-2 and result.lbfgs_steps >= 1
    assert stationarity(model, loader, prior, CPU) == pytest.approx(result.stationarity)
    grads = torch.autograd.grad(_objective(model, loader, prior), list(model.parameters()))
    nll = torch.autograd.grad(_objective(model, loader, _prior(model, 1e-30, 200)), list(model.parameters()))
    ratio = torch.cat([g.reshape(-1) for g in grads]).norm() / torch.cat([g.reshape(-1) for g in nll]).norm()
    assert ratio.item() <= 1e-2


def test_a_parameter_the_data_ignore_goes_to_its_prior_mean():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)
            self.unused = nn.Parameter(torch.full((5,), 3.0))

        def forward(self, x):
            return self.head(x) + 0 * self.unused.sum()

    torch.manual_seed(0)
    model = Model()
    means = {"head.weight": torch.zeros(3, 4), "head.bias": torch.zeros(3), "unused": torch.full((5,), 0.5)}
    cfg = TrainConfig(epochs=1, stationarity_tol=1e-3, regime="mode")
    result = fit_map(model, blobs(), None, cfg, CPU, prior=_prior(model, 50.0, 200, means))
    assert result.stationarity <= 1e-3
    torch.testing.assert_close(model.unused.detach(), torch.full((5,), 0.5), atol=1e-2, rtol=0)  # from 3.0


def test_adam_alone_stops_far_from_the_mode():
    """Why the L-BFGS phase exists: the scheduled epochs alone leave theta* far from stationary."""
    torch.manual_seed(0)
    model, loader = nn.Linear(4, 3), blobs()
    prior = _prior(model, 100.0, 200)
    result = fit_map(model, loader, None, TrainConfig(epochs=1, lr=0.01, regime="posthoc"), CPU, prior=prior)
    assert result.lbfgs_steps == 0 and stationarity(model, loader, prior, CPU) > 0.1


def test_resumed_training_gives_the_same_numbers():
    """State after epoch 1 + the parameters then -> epochs 2-3 exactly as an uninterrupted run."""
    cfg = TrainConfig(epochs=3, lr=0.05, regime="posthoc")
    shuffled = lambda: DataLoader(
        blobs().dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(0)
    whole = nn.Linear(4, 3)
    saved = {}
    fit_map(
        whole,
        shuffled(),
        None,
        cfg,
        CPU,
        prior=_prior(whole, 5.0, 200),
        on_epoch=lambda row, state: saved.setdefault(
            row["epoch"], (state, copy.deepcopy(whole.state_dict()))
        ),
    )
    state, params = saved[1]
    part = nn.Linear(4, 3)
    part.load_state_dict(params)
    result = fit_map(part, shuffled(), None, cfg, CPU, prior=_prior(part, 5.0, 200), resume=state)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    torch.testing.assert_close(part.weight, whole.weight, rtol=0, atol=0)


def test_non_finite_loss_fails_cleanly():
    class Exploding(nn.Linear):
        def forward(self, x):
            return super().forward(x) * float("nan")

    result = fit_map(Exploding(4, 3), blobs(), None, TrainConfig(epochs=2), CPU)
    assert result.status == "failed"
    assert "non-finite training loss" in result.message and "lower train.lr" in result.message
    assert result.history == []


def test_no_trainable_parameters():
    model = nn.Linear(4, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit_map(model, blobs(), None, TrainConfig(), CPU)


@pytest.mark.parametrize(
    "schedule, mid, end", [("cosine", 0.5, 0.0), ("linear", 0.5, 0.0), ("constant", 1, 1)]
)
def test_lr_schedules(schedule, mid, end):
    f = lr_lambda(
        TrainConfig(lr_schedule=schedule, warmup_fraction=0.1), total_steps=111
    )  # 11 warm-up + 100 steps
    assert f(0) == pytest.approx(1 / 11)  # warm-up: 11 steps
    assert f(10) == pytest.approx(1.0)
    assert f(61) == pytest.approx(mid, abs=1e-9)
    assert f(111) == pytest.approx(end, abs=1e-9)


def test_lbfgs_reports_progress_while_it_runs(monkeypatch):
    """A long L-BFGS run says where it is every LBFGS_EVERY steps (here every step, with its number)."""
    from distlap.finetune import train

    monkeypatch.setattr(train, "LBFGS_EVERY", 1)
    torch.manual_seed(0)
    model, loader = nn.Linear(4, 3), blobs()
    lines: list[str] = []
    cfg = TrainConfig(epochs=1, stationarity_tol=1e-12, max_lbfgs_steps=20, regime="mode")
    result = fit_map(model, loader, None, cfg, CPU, prior=_prior(model, 1.0, 200), log=lines.append)
    assert result.lbfgs_steps >= 2 and len(lines) >= 2
    assert [line.split(":")[0] for line in lines[:2]] == [
        "[distlap] L-BFGS step 1/20",
        "[distlap] L-BFGS step 2/20",
    ]
    assert all("stationarity" in line for line in lines)
