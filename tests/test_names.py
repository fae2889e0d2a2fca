import pytest

from distlap import names


def test_scores_are_namespaced_by_predictive_and_split():
    assert names.score("map", "test", "ece") == "map/test/ece"
    assert names.scores("subset", "val") == {s: f"subset/val/{s}" for s in names.SCORES}
    assert names.delta("bayes", "test") == "bayes/test/delta_ece"
    assert names.delta("subset", "val", "nll") == "subset/val/delta_nll"
    assert names.interval("subset/test/delta_ece") == (
        "subset/test/delta_ece_low",
        "subset/test/delta_ece_high",
    )
    assert names.epoch_score("nll") == "epoch/val/nll"


@pytest.mark.parametrize("args", [("maps", "test", "ece"), ("map", "train", "ece"), ("map", "test", "acc")])
def test_parts_outside_the_vocabulary_are_refused(args):
    with pytest.raises(KeyError, match="is not a"):
        names.score(*args)


def test_improvement_is_positive_when_better_than_the_map():
    assert names.improvement("ece", 0.03, 0.05) == pytest.approx(0.02)  # lower ECE: better
    assert names.improvement("nll", 0.7, 0.5) == pytest.approx(-0.2)  # higher NLL: worse
    assert names.improvement("accuracy", 0.9, 0.8) == pytest.approx(0.1)  # higher accuracy: better


def test_every_key_is_described_with_its_direction():
    assert names.describe("map/test/ece").better == "lower"
    assert names.describe("bayes/val/accuracy").better == "higher"
    assert names.describe("subset/test/delta_nll").better == "higher"
    assert "lower bound" in names.describe("subset/test/delta_ece_low").label
    assert names.describe("best/map/test/nll").better == "lower"
    assert names.describe(names.TIME_PER_EPOCH).unit == "s"
    assert names.describe("epoch/val/ece").better == "lower"
    assert names.describe("peft.rank").label == "r"
    assert "lower is better" in names.describe("map/test/ece").axis()
    for key in ("map/test/acc", "nonsense", "subset/train/ece", "epoch/val/acc"):
        with pytest.raises(KeyError):
            names.describe(key)


def test_no_key_is_defined_twice():
    keys = [*names._SCALARS, *names.PARAMS, *names._COLUMNS]
    assert len(keys) == len(set(keys))
    composite = {f"{p}/{s}/{n}" for p in names.PREDICTIVES for s in names.SPLITS for n in names.SCORES}
    assert not composite & set(keys)
