"""distlap.bayes.baselines: temperature scaling on toys with a known answer; last-layer Laplace on peft."""

import math

import pytest
import torch
from conftest import make_tiny_vit
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


def test_temperature_is_the_nll_minimiser():
    z, y = _calibrated_logits(n=3000, seed=3)
    fit = B.fit_temperature(1.7 * z.float(), y)

    def nll(t):
        return nn.functional.cross_entropy(1.7 * z / t, y).item()

    assert fit.nll_after == pytest.approx(nll(fit.temperature), abs=1e-6)
    for t in (0.5, 0.9, 0.99, 1.01, 1.1, 2, 4):
        assert fit.nll_after <= nll(t * fit.temperature) + 1e-12


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


def test_last_layer_laplace_subset_temperature_scales_the_curvature():
    model = _peft_model()
    full = B.fit_last_layer_laplace(model, _loader(), optimize_prior=False)
    half = B.fit_last_layer_laplace(model, _loader(n=24), optimize_prior=False, n_train=48)
    assert (full.la.temperature, half.la.temperature) == (1.0, 0.5)  # curvature x N / n
