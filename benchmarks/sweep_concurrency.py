"""Wall time of the same trials run as concurrent Ray trials vs one after another, in one process run.

python benchmarks/sweep_concurrency.py [--config sweeps/configs/default.yaml] [--trials 4] [--threaded]
                                       [--output DIR] [key=value ...]

Every variant runs the default sweep's trials (same config, same fixed points of the search space, so
the same work) on one local Ray instance started once; only scheduling differs:
  concurrent   as many trials at once as the cluster's CPUs hold (cpus_per_trial each)
  sequential   one trial at a time, same resources per trial (the idle cores stay idle)
  threaded     (--threaded) one trial at a time with every CPU as torch threads: the honest rival
The ratio is sequential wall / concurrent wall (target >= 1.6 on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import ray

from distlap.provenance import write_benchmark
from distlap.sweep.driver import run_sweep
from distlap.sweep.settings import SweepConfig, load_sweep_config, resolve

ROOT = Path(__file__).resolve().parents[1]


def fixed_points(cfg: SweepConfig, n: int) -> list[dict]:
    """n points spread over the space (geometric / linear ranges, categories in turn): identical work."""
    points = [{} for _ in range(n)]
    for name, p in cfg.search.space.items():
        if p.kind == "choice":
            values = [p.values[i % len(p.values)] for i in range(n)]
        else:
            spread = np.geomspace if p.kind == "loguniform" else np.linspace
            values = [float(v) for v in spread(p.low, p.high, n + 2)[1:-1]]
        for point, value in zip(points, values):
            point[name] = value
    return points


def variants(cpus: int, threaded: bool) -> dict[str, list[str]]:
    out = {"concurrent": [], "sequential": ["resources.max_concurrent=1"]}
    if threaded:
        out["threaded"] = ["resources.max_concurrent=1", f"resources.cpus_per_trial={cpus}"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "sweeps" / "configs" / "default.yaml")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--threaded", action="store_true", help="add the one-trial-many-threads baseline")
    parser.add_argument("--output", type=Path, help="where the sweeps write (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    base = load_sweep_config(args.config, args.overrides)
    points = fixed_points(base, args.trials)
    point_override = (
        "search.points_to_evaluate=["
        + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in p.items()) + "}" for p in points)
        + "]"
    )
    ray.init(include_dashboard=False, log_to_driver=True)
    cpus = int(ray.cluster_resources()["CPU"])
    root = args.output or Path(tempfile.mkdtemp(prefix="sweep_concurrency-"))
    walls: dict[str, tuple[float, int, int, float]] = {}
    try:
        for name, extra in variants(cpus, args.threaded).items():
            cfg = resolve(
                load_sweep_config(
                    args.config,
                    [
                        *args.overrides,
                        point_override,
                        f"search.num_samples={args.trials}",
                        *extra,
                        f"output_dir={root / name}",
                    ],
                )
            )
            monitor = CpuMonitor()
            monitor.start()
            start = time.perf_counter()
            summary = run_sweep(cfg)
            wall = time.perf_counter() - start
            walls[name] = (
                wall,
                int((summary.status == "ok").sum()),
                int(cfg.resources.cpus_per_trial),
                monitor.stop() / wall,
            )
    finally:
        ray.shutdown()

    t = base.trial
    print(
        f"\nsweep_concurrency: {args.trials} trials of {args.config.name} ({t.backbone.name}, "
        f"max_train={t.data.max_train}, epochs={t.train.epochs}, fit_examples={t.laplace.fit_examples}, "
        f"n_samples={t.laplace.n_samples}, val/test={t.data.max_val}/{t.data.max_test}) on {cpus} CPUs"
    )
    print(f"points: {points}")
    print(
        f"{'variant':<12} {'threads/trial':>13} {'trials ok':>9} {'wall s':>8} {'s/trial':>8} "
        f"{'speed-up':>9} {'others CPUs':>11}"
    )
    sequential = walls["sequential"][0]
    for name, (wall, ok, threads, busy) in walls.items():
        print(
            f"{name:<12} {threads:>13} {ok:>9} {wall:>8.1f} {wall / args.trials:>8.1f} "
            f"{sequential / wall:>8.2f}x {busy:>11.2f}"
        )
    print(
        "others CPUs: mean cores kept busy by processes outside this benchmark during the variant; "
        "anything above ~0.1 means the timings shared the machine."
    )
    print(f"ratio sequential / concurrent = {sequential / walls['concurrent'][0]:.2f} (target >= 1.6)")
    figures = {
        name: {"wall_s": wall, "trials_ok": ok, "threads_per_trial": threads, "other_cpus_busy": busy}
        for name, (wall, ok, threads, busy) in walls.items()
    }
    figures["ratio_sequential_over_concurrent"] = sequential / walls["concurrent"][0]
    settings = {**{k: str(v) for k, v in vars(args).items()}, "points": points, "cpus": cpus}
    print(f"written: {write_benchmark('sweep_concurrency', settings, figures)}")


class CpuMonitor(threading.Thread):
    """Samples, once a second, the CPU-seconds spent by this benchmark (this process and everything it
    started: Ray's daemons and workers) and by the whole machine, so that other users' load during a
    variant can be reported beside its wall time (on a shared machine it skews the ratio)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.ours = self.machine = 0.0
        self._last: dict[int, float] = {}
        self._done = threading.Event()

    def run(self) -> None:
        machine0 = _machine_busy_s()
        self._sample()  # baseline: count only what is spent from now on
        self.ours = 0.0
        while not self._done.wait(1.0):
            self._sample()
            self.machine = _machine_busy_s() - machine0

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total = t.user + t.system
            self.ours += total - self._last.get(proc.pid, 0.0)
            self._last[proc.pid] = total

    def stop(self) -> float:
        """Mean CPUs other processes kept busy while this monitor ran."""
        self._done.set()
        self.join()
        return max(0.0, self.machine - self.ours)


def _machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (/proc/stat; every process counts)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
