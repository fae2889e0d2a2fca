"""One driver per sweep folder, and only a folder its user owns is resumed.

:class:`SweepLock` holds an exclusive ``flock`` on ``<output>/.driver.lock`` for as long as the driver
runs (the kernel, or the NFS server's lock manager on EFS, drops it when the process dies, however it
dies), so a second ``--resume`` of a running sweep is refused instead of running beside it.

:func:`check_owned` guards ``--resume``: Ray Tune's saved state (``tuner.pkl``, the searcher's pickle,
the trials' pickled errors) is unpickled, and unpickling runs code, so a sweep folder is code. Every
file and folder of the sweep must belong to the user who resumes it and be writable by nobody else,
and the folder above it must not let others swap the folder (world-writable without the sticky bit).
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import time
from pathlib import Path

from distlap.names import CONFIG_FILE, RAY_DIR

LOCK_FILE = ".driver.lock"


class LockError(RuntimeError):
    """The folder is in use by another driver, or is not safe to resume; the message says which."""


class SweepLock:
    """``with SweepLock(out): ...`` -- the one driver of the sweep in ``out`` (which must exist)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> SweepLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockError(
                f"{self.path.parent} is in use by a running driver ({holder}); wait for it to end, "
                "or stop it (Ctrl-C), then --resume"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_owned(out: Path) -> None:
    """Refuse to resume ``out`` unless this user owns it and all it holds, and no one else can write it."""
    out = Path(out)
    parent = out.resolve().parent.stat()
    if parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
        raise LockError(
            f"{out.resolve().parent} is world-writable (without the sticky bit): anyone could replace "
            f"the sweep folder. Fix: chmod o-w {out.resolve().parent}"
        )
    for path in _sweep_files(out):
        info = path.lstat()
        if info.st_uid != os.getuid():
            raise LockError(
                f"--resume: {path} belongs to user id {info.st_uid}, not to you ({os.getuid()}); resuming "
                "unpickles the sweep's saved state, which runs code. Resume only your own sweeps "
                f"(or, if you trust it, copy the folder and its owner becomes you: cp -r {out} NEW)"
            )
        if not stat.S_ISLNK(info.st_mode) and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise LockError(
                f"--resume: {path} is writable by {'others' if info.st_mode & stat.S_IWOTH else 'its group'};"
                " someone else could have changed the saved state that resuming unpickles. Fix: chmod -R "
                f"go-w {out} (after checking that its contents are yours)"
            )


def _sweep_files(out: Path):
    """The folder, its config and everything Ray Tune restores from (what --resume reads or unpickles)."""
    yield out
    if (out / CONFIG_FILE).exists():
        yield out / CONFIG_FILE
    ray_dir = out / RAY_DIR
    if ray_dir.exists():
        yield ray_dir
        for root, dirs, files in os.walk(ray_dir):
            for name in dirs + files:
                yield Path(root) / name
