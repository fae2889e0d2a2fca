"""A fitted study's predictives on further data reproduce the study's own numbers on the same data."""

import pytest
import torch

from distlap import metrics, names
from distlap.bayes.predictive import nn_predictive
from distlap.bayes.predictors import GLMPredictive, NNPredictive
from distlap.runtime import predict
from helpers import study_of

SUBSET_NLL = names.score("subset", "test", "nll")


def test_glm_predictive_on_the_test_set_gives_the_studys_rows(fine_tuned):
    study = study_of(fine_tuned, only=("layer_0", "all"))
    assert isinstance(study.predictive, GLMPredictive)
    pred = study.predictive(fine_tuned.loader("test"), study.subsets)
    for name, probs in pred.subsets.items():
        row = study.result["subsets"][name]["metrics"]
        assert metrics.negative_log_likelihood(probs, pred.labels) == pytest.approx(row[SUBSET_NLL], rel=1e-6)
    map_probs, labels = predict(fine_tuned.model, fine_tuned.loader("test"), fine_tuned.device)
    torch.testing.assert_close(pred.map, map_probs, rtol=1e-5, atol=1e-6)
    assert torch.equal(pred.labels, labels)


def test_nn_predictive_replays_the_studys_samples(fine_tuned):
    la = fine_tuned.cfg.laplace.model_copy(update={"predictive": "nn"})
    study = study_of(fine_tuned, la, only=("late",))
    assert isinstance(study.predictive, NNPredictive)
    loader = fine_tuned.loader("test")
    pred = study.predictive(loader, study.subsets)
    direct, _ = nn_predictive(fine_tuned.model, study.predictive.posterior, [3], loader, fine_tuned.device)
    assert direct.shape[0] == la.n_sample_sets
    torch.testing.assert_close(pred.sets["late"], direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.subsets["late"], direct.mean(0))
    row = study.result["subsets"]["late"]["metrics"]  # the mean over sets of each set's NLL
    per_set = [metrics.negative_log_likelihood(p, pred.labels) for p in direct]
    assert sum(per_set) / len(per_set) == pytest.approx(row[SUBSET_NLL], rel=1e-5)
