import pytest
from pydantic import ValidationError

from distlap.sweep.space import OBJECTIVES, SearchConfig, SearchParam


def test_objectives_are_validation_scores_of_the_map_or_the_posterior():
    assert "bayes/val/nll" in OBJECTIVES and "map/val/accuracy" in OBJECTIVES
    assert not any("/test/" in o for o in OBJECTIVES)


@pytest.mark.parametrize(
    "metric, direction", [("bayes/val/nll", "min"), ("map/val/accuracy", "max"), ("bayes/val/ece", "min")]
)
def test_direction_follows_the_vocabulary(metric, direction):
    assert SearchConfig(metric=metric).direction == direction
    assert SearchConfig(metric=metric, mode="max").direction == "max"


def test_nested_space_flattens_to_dotted_settings():
    cfg = SearchConfig(
        space={
            "train": {"prior_precision": {"kind": "loguniform", "low": 1, "high": 10}},
            "peft": {"rank": {"kind": "choice", "values": [2, 4]}, "alpha": None},
        }
    )
    assert set(cfg.space) == {"train.prior_precision", "peft.rank"}
    assert cfg.space["train.prior_precision"].ends() == [1, 10]


def test_grid_takes_its_size_from_the_choices():
    space = {
        "peft.rank": {"kind": "choice", "values": [2, 4, 8]},
        "seed": {"kind": "choice", "values": [0, 1]},
    }
    assert SearchConfig(space=space, sampler="grid").num_samples == 6
    with pytest.raises(ValidationError, match="the grid has 6 points"):
        SearchConfig(space=space, sampler="grid", num_samples=5)
    with pytest.raises(ValidationError, match="train.lr are ranges"):
        SearchConfig(space={**space, "train.lr": {"kind": "uniform", "low": 0.1, "high": 1}}, sampler="grid")


@pytest.mark.parametrize(
    "param, match",
    [
        ({"kind": "choice"}, "non-empty `values`"),
        ({"kind": "uniform", "low": 2, "high": 1}, "low < high"),
        ({"kind": "loguniform", "low": 0, "high": 1}, "low > 0"),
    ],
)
def test_bad_ranges_are_refused(param, match):
    with pytest.raises(ValidationError, match=match):
        SearchParam(**param)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"seeds": []}, r"need distinct seeds >= 0"),
        ({"seeds": [0, 0]}, r"need distinct seeds >= 0"),
        ({"seeds": [0, 1, 2], "num_samples": 4}, r"num_samples=4 is not a multiple of the 3 search.seeds"),
        ({"space": {"seed": {"kind": "choice", "values": [0, 1]}}}, r"TPE would optimise the seed"),
    ],
)
def test_bad_seeds_fail_before_work(fields, match):
    with pytest.raises(ValidationError, match=match):
        SearchConfig(**fields)


def test_seeds_repeat_every_configuration():
    assert SearchConfig(seeds=[0, 1, 2], num_samples=6).n_seeds == 3
    assert SearchConfig().n_seeds == 1 and SearchConfig().seeds is None
    grid = {"peft.rank": {"kind": "choice", "values": [2, 4]}}
    assert SearchConfig(sampler="grid", space=grid, seeds=[0, 1, 2]).num_samples == 6
    with pytest.raises(ValidationError, match=r"grid has 2 points x 3 seeds"):
        SearchConfig(sampler="grid", space=grid, seeds=[0, 1, 2], num_samples=2)
