"""The precisions the layer-wise study and its baselines mix on a GPU. Fine-tuning and the nn predictive
run the backbone under bf16 autocast; the Laplace fit, the glm predictive, temperature scaling and
last-layer Laplace run in fp32; each predictive's MAP reference must be computed in that predictive's
own precision, or Δ = metric(MAP) − metric(Bayes) measures rounding, not the posterior.

On CUDA (marker ``gpu``; skipped with a reason where no CUDA device is visible), and on the CPU with the
GPU's bf16 autocast emulated (``distlap.runtime.autocast`` -> ``torch.autocast("cpu", torch.bfloat16)``):
the baselines (``protocol.fit_baselines``, ``protocol.probs_on``) against the fp32 MAP computed here.

Tolerances (a tiny random ViT, 3 classes, inputs ~ N(0, 1)):
- fp32 on CUDA vs fp32 on CPU: probabilities within 1e-3, GGN diagonal within 1e-3 relative (cuDNN may
  run the patch-embedding convolution in TF32, torch's default).
- bf16 autocast vs fp32: probabilities within 2e-2 (bf16 keeps 8 significant bits: ~4e-3 relative per
  logit, a few roundings deep), and the same predicted class for at least 95% of the examples.
- a predictive's MAP reference vs the same predictive at zero posterior variance: within 1e-5 (same
  precision, same operations); across precisions the gap is the bf16 one above.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distlap import metrics, names, protocol, runtime
from distlap.bayes import baselines, predictive
from distlap.bayes.glm import glm_pass, param_blocks, probit_probs
from distlap.bayes.layerwise import LaplaceData, Scoring, map_reference, run_layerwise
from distlap.bayes.posterior import build_posterior, fit_laplace, posterior_parameters
from distlap.bayes.predictive import nn_predictive
from distlap.config import LaplaceConfig
from distlap.runtime import predict
from helpers import loader, lora_model

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
PRIOR = 2.0
DEVICES = [pytest.param("cpu-bf16", id="cpu-emulated-bf16"), pytest.param("cuda", marks=pytest.mark.gpu)]


def _fitted(device: torch.device):
    """The same tiny LoRA model on ``device`` and a diag Laplace fitted there (fp32)."""
    model = copy.deepcopy(lora_model()).to(device)
    names = posterior_parameters(model, "lora", True)
    la = fit_laplace(model, names, loader(), LaplaceConfig(), PRIOR)
    return model, la, param_blocks(model, la)


def _glm(device: torch.device):
    model, la, blocks = _fitted(device)
    table = glm_pass(model, la, blocks, loader(seed=1), device)
    return la, table, probit_probs(table.logits, table.variances, range(max(blocks) + 1))


@pytest.mark.gpu
def test_fp32_curvature_and_glm_on_cuda_match_the_cpu():
    la_cpu, cpu, probs_cpu = _glm(CPU)
    la_gpu, gpu, probs_gpu = _glm(CUDA)
    torch.testing.assert_close(la_gpu.H.cpu(), la_cpu.H, rtol=1e-3, atol=1e-6)
    assert gpu.logits.dtype == gpu.variances.dtype == torch.float32
    torch.testing.assert_close(probs_gpu, probs_cpu, rtol=0, atol=1e-3)
    torch.testing.assert_close(gpu.logits.softmax(-1), cpu.logits.softmax(-1), rtol=0, atol=1e-3)


@pytest.mark.gpu
def test_bf16_map_agrees_with_the_fp32_glm_reference():
    """The MAP's own predictive (``runtime.predict``: bf16 autocast on CUDA) against the glm study's MAP
    reference (the fp32 logits of the Jacobian pass): close, but the study compares like with like."""
    model, la, blocks = _fitted(CUDA)
    bf16, _ = predict(model, loader(seed=1), CUDA)
    fp32 = glm_pass(model, la, blocks, loader(seed=1), CUDA).logits.softmax(-1)
    assert (bf16 - fp32).abs().max() <= 2e-2
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.95


@pytest.mark.gpu
def test_glm_map_reference_is_the_glm_predictive_at_zero_variance():
    _, table, _ = _glm(CUDA)
    torch.testing.assert_close(probit_probs(table.logits, table.variances, ()), table.logits.softmax(-1))


def _nn_setup():
    model = copy.deepcopy(lora_model()).to(CUDA)
    cfg = LaplaceConfig(n_samples=8, n_sample_sets=2)
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=PRIOR, seed=0)
    data = LaplaceData(model, "lora", loader(), loader(seed=2), loader(seed=1), 48, CUDA)
    return model, post, data


@pytest.mark.gpu
def test_nn_map_reference_is_in_the_nn_predictives_own_precision():
    """map_reference (bf16 autocast, as the samples) equals the nn predictive with every sample at θ*."""
    model, post, data = _nn_setup()
    ref = map_reference(data)
    at_map = copy.copy(post)
    at_map.deltas = torch.zeros_like(post.deltas)
    probs, _ = nn_predictive(model, at_map, range(4), data.test, CUDA)
    torch.testing.assert_close(probs.mean(0), ref.test_probs, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_nn_predictive_in_bf16_agrees_with_fp32():
    model, post, data = _nn_setup()
    bf16, _ = nn_predictive(model, post, range(4), data.test, CUDA)  # autocast on CUDA
    fp32, _ = nn_predictive(copy.deepcopy(model).cpu(), post, range(4), data.test, CPU)
    assert (bf16 - fp32).abs().max() <= 2e-2
    assert (bf16.mean(0).argmax(-1) == fp32.mean(0).argmax(-1)).float().mean() >= 0.95


# --- the baselines' MAP reference: fp32, the glm study's, whatever autocast does -------------------


def _device(kind: str, monkeypatch) -> torch.device:
    """CUDA as it is, or the CPU with every ``runtime.autocast`` turned into bf16 (as on CUDA)."""
    if kind == "cuda":
        return CUDA
    bf16 = lambda device: torch.autocast("cpu", dtype=torch.bfloat16)
    monkeypatch.setattr(runtime, "autocast", bf16)
    monkeypatch.setattr(predictive, "autocast", bf16)
    return CPU


def _split(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 3, (n,), generator=g))


def _trial(device: torch.device):
    """What ``fit_baselines`` reads of a fine-tuned trial (a LoRA tiny ViT, random splits) and its glm
    study (the subsets 'all' and 'layer_0')."""
    splits = SimpleNamespace(train=_split(64, 0), val=_split(48, 1), test=_split(48, 2))
    la_cfg = LaplaceConfig(fit_examples=None, batch_size=16, n_bootstrap=20, shapley_bootstrap=0)

    def loader_of(split, *, batch_size=16, max_examples=None):
        return DataLoader(getattr(splits, split), batch_size=batch_size)

    cfg = SimpleNamespace(laplace=la_cfg, n_bins=10, seed=0)
    ft = SimpleNamespace(
        model=copy.deepcopy(lora_model()).to(device), splits=splits, loader=loader_of, cfg=cfg, device=device
    )
    data = LaplaceData(ft.model, "lora", loader_of("train"), loader_of("val"), loader_of("test"), 64, device)
    study = run_layerwise(
        data,
        la_cfg,
        prior_precision=PRIOR,
        scoring=Scoring(10, 20, 0),
        only=("all", "layer_0"),
        log=lambda m: None,
    )
    return ft, study


def _fp32_logits(ft, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The MAP's logits in fp32, computed here: the model's forward with no autocast at all."""
    x, y = getattr(ft.splits, split).tensors
    with torch.no_grad():
        return ft.model.eval()(x.to(ft.device)).float().cpu(), y


