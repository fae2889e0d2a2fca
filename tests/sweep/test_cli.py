"""The sweep scripts' command line: every bad input is refused with one line before Ray starts."""

import functools
from pathlib import Path

import pytest

from distlap.sweep import cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "sweeps" / "configs"


def _script_main():
    """``main(argv)`` as sweeps/layerwise.py calls it."""
    from analysis.report import build_report

    return functools.partial(
        cli.main, "layerwise", (CONFIGS / "default.yaml", CONFIGS / "smoke.yaml"), build_report
    )


def test_bad_input_fails_before_ray_starts(tmp_path, capsys):
    import ray

    main = _script_main()
    assert main(["search.metric=bayes/test/nll", f"--output={tmp_path / 'a'}"]) == 2
    assert "search.metric: 'bayes/test/nll' is not a validation-split objective" in capsys.readouterr().err
    assert main(["--resume", f"--output={tmp_path / 'empty'}"]) == 2
    assert "holds no sweep" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.yaml").write_text("name: x\n")
    assert main(["--smoke-test", f"--output={tmp_path / 'taken'}"]) == 2
    assert "already holds a sweep; continue it with --resume" in capsys.readouterr().err
    assert main(["--config", str(CONFIGS / "peft_methods.yaml"), f"--output={tmp_path / 'c'}"]) == 2
    assert "kind=peft_methods: this config is for sweeps/peft_methods.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--resume"])  # needs --output
    for address in ("ray://127.0.0.1:1", "127.0.0.1:1", "nonsense"):
        assert main(["--smoke-test", f"--output={tmp_path / 'b'}", f"--address={address}"]) == 2
        assert f"cannot reach the Ray cluster at --address {address!r}" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
