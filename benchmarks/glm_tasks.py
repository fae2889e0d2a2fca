"""One default trial's GLM evaluation as 1 vs 2 Ray tasks (``resources.eval_tasks``), side by side.

What a trial of the default sweep (``sweeps/configs/default.yaml``) evaluates with the glm predictive: the
Jacobian pass over validation and the one over test (:func:`distlap.bayes.glm.glm_pass`, over the
λ candidates a validation grid search chooses from, :func:`distlap.bayes.glm_study.candidates`, the
most a trial's test pass can ask for), each cut into k contiguous shards run as k Ray tasks of one CPU
and one torch thread (:func:`distlap.sweep.glm_tasks.ray_glm_runner`, what the sweep's trainable hands to
the study). The model is the default trial's before fine-tuning (:func:`distlap.finetune.run.prepare`:
the default backbone with its LoRA adapter, the default splits, the diag Laplace fit of the default
settings): a pass's cost depends on the shapes, not on θ̂, so fine-tuning is skipped. k = 1 and k = 2
alternate on one local Ray of 2 CPUs, after one warm-up each (workers started); the median of the
repeats is reported, with the largest difference of the two tables' probit probabilities. Beside each
repeat the same Ray runs a pure-compute reference (a fixed matrix-product loop as 1 task, then as 2 at
once): 2 t_1 / t_2 is the speedup the machine's CPUs gave two tasks at that moment, the ceiling of
the ratio on a shared machine.

The last line: ``glm tasks: 1 -> <s> s, 2 -> <s> s, ratio <r>x`` (median seconds of the two passes).

    python benchmarks/glm_tasks.py            # the default trial's splits (200 validation, 1000 test)
    python benchmarks/glm_tasks.py --quick    # a tiny run (tests)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import torch

from distlap.bayes.glm import glm_pass, param_blocks, probit_probs
from distlap.bayes.glm_study import candidates
from distlap.bayes.layerwise import fit_once
from distlap.finetune.run import prepare
from distlap.provenance import write_benchmark
from distlap.sweep.glm_tasks import ray_glm_runner
from distlap.sweep.settings import load_sweep_config
from distlap.trial import laplace_data

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "sweeps" / "configs" / "default.yaml"
QUIET = lambda m: None


@dataclass(frozen=True)
class Settings:
    repeats: int = 5
    tasks: tuple[int, ...] = (1, 2)
    max_val: int | None = None  # None: the default config's caps
    max_test: int | None = None


@dataclass(frozen=True)
class Trial:
    """What the timed passes share: the default trial's model and loaders, its fit and λ candidates."""

    data: object  # distlap.bayes.layerwise.LaplaceData
    la: object
    blocks: list[int]
    grid: torch.Tensor


def setup(settings: Settings) -> Trial:
    sweep = load_sweep_config(DEFAULT)
    caps = {k: v for k, v in (("max_val", settings.max_val), ("max_test", settings.max_test)) if v}
    cfg = sweep.trial.model_copy(update={"data": sweep.trial.data.model_copy(update=caps)})
    ft = prepare(cfg, log=QUIET)
    data = laplace_data(ft)
    la, _ = fit_once(data, cfg.laplace, cfg.train.prior_precision, QUIET)
    return Trial(data, la, param_blocks(data.model, la), candidates(cfg.train.prior_precision))


def evaluation(trial: Trial, run) -> tuple[float, list]:
    """Seconds of the validation and test passes through ``run``, and the two tables."""
    start = time.perf_counter()
    d = trial.data
    tables = [
        glm_pass(d.model, trial.la, trial.blocks, x, d.device, trial.grid, run) for x in (d.val, d.test)
    ]
    return time.perf_counter() - start, tables


def largest_difference(a: list, b: list) -> float:
    """Largest |p_a - p_b| of the probit probabilities of the 'all' subset at every λ, both splits."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        every = range(x.variances.shape[2])
        for g in range(len(x.prior_precisions)):
            diff = probit_probs(x.logits, x.at(g), every) - probit_probs(y.logits, y.at(g), every)
            worst = max(worst, float(diff.abs().max()))
    return worst


def _spin(products: int) -> None:
    """The reference's work: a fixed number of 256 x 256 matrix products on one thread."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    for _ in range(products):
        a @ a


def machine_speedup(products: int = 1000) -> float:
    """2 t_1 / t_2 of the reference: 2 on two free cores, 1 where the two tasks get one core between them."""
    spin = ray.remote(num_cpus=1)(_spin)
    times = []
    for k in (1, 2):
        start = time.perf_counter()
        ray.get([spin.remote(products) for _ in range(k)])
        times.append(time.perf_counter() - start)
    return 2 * times[0] / times[1]


def measure(trial: Trial, settings: Settings) -> dict:
    runners = {k: ray_glm_runner(k, {"num_cpus": 1}, QUIET) for k in settings.tasks}
    tables = {k: evaluation(trial, run)[1] for k, run in runners.items()}  # warm-up: workers, imports
    machine_speedup(10)  # warm-up
    seconds: dict[int, list[float]] = {k: [] for k in settings.tasks}
    reference = []
    for _ in range(settings.repeats):
        for k, run in runners.items():
            seconds[k].append(evaluation(trial, run)[0])
        reference.append(machine_speedup())
    first, *rest = settings.tasks
    return {
        "seconds": {str(k): s for k, s in seconds.items()},
        "median_s": {str(k): statistics.median(s) for k, s in seconds.items()},
        "max_abs_prob_difference": {str(k): largest_difference(tables[first], tables[k]) for k in rest},
        "machine_speedup": reference,
        "machine_speedup_median": statistics.median(reference),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run: 40 / 80 examples, one repeat")
    parser.add_argument("--repeats", type=int, help="timed repeats of each k (default 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = Settings(repeats=1, max_val=40, max_test=80) if args.quick else Settings()
    if args.repeats:
        settings = Settings(**{**asdict(settings), "repeats": args.repeats})
    trial = setup(settings)
    d = trial.data
    print(
        f"default trial: {len(d.val.dataset)} validation / {len(d.test.dataset)} test examples, "
        f"{trial.la.n_params:,} posterior parameters, {len(trial.grid)} λ; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    load = [os.getloadavg()[0]]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        figures = measure(trial, settings)
    finally:
        ray.shutdown()
    figures["load_average_1min"] = load + [os.getloadavg()[0]]  # before, after: the CPUs are shared
    med = figures["median_s"]
    one, two = med["1"], med["2"]
    figures["ratio"] = one / two
    for k, s in figures["seconds"].items():
        print(
            f"  k={k}: " + ", ".join(f"{x:.2f}" for x in s) + f" s; probabilities vs k=1 within "
            f"{figures['max_abs_prob_difference'].get(k, 0.0):.1e}"
        )
    path = write_benchmark("glm_tasks", asdict(settings), figures, args.out)
    args.results.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, args.results / path.name)
    print(f"wrote {path} and {args.results / path.name}")
    print(f"pure-compute reference on this machine now: 2 tasks {figures['machine_speedup_median']:.2f}x one")
    print(f"glm tasks: 1 -> {one:.2f} s, 2 -> {two:.2f} s, ratio {one / two:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