def _scores(probs, labels) -> dict[str, float]:
    return metrics.summarize(probs, labels, 10)


@pytest.mark.parametrize("kind", DEVICES)
def test_baselines_are_compared_with_the_fp32_map_of_the_glm_study(kind, monkeypatch):
    """Temperature scaling and last-layer Laplace: their Δs over the MAP are over the fp32 MAP (the
    glm subsets' reference), not over the autocast MAP that ``runtime.predict`` gives."""
    device = _device(kind, monkeypatch)
    ft, study = _trial(device)
    logits, labels = _fp32_logits(ft, "test")
    fp32 = logits.softmax(-1)
    autocast_map, _ = predict(ft.model, ft.loader("test"), device)
    map_nll = metrics.negative_log_likelihood(fp32, labels)
    assert abs(metrics.negative_log_likelihood(autocast_map, labels) - map_nll) > 1e-5  # bf16 is visible
    torch.testing.assert_close(study.result["map"]["metrics"][names.score("map", "test", "nll")], map_nll)
    fitted, rows = protocol.fit_baselines(ft, study)
    expected = {
        "temp": torch.softmax(logits.double() / fitted.temperature, -1).float(),
        "lla": baselines.last_layer_predict(fitted.lla, ft.loader("test"))[0],
    }
    for pred, probs in expected.items():
        ours, ref = _scores(probs, labels), _scores(fp32, labels)
        for s in names.SCORES:
            want = names.improvement(s, ours[s], ref[s])
            assert rows[pred]["metrics"][names.delta(pred, "test", s)] == pytest.approx(want, abs=1e-6), (
                pred,
                s,
            )
    on_test = protocol.probs_on(ft, study, fitted, ft.loader("test"))
    torch.testing.assert_close(on_test["map"], fp32, rtol=0, atol=1e-5)
    torch.testing.assert_close(on_test["temp"], expected["temp"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", DEVICES)
def test_every_fp32_predictive_at_zero_variance_is_its_reference(kind, monkeypatch):
    """T = 1, last-layer Laplace at λ = 1e10 and the glm subsets at λ = 1e12 give the MAP's own
    probabilities (1e-5), and their Δs over the MAP vanish."""
    device = _device(kind, monkeypatch)
    ft, study = _trial(device)
    fit_lla = protocol.fit_last_layer_laplace
    monkeypatch.setattr(protocol, "fit_temperature", lambda *a: SimpleNamespace(temperature=1.0))
    monkeypatch.setattr(
        protocol,
        "fit_last_layer_laplace",
        lambda model, loader, **kw: fit_lla(model, loader, **kw, prior_precision=1e10, optimize_prior=False),
    )
    fitted, rows = protocol.fit_baselines(ft, study)
    val = _scores(_fp32_logits(ft, "val")[0].softmax(-1), ft.splits.val.tensors[1])
    for pred in ("temp", "lla"):
        m = rows[pred]["metrics"]
        for s in names.SCORES:
            assert abs(m[names.delta(pred, "test", s)]) <= 1e-5, (pred, s)
            assert m[names.score(pred, "val", s)] == pytest.approx(val[s], abs=1e-5), (pred, s)
    study.predictive = dataclasses.replace(study.predictive, prior_precision=1e12)
    on_test = protocol.probs_on(ft, study, fitted, ft.loader("test"))
    fp32 = _fp32_logits(ft, "test")[0].softmax(-1)
    for pred in ("map", "temp", "lla", "all", "layer_0"):
        torch.testing.assert_close(on_test[pred], fp32, rtol=0, atol=1e-5, msg=pred)
