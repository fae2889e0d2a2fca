import json
from pathlib import Path

import pytest

from distlap import names
from distlap.bayes import glm_posterior
from distlap.config import load_config
from distlap.names import LAYERWISE_FILE, TRIAL_FILE
from distlap.trial import laplace_metrics, main, run_trial
from distlap.zoo import FASHION_MNIST_DIR
from helpers import tiny_trial

MAP_TEST = names.scores("map", "test")


def trial_cfg(fake_fmnist_dir, tiny_vit_dir, tmp_path, *extra):
    return load_config(
        overrides=[
            *tiny_trial(fake_fmnist_dir, tiny_vit_dir),
            "train.regime=posthoc",  # the epochs only; test_the_map_is_stationary converges
            f"output_dir={tmp_path / 'out'}",
            *extra,
        ]
    )


@pytest.mark.parametrize("method", ["lora", "norm", "hybrid"])
def test_trial_end_to_end(fake_fmnist_dir, tiny_vit_dir, tmp_path, method):
    cfg = trial_cfg(fake_fmnist_dir, tiny_vit_dir, tmp_path, f"peft.method={method}")
    result = run_trial(cfg, log=lambda m: None)
    assert result["status"] == "ok", result["message"]
    m = result["metrics"]
    for key in (
        *MAP_TEST.values(),
        "map/val/ece",
        names.TUNED_PARAMS,
        names.TUNED_PARAMS_PCT,
        names.TIME_PER_EPOCH,
        names.WALL_TIME,
    ):
        assert key in m, key
    assert 0 < m["tuned_params_pct"] < 100
    assert len(result["history"]) == 2
    assert result["provenance"]["packages"]["torch"] == "2.14.1"
    out = tmp_path / "out"
    assert json.loads((out / TRIAL_FILE).read_text())["metrics"] == pytest.approx(m)
    assert load_config(out / "config.yaml") == cfg
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_trial_learns_fake_task(fake_fmnist_dir, tiny_vit_dir, tmp_path):
    cfg = trial_cfg(fake_fmnist_dir, tiny_vit_dir, tmp_path, "peft.method=hybrid", "train.epochs=4")
    assert run_trial(cfg, log=lambda m: None)["metrics"][MAP_TEST["accuracy"]] > 0.6  # chance: 0.2


def test_same_seed_same_numbers(fake_fmnist_dir, tiny_vit_dir, tmp_path):
    cfg = trial_cfg(fake_fmnist_dir, tiny_vit_dir, tmp_path, "train.epochs=1")
    a, b = (run_trial(cfg, log=lambda m: None)["metrics"] for _ in range(2))
    assert a[MAP_TEST["nll"]] == b[MAP_TEST["nll"]] and a[MAP_TEST["ece"]] == b[MAP_TEST["ece"]]


def test_nan_loss_is_a_failed_status_not_a_crash(fake_fmnist_dir, tiny_vit_dir, tmp_path, capsys):
    argv = [
        f"data.path={fake_fmnist_dir}",
        f"backbone.name={tiny_vit_dir}",
        "data.classes=[5,6,7]",
        "train.epochs=1",
        "train.lr=1e12",
        "train.max_grad_norm=null",
        "train.warmup_fraction=0",
    ]
    assert main(argv) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "failed" and "non-finite training loss" in out["message"]


