"""Attribution at scale: every coalition of ViT-B/16's 12 blocks, scored and bootstrapped (issue 24).

A synthetic GLM pass of CIFAR-100 shapes stands in for ``glm_pass``'s output (float32, as it returns it):
MAP logits mu ~ 3 N(0, 1) (N, C), per-block logit variances v_b = s_b U(0, 1) >= 0 (N, L, C) with block
scales s_b from 0.05 to 2, uniform labels; a test split of 10,000 examples and a validation split of
1,000 (``benchmarks/vit_b16.py``'s). Timed: the call the trial makes, ``distlap.bayes.attribution
.attribution`` (all 2^12 = 4,096 coalitions on test with 200 paired bootstrap replicates of their Shapley
values, and on validation for the best sets), with torch's default number of threads. The JSON also
records the load average before and after: on a shared machine the seconds depend on it.

    python benchmarks/attribution.py           # 4,096 coalitions x 10,000 examples x 100 classes, R = 200
    python benchmarks/attribution.py --quick   # a tiny run (tests)

The last line: ``attribution: coalitions=<2^L> examples=<N> classes=<C> bootstrap=<R> seconds=<s>``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from distlap.bayes import attribution
from distlap.provenance import write_benchmark

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    blocks: int = 12  # L
    n_test: int = 10_000
    n_val: int = 1_000
    classes: int = 100
    bootstrap: int = 200  # R, laplace.shapley_bootstrap's default
    n_bins: int = 15
    seed: int = 0


QUICK = Settings(blocks=4, n_test=300, n_val=100, classes=10, bootstrap=20)


def glm_split(n: int, s: Settings, seed: int) -> attribution.Split:
    """A synthetic GLM pass (module docstring), float32."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, s.classes, generator=g)
    scale = torch.logspace(np.log10(0.05), np.log10(2.0), s.blocks)[None, :, None]  # (1, L, 1)
    variances = scale * torch.rand(n, s.blocks, s.classes, generator=g)
    return attribution.Split(logits, variances, torch.randint(0, s.classes, (n,), generator=g))


def summary(out: dict) -> dict:
    """Per score: the Shapley values, their interval and the efficiency gap sum_i phi_i - v(all)."""
    figures = {}
    for name, entry in out["values"].items():
        phi = np.array(entry["shapley"])
        figures[name] = {
            "shapley": entry["shapley"],
            "shapley_low": entry.get("shapley_low"),
            "shapley_high": entry.get("shapley_high"),
            "efficiency_gap": float(phi.sum() - entry["coalition_values"][-1]),
        }
    return figures


def final_line(s: Settings, seconds: float) -> str:
    return (
        f"attribution: coalitions={2**s.blocks} examples={s.n_test} classes={s.classes} "
        f"bootstrap={s.bootstrap} seconds={seconds:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run: 4 blocks, 300 examples")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else Settings()
    test, val = glm_split(s.n_test, s, s.seed), glm_split(s.n_val, s, s.seed + 1)
    load_before, start = os.getloadavg(), time.perf_counter()
    out = attribution.attribution(
        test, val, n_bins=s.n_bins, n_bootstrap=s.bootstrap, n_permutations=2, seed=s.seed
    )
    seconds = time.perf_counter() - start
    figures = {
        "seconds": seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # whole process, KiB
        "load_average": {"before": load_before, "after": os.getloadavg()},  # 1, 5, 15 min: a shared CPU
        "method": out["method"],
        "coalitions": len(out["coalitions"]),
        "values": summary(out),
    }
    path = write_benchmark("attribution", asdict(s), figures, args.out)
    args.results.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, args.results / path.name)
    for name, entry in figures["values"].items():
        print(f"{name}: shapley {np.round(entry['shapley'], 5).tolist()}")
    print(f"peak resident memory {figures['peak_rss_gib']:.2f} GiB; load average {load_before[0]:.1f} before")
    print(f"wrote {path} and {args.results / path.name}")
    print(final_line(s, seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
