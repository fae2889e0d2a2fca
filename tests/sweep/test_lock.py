"""One driver per sweep folder; only the owner's own, unshared folders are resumed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distlap.sweep.lock import LOCK_FILE, LockError, SweepLock, check_owned


def test_a_second_driver_is_refused_while_the_first_runs(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from distlap.sweep.lock import SweepLock\n"
            f"with SweepLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"in use by a running driver \(pid {holder.pid} on "):
            SweepLock(tmp_path).__enter__()
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    with SweepLock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / LOCK_FILE).read_text()


def _sweep_folder(tmp_path):
    out = tmp_path / "sweep"
    (out / "ray_results" / "x").mkdir(parents=True)
    (out / "config.yaml").write_text("name: x\n")
    (out / "ray_results" / "x" / "tuner.pkl").write_bytes(b"")
    return out


def test_resume_only_from_folders_the_user_owns(tmp_path):
    out = _sweep_folder(tmp_path)
    check_owned(out)
    pickle = out / "ray_results" / "x" / "tuner.pkl"
    pickle.chmod(0o666)
    with pytest.raises(LockError, match=r"tuner.pkl is writable by others.*chmod -R go-w"):
        check_owned(out)
    pickle.chmod(0o644)
    if os.getuid() == 0:  # only root can give a file away
        os.chown(pickle, 12345, -1)
        with pytest.raises(LockError, match=r"tuner.pkl belongs to user id 12345.*runs code"):
            check_owned(out)
        os.chown(pickle, 0, -1)
    tmp_path.chmod(0o777)  # anyone could swap the sweep folder for their own
    try:
        with pytest.raises(LockError, match=r"world-writable \(without the sticky bit\)"):
            check_owned(out)
        tmp_path.chmod(0o1777)  # like /tmp: others cannot rename what is ours
        check_owned(out)
    finally:
        tmp_path.chmod(0o755)
