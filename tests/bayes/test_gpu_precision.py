"""On CUDA (marker ``gpu``; skipped with a reason where no CUDA device is visible): the precisions the
layer-wise study mixes there. Fine-tuning and the nn predictive run the backbone under bf16 autocast;
the Laplace fit and the glm predictive run in fp32; each predictive's MAP reference must be computed in
that predictive's own precision, or Δ = metric(MAP) − metric(Bayes) measures rounding, not the posterior.

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

import pytest
import torch

from distlap.bayes.glm import glm_pass, param_blocks, probit_probs
from distlap.bayes.layerwise import LaplaceData, map_reference
from distlap.bayes.posterior import build_posterior, fit_laplace, posterior_parameters
from distlap.bayes.predictive import nn_predictive
from distlap.config import LaplaceConfig
from distlap.runtime import predict
from helpers import loader, lora_model

pytestmark = pytest.mark.gpu
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
PRIOR = 2.0


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


def test_fp32_curvature_and_glm_on_cuda_match_the_cpu():
    la_cpu, cpu, probs_cpu = _glm(CPU)
    la_gpu, gpu, probs_gpu = _glm(CUDA)
    torch.testing.assert_close(la_gpu.H.cpu(), la_cpu.H, rtol=1e-3, atol=1e-6)
    assert gpu.logits.dtype == gpu.variances.dtype == torch.float32
    torch.testing.assert_close(probs_gpu, probs_cpu, rtol=0, atol=1e-3)
    torch.testing.assert_close(gpu.logits.softmax(-1), cpu.logits.softmax(-1), rtol=0, atol=1e-3)


def test_bf16_map_agrees_with_the_fp32_glm_reference():
    """The MAP's own predictive (``runtime.predict``: bf16 autocast on CUDA) against the glm study's MAP
    reference (the fp32 logits of the Jacobian pass): close, but the study compares like with like."""
    model, la, blocks = _fitted(CUDA)
    bf16, _ = predict(model, loader(seed=1), CUDA)
    fp32 = glm_pass(model, la, blocks, loader(seed=1), CUDA).logits.softmax(-1)
    assert (bf16 - fp32).abs().max() <= 2e-2
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.95


def test_glm_map_reference_is_the_glm_predictive_at_zero_variance():
    _, table, _ = _glm(CUDA)
    torch.testing.assert_close(probit_probs(table.logits, table.variances, ()), table.logits.softmax(-1))


def _nn_setup():
    model = copy.deepcopy(lora_model()).to(CUDA)
    cfg = LaplaceConfig(n_samples=8, n_sample_sets=2)
    post = build_posterior(model, "lora", loader(), cfg, prior_precision=PRIOR, seed=0)
    data = LaplaceData(model, "lora", loader(), loader(seed=2), loader(seed=1), 48, CUDA)
    return model, post, data


def test_nn_map_reference_is_in_the_nn_predictives_own_precision():
    """map_reference (bf16 autocast, as the samples) equals the nn predictive with every sample at θ*."""
    model, post, data = _nn_setup()
    ref = map_reference(data)
    at_map = copy.copy(post)
    at_map.deltas = torch.zeros_like(post.deltas)
    probs, _ = nn_predictive(model, at_map, range(4), data.test, CUDA)
    torch.testing.assert_close(probs.mean(0), ref.test_probs, rtol=0, atol=1e-5)


def test_nn_predictive_in_bf16_agrees_with_fp32():
    model, post, data = _nn_setup()
    bf16, _ = nn_predictive(model, post, range(4), data.test, CUDA)  # autocast on CUDA
    fp32, _ = nn_predictive(copy.deepcopy(model).cpu(), post, range(4), data.test, CPU)
    assert (bf16 - fp32).abs().max() <= 2e-2
    assert (bf16.mean(0).argmax(-1) == fp32.mean(0).argmax(-1)).float().mean() >= 0.95
