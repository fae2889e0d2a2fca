"""Where a result came from: git commit and dirty flag, package versions, device, host."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = (
    "distlap",
    "torch",
    "torchvision",
    "transformers",
    "peft",
    "laplace-torch",
    "datasets",
    "ray",
    "optuna",
    "mlflow",
)


def git_state(repo: Path | None = None) -> dict[str, str | bool | None]:
    repo = repo or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(dirty) if dirty is not None else None}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def provenance() -> dict:
    return {
        **git_state(),
        "packages": package_versions(),
        "device": device_name(),
        "python": platform.python_version(),
        "host": platform.node(),
    }


def machine() -> dict:
    """What a timing depends on: CPUs this process may use, memory, the device."""
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        mem_gib = None
    return {
        "cpus": cpus,
        "memory_gib": mem_gib,
        "processor": platform.processor() or platform.machine(),
        "device": device_name(),
        "torch_threads": torch.get_num_threads(),
    }


def write_benchmark(
    name: str, settings: dict, figures: dict, out_dir: str | Path = "runs/benchmarks"
) -> Path:
    """``<out_dir>/<name>-<timestamp>.json``: a benchmark's figures with its settings, the git commit,
    package versions and the machine, so that every number knows where it came from."""
    import json
    import time

    path = Path(out_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "settings": settings,
        "figures": figures,
        "machine": machine(),
        "provenance": provenance(),
    }
    path.write_text(json.dumps(record, indent=2, default=str))
    return path
