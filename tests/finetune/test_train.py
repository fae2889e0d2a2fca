import copy

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distlap import names
from distlap.config import TrainConfig
from distlap.finetune.train import (
    GaussianPrior,
    converge,
    fit_map,
    full_batch_gradients,
    lr_lambda,
    stationarity,
)

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


# --- the negative log joint, its gradients and the stationarity ratio, computed independently -------


def _data(loader) -> tuple[np.ndarray, np.ndarray]:
    x, y = (torch.cat(t) for t in zip(*loader))
    return x.double().numpy(), y.numpy()


def _softmax_regression(W, b, W0, b0, lam, loader, n):
    """For f(x) = W x + b, in float64 numpy, the closed forms: L = -1/N sum_i log softmax(f(x_i))_{y_i}
    + lam/(2N) (||W - W0||^2 + ||b - b0||^2), grad NLL = 1/N sum_i (p_i - e_{y_i}) [x_i; 1]^T and the
    prior's gradient lam/N (theta - theta0). Flat in (W, b) order."""
    x, y = _data(loader)
    z = x @ W.T + b  # (N, C)
    logp = z - logsumexp(z, axis=1, keepdims=True)
    residual = np.exp(logp) - np.eye(W.shape[0])[y]  # p_i - e_{y_i}
    nll_grad = np.concatenate([(residual.T @ x).ravel(), residual.sum(0)]) / n
    delta = np.concatenate([(W - W0).ravel(), b - b0])
    value = -logp[np.arange(len(y)), y].sum() / n + lam / (2 * n) * (delta**2).sum()
    return value, nll_grad, nll_grad + lam / n * delta


def _linear_case(lam=7.0, seed=0):
    torch.manual_seed(seed)
    model, loader = nn.Linear(4, 3), blobs()
    g = torch.Generator().manual_seed(seed + 1)
    means = {"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}
    return model, loader, _prior(model, lam, 200, means)


def _reference(model, loader, prior):
    as_np = lambda t: t.detach().double().numpy()
    m = prior.means
    return _softmax_regression(
        as_np(model.weight),
        as_np(model.bias),
        as_np(m["weight"]),
        as_np(m["bias"]),
        prior.precision,
        loader,
        200,
    )


def test_penalty_is_the_gaussian_log_prior_per_example():
    """penalty = -(log N(theta; theta0, 1/lam) - log N(theta0; theta0, 1/lam)) / N, by torch.distributions,
    over exactly the parameters the prior names."""
    model, _, prior = _linear_case(lam=7.0)
    normal = lambda n: torch.distributions.Normal(prior.means[n].double(), 7.0**-0.5)
    named = dict(model.named_parameters())
    log_ratio = sum(
        (normal(n).log_prob(named[n].detach().double()) - normal(n).log_prob(prior.means[n].double())).sum()
        for n in ("weight", "bias")
    )
    assert prior.penalty(model).item() == pytest.approx(-log_ratio.item() / 200, rel=1e-6)
    only_weight = GaussianPrior(7.0, {"weight": prior.means["weight"]}, 200)
    assert only_weight.penalty(model).item() == pytest.approx(
        7.0 / 400 * ((model.weight.detach().double() - prior.means["weight"].double()) ** 2).sum().item(),
        rel=1e-6,
    )


def test_full_batch_gradients_are_the_closed_form_of_softmax_regression():
    model, loader, prior = _linear_case()
    value, nll, joint = full_batch_gradients(model, loader, prior, CPU)
    ref_value, ref_nll, ref_joint = _reference(model, loader, prior)
    assert value == pytest.approx(ref_value, rel=1e-6)
    np.testing.assert_allclose(nll.double().numpy(), ref_nll, rtol=0, atol=1e-6)
    np.testing.assert_allclose(joint.double().numpy(), ref_joint, rtol=0, atol=1e-6)
    assert np.abs(ref_joint - ref_nll).max() > 1e-2  # the prior is inside the gradient


def test_full_batch_gradients_of_a_network_against_finite_differences():
    """A tanh MLP: the gradient against central differences (h = 1e-6) of the negative log joint written
    out in float64, coordinate by coordinate."""
    torch.manual_seed(0)
    model, loader = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), blobs()
    g = torch.Generator().manual_seed(3)
    means = {n: 0.1 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    prior = GaussianPrior(5.0, means, 200)
    value, _, joint = full_batch_gradients(model, loader, prior, CPU)
    x, y = (torch.from_numpy(a) for a in _data(loader))
    theta = {n: p.detach().double() for n, p in model.named_parameters()}
    reference = copy.deepcopy(model).double()

    def objective(params) -> float:
        z = torch.func.functional_call(reference, params, (x,))
        nll = -torch.log_softmax(z, 1)[torch.arange(len(y)), y].sum() / 200
        return (nll + 5.0 / 400 * sum(((params[n] - means[n].double()) ** 2).sum() for n in params)).item()

    fd = []
    for name, p in theta.items():
        for i in range(p.numel()):
            step = torch.zeros(p.numel(), dtype=torch.float64)
            step[i] = 1e-6
            plus = objective({**theta, name: p + step.view_as(p)})
            minus = objective({**theta, name: p - step.view_as(p)})
            fd.append((plus - minus) / 2e-6)
    assert value == pytest.approx(objective(theta), rel=1e-6)
    np.testing.assert_allclose(joint.double().numpy(), np.array(fd), rtol=0, atol=2e-6)


def test_stationarity_is_the_ratio_of_the_gradient_norms():
    model, loader, prior = _linear_case()
    _, nll, joint = _reference(model, loader, prior)
    expected = np.linalg.norm(joint) / np.linalg.norm(nll)
    assert stationarity(model, loader, prior, CPU) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("lam", [1.0, 100.0])
def test_lbfgs_reaches_the_stationarity_it_reports(lam):
    """converge from the initialisation: the ratio it reports is the closed form's at the parameters it
    leaves, below the tolerance; and theta is within ||grad L|| / (lam / N) of the optimum found here by
    SciPy on the closed form (L is lam/N-strongly convex, so that bound is rigorous)."""
    model, loader, prior = _linear_case(lam=lam)
    cfg = TrainConfig(stationarity_tol=1e-3, max_lbfgs_steps=500)
    steps, reported = converge(model, loader, prior, cfg, CPU)
    _, nll, joint = _reference(model, loader, prior)
    assert steps >= 1 and reported <= 1e-3
    assert reported == pytest.approx(np.linalg.norm(joint) / np.linalg.norm(nll), rel=1e-3)
    W0, b0 = prior.means["weight"].double().numpy(), prior.means["bias"].double().numpy()

    def closed_form(flat):
        value, _, grad = _softmax_regression(flat[:12].reshape(3, 4), flat[12:], W0, b0, lam, loader, 200)
        return value, grad

    start = np.zeros(15)
    best = minimize(closed_form, start, jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 10000}).x
    theta = np.concatenate(
        [model.weight.detach().double().numpy().ravel(), model.bias.detach().double().numpy()]
    )
    assert np.linalg.norm(theta - best) <= np.linalg.norm(joint) / (lam / 200) + 1e-5


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
