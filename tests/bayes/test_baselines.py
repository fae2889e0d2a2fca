"""distlap.bayes.baselines: temperature scaling on toys with a known answer; last-layer Laplace on peft."""

import copy
import math

import laplace
import numpy as np
import pytest
import torch
from conftest import make_tiny_vit
from scipy.optimize import brentq
from scipy.special import logsumexp, softmax
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distlap.bayes import baselines as B
from distlap.config import PeftConfig
from distlap.finetune.adapters import apply_peft
from distlap.finetune.train import LogitsModel


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _calibrated_logits(n=20000, c=10, seed=0):
    """Logits z and labels drawn from softmax(z): calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return z, torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)


# ---------------------------------------------------------------------------------- temperature scaling


@pytest.mark.parametrize("scale", [0.4, 2.5, 6.0])
def test_temperature_recovers_the_scale_of_calibrated_logits(scale):
    z, y = _calibrated_logits(seed=1)
    fit = B.fit_temperature(scale * z, y)
    assert fit.temperature == pytest.approx(scale, rel=0.03)
    assert fit.nll_after <= fit.nll_before
    probs = B.temperature_scale(scale * z, fit.temperature)
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(1), torch.ones(len(z)))


def test_temperature_is_one_when_already_calibrated():
    z, y = _calibrated_logits(seed=2)
    fit = B.fit_temperature(z, y)
    assert fit.temperature == pytest.approx(1.0, abs=0.03)
    assert fit.nll_after <= fit.nll_before < fit.nll_after + 1e-3


def _nll(z: np.ndarray, y: np.ndarray, log_t: np.ndarray) -> np.ndarray:
    """Mean NLL of softmax(z / T) for each log T (G,), written out in numpy: logsumexp(z_i / T) - z_iy / T."""
    out = []
    for chunk in np.array_split(log_t, max(1, len(log_t) // 50)):
        scaled = z[None] / np.exp(chunk)[:, None, None]  # (g, N, C)
        out.append((logsumexp(scaled, axis=2) - scaled[:, np.arange(len(y)), y]).mean(1))
    return np.concatenate(out)


def test_temperature_is_the_nll_minimiser_on_a_dense_grid_and_its_stationary_point():
    """T* against (a) a dense grid over log T, refined around its best point (spacing 1e-5 in log T),
    and (b) the root of the NLL's derivative in beta = 1/T, mean_i (E_softmax(beta z_i)[z_i] - z_iy),
    found by SciPy's brentq: the NLL is convex in beta, so that root is its minimum."""
    z, y = _calibrated_logits(n=3000, seed=3)
    z, y = (1.7 * z).numpy(), y.numpy()
    fit = B.fit_temperature(torch.as_tensor(z).float(), torch.as_tensor(y))
    coarse = np.linspace(-np.log(100), np.log(100), 801)
    best = coarse[np.argmin(_nll(z, y, coarse))]
    fine = np.linspace(best - 0.015, best + 0.015, 3001)
    nll = _nll(z, y, fine)
    assert math.log(fit.temperature) == pytest.approx(fine[np.argmin(nll)], abs=1e-5)
    assert fit.nll_after == pytest.approx(nll.min(), abs=1e-9)
    assert fit.nll_before == pytest.approx(_nll(z, y, np.zeros(1))[0], abs=1e-6)

    def slope(beta: float) -> float:
        p = softmax(beta * z, axis=1)
        return float(((p * z).sum(1) - z[np.arange(len(y)), y]).mean())

    beta = brentq(slope, 1e-3, 1e3, xtol=1e-14, rtol=1e-14)
    assert fit.temperature == pytest.approx(1 / beta, rel=1e-5)
    assert fit.temperature == pytest.approx(1.7, rel=0.05)  # the scale the logits were drawn with


def test_temperature_flags_a_fit_at_the_bound():
    z, _ = _calibrated_logits(n=2000, seed=4)
    unrelated = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(5))
    fit = B.fit_temperature(z, unrelated, max_temperature=50.0)
    assert fit.at_bound and fit.temperature == pytest.approx(50.0, rel=1e-3)
    assert not B.fit_temperature(*_calibrated_logits(n=2000, seed=4)).at_bound


