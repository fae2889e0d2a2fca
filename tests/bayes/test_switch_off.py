"""The origin test of the zero anchor: σ_max(∇_W NLL) at a block's A = B = 0 against λ/(N·s), checked
against a per-example naive gradient and against the loss itself along the most descending direction."""

import pytest
import torch
from torch.nn import functional as F

from distlap.bayes.switch_off import lora_modules, switch_off_test
from helpers import loader, lora_model

N = 48


def _naive_sigma(model, block_modules, data) -> float:
    """Per example: the CE gradient in each module's base weight (A = B = 0 in the block), summed / N;
    σ_max from a dense SVD; the largest over the block's modules."""
    saved = {}
    for m in block_modules:
        for p in (*m.lora_A.parameters(), *m.lora_B.parameters()):
            saved[p] = p.detach().clone()
            p.data.zero_()
    sigmas = []
    for m in block_modules:
        w = m.base_layer.weight
        w.requires_grad_(True)
        total = torch.zeros_like(w)
        for x, y in data:
            for i in range(len(y)):
                loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
                total += torch.autograd.grad(loss, w)[0]
        w.requires_grad_(False)
        sigmas.append(torch.linalg.svdvals((total / N).double())[0].item())
    for p, value in saved.items():
        p.data.copy_(value)
    return max(sigmas)


def _modules(model, block):
    return [m for n, m in lora_modules(model) if f".layers.{block}." in n or f".layer.{block}." in n]


def test_sigma_equals_the_naive_per_example_gradient_and_factors_are_restored():
    model, data = lora_model(), loader(N)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tests = switch_off_test(model, data, prior_precision=1.0, n_train=N, device=torch.device("cpu"))
    assert [t["block"] for t in tests] == [0, 1, 2, 3]
    for t in tests:
        assert t["sigma"] == pytest.approx(_naive_sigma(model, _modules(model, t["block"]), data), rel=1e-4)
        scaling = _modules(model, t["block"])[0].scaling["default"]  # alpha / r = 16 / 2
        assert t["threshold"] == pytest.approx(1.0 / (N * scaling))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items())  # factors back, nothing left trainable
    assert all(not m.base_layer.weight.requires_grad for _, m in lora_modules(model))


@pytest.mark.parametrize("factor, silenced", [(0.5, False), (2.0, True)])
def test_the_origin_is_a_local_minimum_exactly_above_the_threshold(factor, silenced):
    """λ = factor · N·s·σ_max: along B = −ε u, A = ε vᵀ (the top singular pair of G) the negative log
    joint changes by ε²(λ/N − s σ_max) + O(ε³): it falls below the threshold and rises above it."""
    model, data = lora_model(), loader(N)
    cpu = torch.device("cpu")
    block = 1
    probe = switch_off_test(model, data, prior_precision=1.0, n_train=N, device=cpu)[block]
    scaling = 1.0 / (N * probe["threshold"])  # threshold = λ/(N s) at λ = 1
    lam = factor * N * scaling * probe["sigma"]
    test = switch_off_test(model, data, prior_precision=lam, n_train=N, device=cpu)[block]
    assert test["silenced"] is silenced
    # the most descending direction, in the module with the largest σ, everything else in the block at 0
    mods = _modules(model, block)
    for m in mods:
        for p in (*m.lora_A.parameters(), *m.lora_B.parameters()):
            p.data.zero_()
    grads = []
    for m in mods:
        w = m.base_layer.weight
        w.requires_grad_(True)
        loss = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in data) / N
        grads.append(torch.autograd.grad(loss, w)[0])
        w.requires_grad_(False)
    k = max(range(len(mods)), key=lambda i: torch.linalg.svdvals(grads[i])[0])
    u, s, vh = torch.linalg.svd(grads[k])

    def joint(eps: float) -> float:
        m = mods[k]
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight  # (r, in), (out, r)
        a.data.zero_(), b.data.zero_()
        a.data[0] = eps * vh[0]
        b.data[:, 0] = -eps * u[:, 0]
        with torch.no_grad():
            nll = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in data).item() / N
        return nll + lam / (2 * N) * (a.pow(2).sum() + b.pow(2).sum()).item()

    eps = 0.05
    change = joint(eps) - joint(0.0)
    assert (change > 0) is silenced
    assert change == pytest.approx(eps**2 * (lam / N - scaling * s[0].item()), rel=0.2)
