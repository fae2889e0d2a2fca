import json
from pathlib import Path

import pytest

from distlap.config import load_config
from distlap.data import FASHION_MNIST_DIR
from distlap.trial import RESULT_FILE, main, run_trial


def trial_cfg(fake_fmnist_dir, tiny_vit_dir, tmp_path, *extra):
    return load_config(overrides=[
        f"data.path={fake_fmnist_dir}", f"backbone.name={tiny_vit_dir}", "data.classes=[5,6,7,8,9]",
        "train.epochs=2", "train.batch_size=32", "train.lr=5e-3", f"output_dir={tmp_path / 'out'}", *extra])


@pytest.mark.parametrize("method", ["lora", "norm", "hybrid"])
def test_trial_end_to_end(fake_fmnist_dir, tiny_vit_dir, tmp_path, method):
    cfg = trial_cfg(fake_fmnist_dir, tiny_vit_dir, tmp_path, f"peft.method={method}")
    result = run_trial(cfg, log=lambda m: None)
    assert result["status"] == "ok", result["message"]
    m = result["metrics"]
    for key in ("test/accuracy", "test/ece", "test/nll", "test/brier", "test/mce", "val/ece",
                "tuned_params", "tuned_params_pct", "time_per_epoch_s"):
        assert key in m, key
    assert 0 < m["tuned_params_pct"] < 100
    assert len(result["history"]) == 2
    assert result["provenance"]["packages"]["torch"] == "2.14.1"
    out = tmp_path / "out"
    assert json.loads((out / RESULT_FILE).read_text())["metrics"] == pytest.approx(m)
    assert load_config(out / "config.yaml") == cfg
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_trial_learns_fake_task(fake_fmnist_dir, tiny_vit_dir, tmp_path):
    cfg = trial_cfg(fake_fmnist_dir, tiny_vit_dir, tmp_path, "peft.method=hybrid", "train.epochs=4")
    assert run_trial(cfg, log=lambda m: None)["metrics"]["test/accuracy"] > 0.6  # chance: 0.2


def test_same_seed_same_numbers(fake_fmnist_dir, tiny_vit_dir, tmp_path):
    cfg = trial_cfg(fake_fmnist_dir, tiny_vit_dir, tmp_path, "train.epochs=1")
    a, b = (run_trial(cfg, log=lambda m: None)["metrics"] for _ in range(2))
    assert a["test/nll"] == b["test/nll"] and a["test/ece"] == b["test/ece"]


def test_nan_loss_is_a_failed_status_not_a_crash(fake_fmnist_dir, tiny_vit_dir, tmp_path, capsys):
    argv = [f"data.path={fake_fmnist_dir}", f"backbone.name={tiny_vit_dir}", "data.classes=[5,6,7]",
            "train.epochs=1", "train.lr=1e12", "train.max_grad_norm=null", "train.warmup_fraction=0"]
    assert main(argv) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "failed" and "non-finite training loss" in out["message"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["peft.rank=0"]) == 2
    assert "peft.rank" in capsys.readouterr().err
    assert main([f"data.path={tmp_path}"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_embedded_default_on_real_fashion_mnist():
    """The shipped tiny backbone, real Fashion-MNIST classes 5-9, LoRA: well above chance (0.2)."""
    cfg = load_config(overrides=["data.max_train=4000", "data.max_test=1000", "train.epochs=2"])
    result = run_trial(cfg, log=lambda m: None)
    assert result["status"] == "ok"
    assert result["metrics"]["test/accuracy"] > 0.75
