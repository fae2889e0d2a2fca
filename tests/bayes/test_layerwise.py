"""The whole layer-wise stage on a tiny fine-tuned trial: the pipeline's steps, its files and schema."""

import json

import pytest
import torch

from distlap import names
from distlap.bayes.layerwise import Scoring, run_layerwise, select_subsets, write_results
from distlap.config import load_config
from distlap.finetune.run import fine_tune
from distlap.trial import laplace_data

QUIET = dict(log=lambda m: None)
SUBSET_TEST, MAP_TEST = names.scores("subset", "test"), names.scores("map", "test")
DELTA = names.delta("subset", "test", "ece")


@pytest.fixture(scope="module")
def trial(fake_fmnist_dir, tiny_vit_dir, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lw")
    cfg = load_config(
        overrides=[
            f"data.path={fake_fmnist_dir}",
            f"backbone.name={tiny_vit_dir}",
            "data.classes=[5,6,7,8,9]",
            "train.epochs=2",
            "train.batch_size=32",
            "train.lr=5e-3",
            "train.num_threads=1",
            "train.prior_precision=50",
            "laplace.fit_examples=64",
            "laplace.n_samples=4",
            "laplace.n_bootstrap=200",
            "laplace.subsets={head_and_tail: [0, 3]}",
            f"output_dir={out}",
        ]
    )
    ft = fine_tune(cfg, **QUIET)
    assert ft.train.status == "ok"
    return ft


def run(ft, laplace=None, **kw):
    la = laplace or ft.cfg.laplace
    return run_layerwise(
        laplace_data(ft),
        la,
        prior_precision=ft.cfg.train.prior_precision,
        scoring=Scoring(ft.cfg.n_bins, la.n_bootstrap, ft.cfg.seed),
        **QUIET,
        **kw,
    )


def test_select_subsets_names_the_unknown_ones():
    assert list(select_subsets(4, {}, ["all", "late"])) == ["all", "late"]
    with pytest.raises(ValueError, match=r"no layer subsets named \['layer_9'\]"):
        select_subsets(4, {}, ["layer_9"])


def test_serial_run_writes_results_and_plots(trial, tmp_path):
    result = run(trial)
    write_results(result, tmp_path)
    on_disk = json.loads((tmp_path / names.LAYERWISE_FILE).read_text())
    assert on_disk["subsets"].keys() == result["subsets"].keys()
    assert set(result["subsets"]) == {
        "layer_0",
        "layer_1",
        "layer_2",
        "layer_3",
        "early",
        "mid",
        "late",
        "all",
        "head_and_tail",
    }
    assert result[names.N_BLOCKS] == 4 and result[names.PRIOR_METHOD] == "fixed"
    assert result[names.PRIOR_PRECISION] == 50
    map_ece = result["map"]["metrics"][MAP_TEST["ece"]]
    for name, row in result["subsets"].items():
        m = row["metrics"]
        assert m[DELTA] == pytest.approx(map_ece - m[SUBSET_TEST["ece"]], abs=1e-12)
        assert m[names.delta("subset", "test", "accuracy")] == pytest.approx(
            m[SUBSET_TEST["accuracy"]] - result["map"]["metrics"][MAP_TEST["accuracy"]], abs=1e-12
        )
        low, high = names.interval(DELTA)
        assert m[low] <= m[DELTA] <= m[high]
        assert m[names.SUBSET_TIME] > 0
        assert sum(row["reliability"]["count"]) == len(trial.splits.test)
        png = (tmp_path / "plots" / f"reliability_{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert set(m) <= set(names.scores("subset", "val").values()) | set(SUBSET_TEST.values()) | {
            names.delta("subset", "test", s) for s in names.SCORES
        } | {low, high, names.SUBSET_TIME}
    assert (result["subsets"]["layer_0"]["blocks"], result["subsets"]["late"]["blocks"]) == ([0], [3])


def test_only_evaluates_the_named_subsets(trial):
    result = run(trial, only=("all",))
    assert list(result["subsets"]) == ["all"]


@pytest.mark.parametrize("link", ["probit", "mc"])
def test_glm_predictive_rows(trial, link):
    la = trial.cfg.laplace.model_copy(update={"predictive": "glm", "link_approx": link})
    result = run(trial, laplace=la)
    assert result[names.PREDICTIVE] == "glm" and result[names.LINK] == link
    assert all(0 <= row["metrics"][SUBSET_TEST["ece"]] <= 1 for row in result["subsets"].values())
