"""The whole layer-wise stage on a tiny fine-tuned trial: files, schema, serial == Ray."""

import json

import pytest
import torch

from distlap.config import load_config
from distlap.layerwise import RESULTS_FILE, layer_subsets, run_layerwise
from distlap.trial import fine_tune

QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def trial(fake_fmnist_dir, tiny_vit_dir, tmp_path_factory):
    torch.set_num_threads(1)  # Ray tasks run on one thread too: bit-identical comparisons
    out = tmp_path_factory.mktemp("lw")
    cfg = load_config(overrides=[
        f"data.path={fake_fmnist_dir}", f"backbone.name={tiny_vit_dir}", "data.classes=[5,6,7,8,9]",
        "train.epochs=2", "train.batch_size=32", "train.lr=5e-3", "train.num_threads=1",
        "train.prior_precision=50", "laplace.fit_examples=64", "laplace.n_samples=4",
        "laplace.n_bootstrap=200", "laplace.subsets={head_and_tail: [0, 3]}", f"output_dir={out}"])
    ft = fine_tune(cfg, **QUIET)
    assert ft.train.status == "ok"
    return ft


def test_layer_subsets():
    s = layer_subsets(4, {"ends": [0, 3]})
    assert list(s) == ["layer_0", "layer_1", "layer_2", "layer_3", "early", "mid", "late", "all", "ends"]
    for bad in ({"x": [4]}, {"x": []}, {"all": [0]}):
        with pytest.raises(ValueError, match=r"laplace\.subsets\..*0\.\.3"):
            layer_subsets(4, bad)


def test_serial_run_writes_results_and_plots(trial):
    result = run_layerwise(trial, parallel=False, **QUIET)
    out = trial.cfg.output_dir
    on_disk = json.loads(open(f"{out}/{RESULTS_FILE}").read())
    assert on_disk["subsets"].keys() == result["subsets"].keys()
    assert set(result["subsets"]) == {"layer_0", "layer_1", "layer_2", "layer_3", "early", "mid", "late",
                                      "all", "head_and_tail"}
    assert result["n_blocks"] == 4 and result["prior_method"] == "fixed" and result["prior_precision"] == 50
    for name, row in result["subsets"].items():
        d = row["delta_ece"]
        assert d["estimate"] == pytest.approx(result["map"]["test"]["ece"] - row["test"]["ece"])
        assert d["low"] <= d["estimate"] <= d["high"]
        assert sum(row["reliability"]["count"]) == len(trial.splits.test)
        png = open(f"{out}/plots/reliability_{name}.png", "rb").read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (result["subsets"]["layer_0"]["blocks"], result["subsets"]["late"]["blocks"]) == ([0], [3])


def test_serial_and_ray_give_identical_numbers(trial):
    ray = pytest.importorskip("ray")
    serial = run_layerwise(trial, parallel=False, **QUIET)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        parallel = run_layerwise(trial, parallel=True, task_resources={"num_cpus": 1}, **QUIET)
    finally:
        ray.shutdown()
    for name in serial["subsets"]:
        a, b = serial["subsets"][name], parallel["subsets"][name]
        assert a["test"] == b["test"] and a["val"] == b["val"] and a["delta_ece"] == b["delta_ece"], name


@pytest.mark.parametrize("link", ["probit", "mc"])
def test_glm_predictive_rows(trial, link):
    cfg = trial.cfg.model_copy(update={"laplace": trial.cfg.laplace.model_copy(
        update={"predictive": "glm", "link_approx": link}), "output_dir": None})
    trial_glm = type(trial)(**{**trial.__dict__, "cfg": cfg})
    result = run_layerwise(trial_glm, **QUIET)
    assert result["predictive"] == "glm" and result["link_approx"] == link
    assert all(0 <= row["test"]["ece"] <= 1 for row in result["subsets"].values())