def test_temperature_refuses_bad_inputs():
    with pytest.raises(ValueError, match="logits must be"):
        B.fit_temperature(torch.ones(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        B.fit_temperature(torch.ones(5, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        B.temperature_scale(torch.ones(5, 2), 0.0)


# ----------------------------------------------------------------------------------- last-layer Laplace


def _peft_model(seed=0):
    """A LoRA model whose trained head copy differs from the frozen original (as after fine-tuning)."""
    torch.manual_seed(seed)
    model = LogitsModel(apply_peft(make_tiny_vit(num_labels=3), PeftConfig(method="lora", rank=2)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def _loader(n=48, seed=0, batch_size=16):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_head_module_name_picks_the_trained_copy():
    model = _peft_model()
    name = B.head_module_name(model)
    assert name.endswith("classifier.modules_to_save.default")
    wrapper = dict(model.named_modules())[name.rsplit(".modules_to_save", 1)[0]]
    assert not torch.equal(wrapper.original_module.weight, wrapper.modules_to_save["default"].weight)
    plain = nn.Sequential()
    plain.add_module("body", nn.Linear(4, 4))
    plain.add_module("classifier", nn.Linear(4, 2))
    assert B.head_module_name(plain) == "classifier"


def test_head_module_name_refusals():
    model = _peft_model()
    dict(model.named_modules())[B.head_module_name(model)].requires_grad_(False)
    with pytest.raises(ValueError, match="is frozen"):
        B.head_module_name(model)
    with pytest.raises(ValueError, match="no module named 'head'"):
        B.head_module_name(_peft_model(), head="head")
    inner = _peft_model().model
    with inner.disable_adapter(), pytest.raises(ValueError, match="frozen original head"):
        B.head_module_name(inner)


def test_last_layer_laplace_map_logits_are_the_models_own():
    model = _peft_model()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    fit = B.fit_last_layer_laplace(model, _loader(), prior_precision=1.0)
    assert fit.head.endswith("modules_to_save.default") and fit.fit_s > 0
    assert math.isfinite(fit.prior_precision) and fit.prior_precision > 0
    assert fit.la.n_params == 32 * 3 + 3  # weight (3, 32) + bias (3,)
    test = _loader(n=20, seed=1, batch_size=8)
    mean, cov, labels = B.last_layer_logit_moments(fit, test)
    own, own_labels = B.collect_logits(model, test)
    torch.testing.assert_close(mean, own, rtol=0, atol=1e-5)  # the trained head, not the original
    assert torch.equal(labels, own_labels) and cov.shape == (20, 3, 3)
    assert (torch.linalg.eigvalsh(cov.double()) > -1e-6).all()
    probs, _ = B.last_layer_predict(fit, test)
    assert probs.shape == (20, 3) and torch.allclose(probs.sum(1), torch.ones(20), atol=1e-5)
    assert probs.max(1).values.mean() < torch.softmax(own, 1).max(1).values.mean()  # probit softens
    for n, p in model.named_parameters():  # the user's model is untouched
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]


def test_last_layer_laplace_zero_variance_predictive_is_the_map():
    model = _peft_model(seed=1)
    fit = B.fit_last_layer_laplace(model, _loader(), prior_precision=1e10, optimize_prior=False)
    assert fit.prior_precision == 1e10
    test = _loader(n=16, seed=2)
    probs, _ = B.last_layer_predict(fit, test)
    logits, _ = B.collect_logits(model, test)
    torch.testing.assert_close(probs, torch.softmax(logits, 1), rtol=0, atol=1e-5)


def _their_lla(model, data, *, prior_precision=1.0, optimize=True):
    """laplace-torch's last-layer Laplace as its documentation has it, on a copy of the model, with no
    distlap code in between: the trained head copy by name, every parameter left as it was."""
    la = laplace.Laplace(
        copy.deepcopy(model),
        "classification",
        subset_of_weights="last_layer",
        hessian_structure="kron",
        last_layer_name="model.base_model.model.classifier.modules_to_save.default",
        prior_precision=prior_precision,
    )
    la.fit(data, progress_bar=False)
    if optimize:
        with pytest.warns(UserWarning, match="link_approx"):
            la.optimize_prior_precision(pred_type="glm", method="marglik", prior_structure="scalar")
    return la


def _their_probs(la, dl) -> torch.Tensor:
    return torch.cat([la(x, pred_type="glm", link_approx="probit").detach() for x, _ in dl])


def test_last_layer_laplace_is_laplace_torchs_own():
    """Fit, marglik λ and GLM probit predictive equal laplace-torch's documented recipe on the same model."""
    model = _peft_model()
    fit = B.fit_last_layer_laplace(model, _loader(), prior_precision=1.0)
    theirs = _their_lla(model, _loader())
    assert fit.prior_precision == pytest.approx(theirs.prior_precision.item(), rel=1e-4)
    test = _loader(n=20, seed=1, batch_size=8)
    torch.testing.assert_close(
        B.last_layer_predict(fit, test)[0], _their_probs(theirs, test), rtol=0, atol=1e-5
    )


def test_last_layer_laplace_on_a_subset_stands_for_the_training_set():
    """Fitted on n = 24 of N = 48 examples, the curvature counts each of them N / n = 2 times: the same
    posterior and predictive as laplace-torch's fit on those 24 examples given twice."""
    model = _peft_model()
    x, y = _loader(n=24).dataset.tensors
    half = B.fit_last_layer_laplace(
        model, DataLoader(TensorDataset(x, y), batch_size=8), optimize_prior=False, n_train=48
    )
    twice = DataLoader(TensorDataset(torch.cat([x, x]), torch.cat([y, y])), batch_size=8)
    theirs = _their_lla(model, twice, optimize=False)
    torch.testing.assert_close(
        half.la.posterior_precision.to_matrix(), theirs.posterior_precision.to_matrix(), rtol=1e-4, atol=1e-5
    )
    test = _loader(n=20, seed=1, batch_size=8)
    torch.testing.assert_close(
        B.last_layer_predict(half, test)[0], _their_probs(theirs, test), rtol=0, atol=1e-5
    )
    once = _their_lla(model, DataLoader(TensorDataset(x, y), batch_size=8), optimize=False)
    assert (_their_probs(once, test) - _their_probs(theirs, test)).abs().max() > 1e-3  # N / n is visible
