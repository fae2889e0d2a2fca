"""What is refused before a sweep writes anything or starts Ray: one message naming the problem and the
fix, exit code 2, no traceback, no folder left behind."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from faults.harness import ROOT, read_only

from distlap.sweep import cli

CONFIGS = ROOT / "sweeps" / "configs"


def _main(argv: list[str]) -> int:
    from analysis.report import build_report

    return functools.partial(
        cli.main, "layerwise", (CONFIGS / "default.yaml", CONFIGS / "smoke.yaml"), build_report
    )(argv)


def _refused(argv, capsys, message: str, seconds: float = 30) -> str:
    """``argv`` exits with 2 within ``seconds``, printing one error naming ``message``, and no Ray."""
    import ray

    capsys.readouterr()  # only what the command prints
    start = time.monotonic()
    assert _main(argv) == 2
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and err.startswith("error: ")
    assert took < seconds, f"{took:.0f} s"
    assert not ray.is_initialized()
    return err


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_mlflow_server_or_database_is_named_in_seconds(tmp_path, capsys):
    out = tmp_path / "s"
    _refused(
        ["--smoke-test", f"--output={out}", f"tracking.uri=http://127.0.0.1:{_port()}"],
        capsys,
        "the MLflow store (http://127.0.0.1:",
        seconds=15,
    )
    _refused(
        [
            "--smoke-test",
            f"--output={out}",
            f"search.storage=postgresql+psycopg://distlap@127.0.0.1:{_port()}/o",
        ],
        capsys,
        "the Optuna store (postgresql+psycopg://distlap@127.0.0.1:",
        seconds=15,
    )
    assert not out.exists()


def test_a_read_only_mlflow_store_is_named(tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{store / 'mlflow.db'}").search_experiments()  # an existing store
    with read_only(store):
        _refused(
            ["--smoke-test", f"--output={tmp_path / 's'}", f"tracking.uri=sqlite:///{store / 'mlflow.db'}"],
            capsys,
            "attempt to write a readonly database",
        )


def test_a_full_or_read_only_output_disk_is_named(tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", disk]).returncode
    ):
        pytest.skip("needs root and mount (a small tmpfs)")
    try:
        _refused(["--smoke-test", f"--output={disk / 's'}"], capsys, "MiB free, the sweep needs about")
    finally:
        subprocess.run(["umount", disk])
    with read_only(disk):
        _refused(
            ["--smoke-test", f"--output={disk / 's'}"], capsys, "is not writable (Read-only file system)"
        )


def test_an_address_that_is_not_ray_fails_within_30_s(tmp_path, capsys):
    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        err = _refused(
            ["--smoke-test", f"--output={tmp_path / 's'}", f"--address=127.0.0.1:{server.server_port}"],
            capsys,
            "something answers there, but not Ray",
            seconds=30,
        )
    finally:
        server.shutdown()
    assert "run the driver on the head" in err


@pytest.mark.slow
def test_missing_data_corrupt_backbone_and_absurd_settings(tmp_path, capsys, tiny_vit_dir):
    out = tmp_path / "s"
    _refused(
        ["--smoke-test", f"--output={out}", f"trial.data.path={tmp_path / 'nowhere'}"],
        capsys,
        "Fashion-MNIST directory",
    )
    broken = tmp_path / "vit"
    shutil.copytree(tiny_vit_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    _refused(
        ["--smoke-test", f"--output={out}", f"trial.backbone.name={broken}", "trial.data.classes=[0,1,2]"],
        capsys,
        f"{broken / 'model.safetensors'} is corrupt or truncated",
    )
    _refused(
        ["--smoke-test", f"--output={out}", "trial.train.epochs=1000000000"],
        capsys,
        "training steps per trial",
    )
    _refused(
        ["--smoke-test", f"--output={out}", "trial.laplace.n_samples=1000000000000"],
        capsys,
        "the posterior samples",
    )
    assert not out.exists()


def test_paths_that_cannot_be_urls_are_refused_by_name(tmp_path, capsys):
    for name, char in (("what?", "'?'"), ("a%41b", "'%41'")):
        _refused(["--smoke-test", f"--output={tmp_path / name}"], capsys, f"the path holds {char}")
    both = tmp_path / 'it\'s "x"'
    _refused(["--smoke-test", f"--output={both}"], capsys, "holds both ' and \"")
    assert sorted(Path(tmp_path).iterdir()) == []


def _saved_sweep(tmp_path) -> Path:
    """A sweep folder as a fresh sweep leaves it before its first trial."""
    from distlap.config import to_yaml
    from distlap.sweep.settings import load_sweep_config, resolve

    out = tmp_path / "saved"
    out.mkdir()
    cfg = resolve(load_sweep_config(CONFIGS / "smoke.yaml", [], {"output_dir": str(out)}))
    (out / "config.yaml").write_text(to_yaml(cfg))
    return out


def test_resume_takes_only_overrides_that_cannot_change_results(tmp_path, capsys):
    from distlap.sweep.driver import load_saved

    out = _saved_sweep(tmp_path)
    cfg = load_saved(out, ["resources.cpus_per_trial=2", "max_failures=3"], {"address": "auto"})
    assert (cfg.resources.cpus_per_trial, cfg.max_failures, cfg.address) == (2, 3, "auto")
    for override, field in (
        ("trial.train.epochs=5", "trial.train.epochs (the sweep ran with 1)"),
        ("search.num_samples=9", "search.num_samples (the sweep ran with 2)"),
        ("resources.max_concurrent=1", "resources.max_concurrent (the sweep ran with None)"),
        ("tracking.uri=sqlite:////elsewhere.db", "tracking.uri"),
    ):
        _refused(["--resume", f"--output={out}", override], capsys, f"--resume cannot change {field}")


def test_resume_refuses_a_folder_others_could_have_changed(tmp_path, capsys):
    out = _saved_sweep(tmp_path)
    (out / "config.yaml").chmod(0o666)
    _refused(["--resume", f"--output={out}"], capsys, "config.yaml is writable by others")


@pytest.mark.slow
def test_ctrl_c_is_honoured_while_a_store_does_not_answer(tmp_path):
    """An MLflow server that accepts connections and never answers: Ctrl-C ends the wait at once
    (exit 130, no traceback), and nothing has been written."""
    from faults.harness import start, wait_for

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    out, log = tmp_path / "s", tmp_path / "log"
    try:
        uri = f"tracking.uri=http://127.0.0.1:{silent.getsockname()[1]}"
        proc = start(log, "--smoke-test", "--output", str(out), uri)
        wait_for(proc, log, lambda text: "[sweep] inputs checked" in text, timeout=120)
        proc.send_signal(2)  # SIGINT, as Ctrl-C sends it
        sent = time.monotonic()
        assert proc.wait(timeout=30) == 130
        assert time.monotonic() - sent < 10
    finally:
        silent.close()
    text = log.read_text()
    assert "Traceback" not in text and "interrupted" in text, text[-2000:]
    assert not out.exists()
