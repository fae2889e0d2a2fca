"""The GLM study: the global λ by each method, each subset's own λ_S, the rows at both, the MAP from the
same pass, and every row equal to the engine's probit predictive scored by distlap.metrics."""

from types import SimpleNamespace

import pytest
import torch
from laplace_peer import CPU, fit, loader, lora_model, lora_names

from distlap import metrics, names
from distlap.bayes.glm import glm_pass, param_blocks, probit_probs
from distlap.bayes.glm_study import choose_lambdas, glm_study, masks_of
from distlap.bayes.posterior import GRID
from distlap.bayes.prior import block_evidence, grid_prior_precision, marglik_prior_precision
from distlap.config import LaplaceConfig

SUBSETS = {"layer_1": (1,), "ends": (0, 3), "all": (0, 1, 2, 3)}


@pytest.fixture(scope="module")
def fitted():
    model = lora_model()
    la = fit(model, lora_names(model), "diag", "exact")
    blocks = param_blocks(model, la)
    val = glm_pass(model, la, blocks, loader(n=40, seed=3), CPU, GRID)
    return model, la, blocks, val


@pytest.mark.parametrize("method", ["fixed", "gridsearch", "marglik"])
def test_lambdas(fitted, method):
    _, la, blocks, val = fitted
    lam = choose_lambdas(la, blocks, val, SUBSETS, method, fixed=3.0)
    own, _ = grid_prior_precision(val, masks_of(SUBSETS, 4))
    assert lam.validation == dict(zip(SUBSETS, own.tolist()))
    evidence = block_evidence(la, blocks)
    assert lam.marglik["ends"] == pytest.approx(marglik_prior_precision(evidence, (0, 3)))
    expected = {"fixed": 3.0, "gridsearch": lam.validation["all"], "marglik": lam.marglik["all"]}[method]
    assert lam.global_ == pytest.approx(expected)


def test_rows_are_the_probit_predictive_at_the_global_and_own_lambda(fitted):
    model, la, _, _ = fitted
    data = SimpleNamespace(model=model, val=loader(n=40, seed=3), test=loader(n=60, seed=4), device=CPU)
    scoring = SimpleNamespace(n_bins=10, n_bootstrap=50, seed=0)
    cfg = LaplaceConfig(shapley_bootstrap=0)
    study = glm_study(data, cfg, la, SUBSETS, scoring, prior_precision=2.0, log=lambda m: None)
    x, y = (torch.cat(t) for t in zip(*data.test))
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(study["reference"].test_probs, logits.softmax(-1), rtol=1e-5, atol=1e-6)
    test = glm_pass(model, la, param_blocks(model, la), data.test, CPU, [2.0])
    for name, subset in SUBSETS.items():
        m = study["rows"][name]["metrics"]
        probs = probit_probs(test.logits, test.at(0), subset)
        assert m[names.score("subset", "test", "ece")] == pytest.approx(
            metrics.expected_calibration_error(probs, y, 10)
        )
        assert m[names.SUBSET_LAMBDA_VAL] in GRID.tolist() or m[names.SUBSET_LAMBDA_VAL] == pytest.approx(2.0)
        assert names.delta("subset_tuned", "test", "nll") in m
    assert sum(study["attribution"]["values"]["nll"]["shapley"]) == pytest.approx(
        study["rows"]["all"]["metrics"][names.delta("subset", "test", "nll")], abs=1e-9
    )
