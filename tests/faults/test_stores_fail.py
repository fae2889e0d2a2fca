"""A store that fails while the sweep runs ends it within seconds: exit code 3, one message naming the
store and the --resume command, no traceback, finished trials kept. Once the store is back, --resume
ends with exactly ``search.num_samples`` trials."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from faults.harness import check_exact, ids, read_only, start, sweep, wait_for

from helpers import MLFLOW_SERVER_ENV

N = 2
ONE_AT_A_TIME = [f"search.num_samples={N}", "resources.max_concurrent=1"]


def _stopped(proc, log: Path, since: float, store: str, out: Path, seconds: float) -> float:
    """The sweep ended with code 3 and the one message; returns how long it took after ``since``."""
    code = proc.wait(timeout=240)
    took = time.monotonic() - since
    text = log.read_text()
    assert code == 3, text[-3000:]
    tail = text[text.rindex("error: ") :]
    assert tail.startswith(f"error: the {store}") and " store (" in tail and "Traceback" not in tail, tail
    assert "finished trials are kept" in tail and f"--resume --output {out}" in tail, tail
    assert took < seconds, f"{took:.0f} s"
    assert "Traceback" not in text  # not even Ray Tune's own log of the failed trial
    return took


def _mlflow_server(db: Path, port: int) -> subprocess.Popen:
    """A tracking server over ``db``, its artifacts beside it (never in the working directory)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}"]
        + ["--artifacts-destination", str(db.parent / "mlartifacts")]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=db.parent,
        env={**os.environ, **MLFLOW_SERVER_ENV},
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    pytest.fail("the MLflow server did not start")


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_server_dies_mid_sweep(tmp_path):
    """The tracking server goes away while the second trial runs: the sweep ends (measured: seconds,
    not the ~4 minutes of MLflow's default retries), then continues once the server is back."""
    out, log, port = tmp_path / "sweep", tmp_path / "first.log", _port()
    server = _mlflow_server(tmp_path / "mlflow.db", port)
    uri = [f"tracking.uri=http://127.0.0.1:{port}"]
    try:
        proc = start(log, "--smoke-test", "--output", str(out), *ONE_AT_A_TIME, *uri)
        wait_for(proc, log, lambda text: len(set(ids(text, "stage: fine-tuning"))) == 2)
        os.killpg(server.pid, 9)
        server.wait()
        took = _stopped(proc, log, time.monotonic(), "MLflow", out, seconds=60)
        print(f"stopped {took:.0f} s after the MLflow server died")
        server = _mlflow_server(tmp_path / "mlflow.db", port)
        second = sweep("--resume", "--output", str(out))
        assert second.returncode == 0, second.stderr[-3000:]
        check_exact(out, N)
    finally:
        os.killpg(server.pid, 9)


@pytest.mark.slow
def test_the_mlflow_store_turns_read_only_then_the_disk_fills(tmp_path):
    """Two faults of one sweep's disk, each while a trial runs: the MLflow store's folder turns read-only
    (a read-only mount); then, in the resumed sweep, the disk that holds the output folder and both
    SQLite stores fills up. Each ends the sweep; once the disk is back, --resume ends the sweep."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", disk]
    if os.geteuid() != 0 or subprocess.run(mount).returncode:
        pytest.skip("needs root and mount (a tmpfs to fill)")
    store, out, filler = disk / "store", disk / "sweep", disk / "filler"
    store.mkdir()
    try:
        log = tmp_path / "first.log"
        uri = f"tracking.uri=sqlite:///{store / 'mlflow.db'}"
        proc = start(log, "--smoke-test", "--output", str(out), *ONE_AT_A_TIME, uri)
        wait_for(proc, log, lambda text: len(set(ids(text, "stage: fine-tuning"))) == 2)
        with read_only(store):
            took = _stopped(proc, log, time.monotonic(), "MLflow", out, seconds=60)
        print(f"stopped {took:.0f} s after the MLflow store turned read-only")

        log = tmp_path / "second.log"
        proc = start(log, "--resume", "--output", str(out))  # the second trial again, or from its checkpoint
        wait_for(proc, log, lambda text: ids(text, "stage: fine-tuning") or ids(text, "stage: restored"))
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
        took = _stopped(proc, log, time.monotonic(), "", out, seconds=120)  # MLflow's, or the folder
        print(f"stopped {took:.0f} s after the disk filled")
        filler.unlink()

        last = sweep("--resume", "--output", str(out))
        assert last.returncode == 0, last.stderr[-3000:]
        check_exact(out, N)
    finally:
        subprocess.run(["umount", "-l", disk])
