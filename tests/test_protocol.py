"""The protocol beyond the subsets: baselines, shift and OOD scores on one fine-tuned trial, checked
against naive recomputations (scikit-learn's AUROC, plain means over the corrupted sets)."""

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from distlap import intervals, names, protocol
from distlap.finetune.data import make_loader
from distlap.runtime import predict
from helpers import study_of


@pytest.fixture(scope="module")
def evaluated(fine_tuned):
    cfg = fine_tuned.cfg.model_copy(
        update={
            "shift": fine_tuned.cfg.shift.model_copy(
                update={
                    "corruptions": ["gaussian_noise", "contrast"],
                    "severities": [1, 5],
                    "max_examples": 40,
                }
            ),
            "ood": fine_tuned.cfg.ood.model_copy(update={"max_examples": 60}),
        }
    )
    ft = dataclasses.replace(fine_tuned, cfg=cfg)
    study = study_of(ft, only=("layer_0", "all"))
    return ft, study, protocol.evaluate(ft, study, log=lambda m: None)


def test_rows_for_baselines_and_subsets_carry_shift_and_ood(evaluated):
    _, _, result = evaluated
    assert set(result["baselines"]) == {"temp", "lla"}
    rows = {"map": result["map"], **result["baselines"], **result["subsets"]}
    for name, row in rows.items():
        key = "subset" if name in result["subsets"] else name
        m = row["metrics"]
        for score in names.SCORES:
            assert names.score(key, "shift", score) in m, (name, score)
        for which in ("near_ood", "far_ood"):
            assert 0 <= m[names.ood(key, which, "auroc_maxprob")] <= 1
    assert result["protocol"][names.TEMPERATURE] > 0 and result["protocol"][names.LLA_PRIOR] > 0


def test_shift_mean_is_the_mean_over_corrupted_sets(evaluated):
    _, _, result = evaluated
    assert set(result["shift"]["map"]) == {"gaussian_noise/1", "gaussian_noise/5", "contrast/1", "contrast/5"}
    for pred, per_set in result["shift"].items():
        row = (result["baselines"].get(pred) or result["subsets"].get(pred) or result["map"])["metrics"]
        key = "subset" if pred in result["subsets"] else pred
        for score in names.SCORES:
            mean = np.mean([s[score] for s in per_set.values()])
            assert row[names.score(key, "shift", score)] == pytest.approx(mean, abs=1e-12)
            if pred != "map":
                base = result["map"]["metrics"][names.score("map", "shift", score)]
                delta = names.improvement(score, mean, base)
                assert row[names.delta(key, "shift", score)] == pytest.approx(delta, abs=1e-12)


def test_map_ood_auroc_is_scikit_learns(evaluated):
    ft, _, result = evaluated
    test, _ = predict(ft.model, ft.loader("test"), ft.device)
    for which, dataset in protocol.ood_sets(ft):
        loader = make_loader(dataset, 64, shuffle=False, seed=0, transform=ft.transform)
        ood, _ = predict(ft.model, loader, ft.device)
        y = np.r_[np.ones(len(test)), np.zeros(len(ood))]
        score = torch.cat([test, ood]).max(-1).values.numpy()
        expected = roc_auc_score(y, score)
        assert result["map"]["metrics"][names.ood("map", which, "auroc_maxprob")] == pytest.approx(
            expected, abs=1e-4
        )


def test_corrupted_sets_are_seeded(evaluated):
    ft, _, _ = evaluated
    a, b = protocol.shifted_sets(ft), protocol.shifted_sets(ft)
    assert [n for n, _ in a] == ["gaussian_noise/1", "gaussian_noise/5", "contrast/1", "contrast/5"]
    for (_, x), (_, y) in zip(a, b):
        assert torch.equal(x.tensors[0], y.tensors[0])
    assert not torch.equal(a[0][1].tensors[0], a[1][1].tensors[0])  # severity changes the images


def test_near_ood_holds_only_unseen_classes(evaluated):
    ft, _, _ = evaluated
    near = dict(protocol.ood_sets(ft))["near_ood"]
    assert len(near) == 60 and near.tensors[0].shape[1:] == ft.splits.test.tensors[0].shape[1:]


def test_inference_replicates_agree_with_the_rows(evaluated):
    """The saved replicates' estimates are the rows' improvements (glm is deterministic), every predictive
    is tested against the MAP and every pair of them against each other, in families whose adjusted p and
    simultaneous intervals agree."""
    _, _, result = evaluated
    inf = result["inference"]
    rows = {**result["subsets"], **result["baselines"]}
    ece = inf["replicates"]["ece"]
    assert set(ece["names"]) == set(rows) and len(ece["replicates"][0]) == inf["n_resamples"]
    for k, name in enumerate(ece["names"]):
        key = "subset" if name in result["subsets"] else name
        for score in ("ece", "nll", "accuracy"):
            got = inf["replicates"][score]["estimate"][k]
            assert got == pytest.approx(rows[name]["metrics"][names.delta(key, "test", score)], abs=1e-6)
    for family in (*inf["vs_map"].values(), inf["pairwise"]):
        assert family["resolvable"] and family["design"] == "single"
        for row in family["rows"]:
            assert row["p_adjusted"] >= row["p"] and row["low"] <= row["estimate"] <= row["high"]
            assert row["distinguishable"] == (row["p_adjusted"] < 0.05) == (row["low"] > 0 or row["high"] < 0)
    n = len(ece["names"])
    assert len(inf["pairwise"]["rows"]) == n * (n - 1) // 2


def test_inference_is_seeded_by_the_test_set_it_records(evaluated):
    """The example resamples follow the test set, not the training seed: seeds sharing a test set share
    them (crossed); the identity lets the analysis tell that from seeds with their own test draw."""
    ft, _, result = evaluated
    inf = result["inference"]
    assert inf[names.TEST_SET] == intervals.test_set_identity(*ft.splits.test.tensors)
    assert inf[names.BOOTSTRAP_SEED] == intervals.bootstrap_seed(inf[names.TEST_SET])
    assert inf["training_seed"] == ft.cfg.seed