def test_layerwise_flag_adds_the_laplace_stage(fake_fmnist_dir, tiny_vit_dir, tmp_path, capsys):
    """``--layerwise``: the MAP, the posterior over every block (``bayes/...``) and every subset's file."""
    out = tmp_path / "lw"
    argv = [
        f"data.path={fake_fmnist_dir}",
        f"backbone.name={tiny_vit_dir}",
        "data.classes=[5,6,7,8,9]",
        "train.epochs=1",
        "laplace.fit_examples=50",
        "laplace.n_samples=3",
        "laplace.n_bootstrap=50",
        "shift.severities=[5]",
        "shift.max_examples=30",
        "ood.max_examples=30",
        "--layerwise",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((out / LAYERWISE_FILE).read_text())
    posterior = glm_posterior.load(out / names.POSTERIOR_FILE)  # what an export needs, at the study's λ
    assert (
        set(posterior.blocks) == {0, 1, 2, 3} and posterior.prior_precision == result[names.PRIOR_PRECISION]
    )
    every = result["subsets"]["all"]["metrics"]
    assert printed[names.score("bayes", "test", "ece")] == every[names.score("subset", "test", "ece")]
    assert printed[names.delta("bayes", "test")] == every[names.delta("subset", "test")]
    assert (
        printed[names.score("map", "test", "ece")]
        == result["map"]["metrics"][names.score("map", "test", "ece")]
    )
    assert set(result["subsets"]) == {
        "layer_0",
        "layer_1",
        "layer_2",
        "layer_3",
        "early",
        "mid",
        "late",
        "all",
    }
    assert printed[names.BEST_SUBSET] in result["subsets"]
    assert (out / "plots" / "reliability_all.png").is_file()
    assert set(result["baselines"]) == {"temp", "lla"} and len(result["shift"]["map"]) == 5  # 5 corruptions
    assert names.ood("temp", "far_ood", "auroc_entropy") in result["baselines"]["temp"]["metrics"]


def test_an_unknown_subset_fails_before_training(fake_fmnist_dir, tiny_vit_dir, tmp_path, capsys):
    argv = [f"data.path={fake_fmnist_dir}", f"backbone.name={tiny_vit_dir}", "data.classes=[5,6,7,8,9]"]
    assert main([*argv, "laplace.subsets={odd: [0, 7]}", "--layerwise"]) == 2
    err = capsys.readouterr()
    assert "laplace.subsets.odd=[0, 7]: need a new name and block indices in 0..3" in err.err
    assert "epoch " not in err.out + err.err and "regime" not in err.err  # refused before any training


def test_laplace_metrics_vocabulary():
    """A layer-wise result -> the trial's metrics: MAP, ``bayes/...`` = the subset ``all``, λ, timings."""

    def scores(predictive):
        return {key: 0.1 for split in ("val", "test") for key in names.scores(predictive, split).values()}

    delta = names.delta("subset", "test")
    result = {
        names.PRIOR_PRECISION: 3.0,
        names.FIT_TIME: 1.0,
        names.EVAL_TIME: 2.0,
        "map": {"metrics": scores("map")},
        "subsets": {
            "layer_0": {"metrics": {**scores("subset"), delta: 0.02, names.SUBSET_TIME: 4.0}},
            "all": {"metrics": {**scores("subset"), delta: 0.01, names.SUBSET_TIME: 5.0}},
        },
    }
    m = laplace_metrics(result)
    assert m[names.score("bayes", "val", "nll")] == 0.1 and m[names.score("map", "test", "ece")] == 0.1
    assert (m[names.delta("bayes", "test")], m[names.BEST_SUBSET], m[names.PRIOR_PRECISION]) == (
        0.01,
        "layer_0",
        3.0,
    )
    assert (m[names.FIT_TIME], m[names.EVAL_TIME]) == (1.0, 2.0)
    assert names.SUBSET_TIME not in m and not any(k.startswith("subset/") for k in m)
    for key in m:
        names.describe(key)  # every key is in the vocabulary


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["peft.rank=0"]) == 2
    assert "peft.rank" in capsys.readouterr().err
    assert main([f"data.path={tmp_path}"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_embedded_default_on_real_fashion_mnist():
    """The shipped tiny backbone, real Fashion-MNIST classes 5-9, LoRA: well above chance (0.2)."""
    cfg = load_config(
        overrides=["data.max_train=4000", "data.max_test=1000", "train.epochs=2", "train.regime=posthoc"]
    )
    result = run_trial(cfg, log=lambda m: None)
    assert result["status"] == "ok"
    assert result["metrics"][MAP_TEST["accuracy"]] > 0.75


@pytest.mark.slow
def test_the_map_is_stationary(fake_fmnist_dir, tiny_vit_dir, tmp_path):
    """With ``train.regime=mode`` the trial's θ* is a mode of the stated posterior: L-BFGS stops at the
    stationarity target, and the trial records how far it went."""
    cfg = trial_cfg(
        fake_fmnist_dir, tiny_vit_dir, tmp_path, "train.regime=mode", "train.prior_precision=1000"
    )
    m = run_trial(cfg, log=lambda m: None)["metrics"]
    assert m[names.STATIONARITY] <= cfg.train.stationarity_tol
    assert 0 < m[names.LBFGS_STEPS] <= cfg.train.max_lbfgs_steps
