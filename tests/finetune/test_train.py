import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distlap import names
from distlap.config import TrainConfig
from distlap.finetune.train import fit_map, lr_lambda

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


def test_weight_decay_is_prior_precision_over_n():
    """A parameter with zero data gradient only feels the prior: theta <- theta (1 - lr * lambda / N)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)
            self.unused = nn.Parameter(torch.ones(5))

        def forward(self, x):
            return self.head(x) + 0 * self.unused.sum()

    model, lam = Model(), 50.0
    cfg = TrainConfig(
        epochs=1, lr=0.01, prior_precision=lam, lr_schedule="constant", warmup_fraction=0, max_grad_norm=None
    )
    loader = blobs(n=64)
    fit_map(model, loader, None, cfg, CPU)
    steps = len(loader)
    expected = (1 - cfg.lr * lam / 64) ** steps
    torch.testing.assert_close(model.unused.detach(), torch.full((5,), expected))


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
