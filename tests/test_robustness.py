"""The answer's robustness to θ̂ not being a mode: the comparison of two layer-wise answers, and the
refinement that makes the second one (θ̂ restored after)."""

import math

import pytest
import torch
from torch.nn import functional as F

from distlap import names
from distlap.config import load_config
from distlap.finetune.run import fine_tune
from distlap.robustness import compare, robustness
from distlap.trial import restudy
from helpers import study_of, tiny_trial

TEST, VAL = names.delta("subset", "test", "ece"), names.score("subset", "val", "ece")


def _result(test_deltas: dict[str, float], val_ece: dict[str, float], map_val_ece: float = 0.2) -> dict:
    blocks = {"layer_0": [0], "layer_1": [1], "layer_2": [2], "layer_3": [3], "early": [0, 1]}
    blocks |= {"mid": [2], "late": [3], "all": [0, 1, 2, 3]}
    return {
        "map": {"metrics": {names.score("map", "val", "ece"): map_val_ece}},
        "subsets": {
            s: {"blocks": b, "metrics": {TEST: test_deltas[s], VAL: val_ece[s]}} for s, b in blocks.items()
        },
    }


SUBSETS = ("layer_0", "layer_1", "layer_2", "layer_3", "early", "mid", "late", "all")


def test_compare_by_hand():
    """4 blocks, one discordant pair of 6: τ = (5 − 1) / 6; top block and best group chosen on
    VALIDATION (where test says otherwise, validation decides); the largest change over every subset."""
    first = _result(
        dict(zip(SUBSETS, [0.10, 0.08, 0.05, 0.01, 0.09, 0.05, 0.01, 0.07])),
        dict(zip(SUBSETS, [0.15, 0.10, 0.18, 0.19, 0.12, 0.18, 0.19, 0.16])),  # val: layer_1 best
    )
    second = _result(
        dict(zip(SUBSETS, [0.08, 0.10, 0.05, 0.01, 0.09, 0.05, 0.01, 0.02])),  # layers 0, 1 swap on test
        dict(zip(SUBSETS, [0.15, 0.11, 0.18, 0.19, 0.12, 0.18, 0.19, 0.16])),  # val: still layer_1
    )
    out = compare(first, second)
    assert out[names.ROBUST_TAU] == pytest.approx(4 / 6)
    assert out[names.ROBUST_TOP] is True  # validation picks layer_1 at both points (test would not)
    assert out[names.ROBUST_GROUP] is True  # early on validation at both
    assert out[names.ROBUST_CHANGE] == pytest.approx(0.05)  # 'all': 0.07 -> 0.02
    third = _result(
        dict(zip(SUBSETS, [0.01, 0.05, 0.08, 0.10, 0.0, 0.0, 0.0, 0.0])),  # the blocks' order reversed
        dict(zip(SUBSETS, [0.15, 0.10, 0.18, 0.01, 0.12, 0.18, 0.01, 0.16])),  # val: layer_3, late
    )
    out = compare(first, third)
    assert out[names.ROBUST_TAU] == pytest.approx(-1.0)  # the order reversed
    assert out[names.ROBUST_TOP] is False and out[names.ROBUST_GROUP] is False


def test_blocks_equal_below_the_resolution_are_ties():
    """Every block switched off (Δ ~ 1e-5 noise) at both points: no order to compare (τ undefined), and
    the first of the tied blocks is 'chosen' at both points, so the choice agrees."""
    noise = [3e-5, -2e-5, 1e-5, 0.0, 4e-5, -1e-5, 2e-5, 1e-5]
    flat = _result(dict(zip(SUBSETS, noise)), dict.fromkeys(SUBSETS, 0.2))
    other = _result(dict(zip(SUBSETS, noise[::-1])), {s: 0.2 + 1e-5 * i for i, s in enumerate(SUBSETS)})
    out = compare(flat, other)
    assert math.isnan(out[names.ROBUST_TAU]) and out[names.ROBUST_TOP] and out[names.ROBUST_GROUP]


def _naive_stationarity(ft) -> float:
    """‖∇(mean NLL + λ/(2N)‖θ − θ₀‖²)‖ / ‖∇ mean NLL‖ over the whole training split, written out."""
    params = [p for p in ft.model.parameters() if p.requires_grad]
    named = dict(ft.model.named_parameters())
    ft.model.eval()
    nll = sum(
        F.cross_entropy(ft.model(x), y, reduction="sum") for x, y in ft.loader("train", batch_size=64)
    ) / len(ft.splits.train)
    lam, n = ft.cfg.train.prior_precision, len(ft.splits.train)
    penalty = lam / (2 * n) * sum(((named[k] - m) ** 2).sum() for k, m in ft.prior.means.items())
    g_nll = torch.cat([g.reshape(-1) for g in torch.autograd.grad(nll, params, retain_graph=True)])
    g_joint = torch.cat([g.reshape(-1) for g in torch.autograd.grad(nll + penalty, params)])
    return (g_joint.norm() / g_nll.norm()).item()


def test_refinement_moves_toward_the_mode_then_restores_theta_hat(fake_fmnist_dir, tiny_vit_dir):
    cfg = load_config(
        overrides=[
            *tiny_trial(fake_fmnist_dir, tiny_vit_dir),
            "train.prior_precision=10",
            "train.refine_steps=40",
            "train.num_threads=1",
            "laplace.fit_examples=64",
            "laplace.n_bootstrap=20",
            "laplace.shapley_bootstrap=0",
        ]
    )
    ft = fine_tune(cfg, log=lambda m: None)
    assert cfg.train.regime == "posthoc" and ft.train.lbfgs_steps == 0
    assert ft.train.stationarity == pytest.approx(_naive_stationarity(ft), rel=1e-4)
    study = study_of(ft)
    theta_hat = {n: p.detach().clone() for n, p in ft.model.named_parameters()}
    seen = {}

    def spy(lam):  # the second study runs at the refined point: measure it there, independently
        seen["stationarity"] = _naive_stationarity(ft)
        seen["lambda"] = lam
        return restudy(ft, lam)

    out = robustness(ft, study, spy, log=lambda m: None)
    assert seen["lambda"] == study.result[names.PRIOR_PRECISION]
    assert out[names.ROBUST_AFTER] == pytest.approx(seen["stationarity"], rel=1e-4)
    assert out[names.ROBUST_BEFORE] == ft.train.stationarity
    halved = out[names.ROBUST_AFTER] <= out[names.ROBUST_BEFORE] / 2
    assert out[names.ROBUST_MOVED] == halved and 0 < out[names.ROBUST_STEPS] <= 40
    if out[names.ROBUST_STEPS] < 40:  # stopped early: at the target, refine_to x the start
        assert out[names.ROBUST_AFTER] <= cfg.train.refine_to * out[names.ROBUST_BEFORE]
    assert -1 <= out[names.ROBUST_TAU] <= 1 and out[names.ROBUST_CHANGE] >= 0
    now = dict(ft.model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in theta_hat.items())  # θ̂ back, bit for bit
