"""The whole layer-wise stage on a tiny fine-tuned trial: the pipeline's steps, its files and schema."""

import json

import pytest

from distlap import names
from distlap.bayes.layerwise import select_subsets, write_results
from distlap.runtime import predict
from helpers import study_of

SUBSET_TEST, MAP_TEST = names.scores("subset", "test"), names.scores("map", "test")
DELTA = names.delta("subset", "test", "ece")


@pytest.fixture(scope="module")
def trial(fine_tuned):
    return fine_tuned


def run(ft, laplace=None, **kw):
    return study_of(ft, laplace, **kw).result


def test_select_subsets_names_the_unknown_ones():
    assert list(select_subsets(4, {}, ["all", "late"])) == ["all", "late"]
    with pytest.raises(ValueError, match=r"no layer subsets named \['layer_9'\]"):
        select_subsets(4, {}, ["layer_9"])


def _check_rows(result, trial, extra_keys):
    map_ece = result["map"]["metrics"][MAP_TEST["ece"]]
    low, high = names.interval(DELTA)
    allowed = {*names.scores("subset", "val").values(), *SUBSET_TEST.values(), low, high, *extra_keys}
    allowed |= {names.delta("subset", split, s) for s in names.SCORES for split in ("val", "test")}
    for row in result["subsets"].values():
        m = row["metrics"]
        assert m[DELTA] == pytest.approx(map_ece - m[SUBSET_TEST["ece"]], abs=1e-12)
        assert m[names.delta("subset", "test", "accuracy")] == pytest.approx(
            m[SUBSET_TEST["accuracy"]] - result["map"]["metrics"][MAP_TEST["accuracy"]], abs=1e-12
        )
        assert m[low] <= m[DELTA] <= m[high]
        val_ece = (
            result["map"]["metrics"][names.score("map", "val", "ece")]
            - m[names.score("subset", "val", "ece")]
        )
        assert m[names.delta("subset", "val", "ece")] == pytest.approx(val_ece, abs=1e-12)
        assert sum(row["reliability"]["count"]) == len(trial.splits.test)
        assert set(m) <= allowed, set(m) - allowed
    assert (result["subsets"]["layer_0"]["blocks"], result["subsets"]["late"]["blocks"]) == ([0], [3])


def test_glm_study_rows_lambdas_attribution_and_files(trial, tmp_path):
    result = run(trial)
    write_results(result, tmp_path)
    on_disk = json.loads((tmp_path / names.LAYERWISE_FILE).read_text())
    assert on_disk["subsets"].keys() == result["subsets"].keys()
    assert list(result["subsets"]) == [
        "layer_0",
        "layer_1",
        "layer_2",
        "layer_3",
        "early",
        "mid",
        "late",
        "all",
        "head_and_tail",
    ]
    assert result[names.N_BLOCKS] == 4 and result[names.PRIOR_METHOD] == "fixed"
    assert result[names.PREDICTIVE] == "glm" and result[names.PRIOR_PRECISION] == 50
    tuned = {k.replace("subset/", "subset_tuned/", 1) for k in SUBSET_TEST.values()}
    tuned |= {names.delta("subset_tuned", "test", s) for s in names.SCORES}
    _check_rows(result, trial, tuned | {names.SUBSET_LAMBDA_VAL, names.SUBSET_LAMBDA_MARGLIK})
    for name, row in result["subsets"].items():
        assert row["metrics"][names.SUBSET_LAMBDA_VAL] > 0
        png = (tmp_path / "plots" / f"reliability_{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    attribution = result["attribution"]["values"]["ece"]
    every = result["subsets"]["all"]["metrics"][DELTA]
    assert sum(attribution["shapley"]) == pytest.approx(every, abs=1e-9)  # efficiency: v(all) - v({})
    assert attribution["coalition_values"][0] == 0 and attribution["coalition_values"][-1] == pytest.approx(
        every
    )
    assert all(
        lo <= s <= hi
        for lo, s, hi in zip(attribution["shapley_low"], attribution["shapley"], attribution["shapley_high"])
    )


def test_glm_reference_is_the_maps_own_predictive(trial):
    """The MAP reference comes from the same pass and precision as the GLM predictive, and equals the
    network's own softmax."""
    result = run(trial, only=("all",))
    probs, labels = predict(trial.model, trial.loader("test"), trial.device)
    from distlap import metrics

    assert result["map"]["metrics"][MAP_TEST["nll"]] == pytest.approx(
        metrics.negative_log_likelihood(probs, labels), rel=1e-6
    )


def test_nn_rows(trial):
    la = trial.cfg.laplace.model_copy(update={"predictive": "nn"})
    result = run(trial, laplace=la)
    assert result[names.PREDICTIVE] == "nn" and result[names.N_SAMPLES] == 4 and "attribution" not in result
    _check_rows(result, trial, {names.SUBSET_TIME})
    assert all(row["metrics"][names.SUBSET_TIME] > 0 for row in result["subsets"].values())


def test_only_evaluates_the_named_subsets(trial):
    result = run(trial, only=("all",))
    assert list(result["subsets"]) == ["all"]


def test_block_updates_are_the_lora_factors_distance_from_the_prior_mean(trial):
    """Block b's update is ‖θ̂_b − θ₀_b‖ over its LoRA factors, θ₀ the trial's own prior mean (A at its
    initialisation, B at 0), computed here directly."""
    result = run(trial, only=("all",))
    expected = [0.0] * 4
    for name, p in trial.model.named_parameters():
        if "lora_" in name:
            block = int(name.split("layers.")[1].split(".")[0])
            expected[block] += float(((p.detach() - trial.prior.means[name]) ** 2).sum())
    assert result[names.BLOCK_UPDATE] == pytest.approx([v**0.5 for v in expected], rel=1e-6)
