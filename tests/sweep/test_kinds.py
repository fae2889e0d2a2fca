"""The sweep-kind registry: each kind's metric lists, exactly; its trainable; its commands."""

import shlex
import subprocess
import sys
import typing

import pytest

from distlap import names
from distlap.sweep import kinds
from distlap.sweep.settings import SweepConfig, resolve


def _cfg(tmp_path, kind="layerwise", **kw) -> SweepConfig:
    metric = {"search": {"metric": "map/val/nll"}} if kind == "peft_methods" and not kw.get("laplace") else {}
    return resolve(SweepConfig(kind=kind, output_dir=str(tmp_path / "k9 #1 it's"), **metric, **kw))


def test_layerwise_lists(tmp_path):
    cfg = _cfg(tmp_path)
    assert kinds.printed_metrics(cfg) == [
        "objective",
        "bayes/test/ece",
        "bayes/test/delta_ece",
        "best_subset",
    ]
    assert kinds.key_metrics(cfg) == [
        "bayes/val/nll",
        "map/test/accuracy",
        "map/test/ece",
        "bayes/test/delta_ece",
        "subset/test/accuracy",
        "subset/test/delta_ece",
        "subset/test/delta_ece_low",
        "subset/test/delta_ece_high",
    ]
    assert kinds.summary_metrics(cfg) == (
        "map/val/nll",
        "map/test/accuracy",
        "map/test/ece",
        "bayes/val/nll",
        "bayes/test/accuracy",
        "bayes/test/ece",
        "bayes/test/delta_ece",
        "best_subset",
        "laplace/prior_precision",
        "tuned_params_pct",
        "time_per_epoch_s",
        "wall_time_s",
    )


@pytest.mark.parametrize("laplace", [False, True])
def test_peft_methods_lists_have_bayes_keys_only_with_laplace(tmp_path, laplace):
    cfg = _cfg(tmp_path, "peft_methods", laplace=laplace)
    delta = ["bayes/test/delta_ece"] if laplace else []
    costs = ["tuned_params_pct", "time_per_epoch_s"]
    assert kinds.printed_metrics(cfg) == ["map/test/accuracy", "map/test/ece", *delta, *costs]
    assert kinds.key_metrics(cfg) == [cfg.search.metric, "map/test/accuracy", "map/test/ece", *delta, *costs]
    bayes = ("bayes/val/nll", "bayes/test/accuracy", "bayes/test/ece", "bayes/test/delta_ece")
    assert kinds.summary_metrics(cfg) == (
        "map/val/nll",
        "map/test/accuracy",
        "map/test/ece",
        "map/test/nll",
        "map/test/brier",
        *(bayes if laplace else ()),
        "tuned_params",
        "tuned_params_pct",
        "time_per_epoch_s",
        "wall_time_s",
    )


def test_every_listed_key_is_in_the_vocabulary():
    for kind in kinds.KINDS.values():
        for key in (*kind.printed, *kind.shown, *kind.summarised, *kind.laplace_keys):
            names.describe(key)


def test_the_registry_holds_exactly_the_kinds_a_config_may_name():
    assert set(kinds.KINDS) == set(typing.get_args(SweepConfig.model_fields["kind"].annotation))
    assert all(name == kind.name for name, kind in kinds.KINDS.items())


@pytest.mark.parametrize("kind", sorted(kinds.KINDS))
def test_each_kind_names_its_trainable(tmp_path, monkeypatch, kind):
    """The stand-in Tune runs has the trainable's name and calls it with what it was given."""
    from distlap.sweep import trainable

    cfg = _cfg(tmp_path, kind)
    fn = kinds.trainable(cfg)
    assert fn.__name__ == f"{kind}_trial" and callable(getattr(trainable, fn.__name__))
    calls = []
    monkeypatch.setattr(trainable, fn.__name__, lambda config, sweep: calls.append((config, sweep)))
    fn({"a": 1}, cfg)
    assert calls == [({"a": 1}, cfg)]


def test_the_driver_loads_no_trial_code():
    """laplace-torch (with torchmetrics, ~4 s of CPU) is imported in the workers only, not by every
    sweep command (a refusal, --help, the driver)."""
    code = (
        "import sys; import distlap.sweep.cli, analysis.report; from distlap.sweep import driver; "
        "print(sorted({'laplace', 'torchmetrics', 'distlap.sweep.trainable'} & set(sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_commands_are_quoted_for_a_shell(tmp_path):
    cfg = _cfg(tmp_path)
    resume = shlex.split(kinds.resume_command(cfg))
    assert resume == ["python", "sweeps/layerwise.py", "--resume", "--output", str(cfg.out)]
    assert shlex.split(kinds.report_command(cfg)) == ["python", "analysis/report.py", str(cfg.out)]
    peft = _cfg(tmp_path, "peft_methods")
    assert shlex.split(kinds.report_command(peft))[:2] == ["python", "analysis/peft_methods.py"]
    assert kinds.resume_command(peft).startswith("python sweeps/peft_methods.py --resume")
