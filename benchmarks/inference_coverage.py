"""Coverage, family-wise error and power of distlap's inference, on synthetic predictives with known truth.

The data (5 classes, N = 1000 test examples, like the default sweep): latent logits z(x) = a g(x),
g ~ N(0, I); true class probabilities q = softmax(z); label y ~ Cat(q). A predictive of seed i is
softmax(T (z + σ u(x))) with its own per-example noise u ~ N(0, I): the MAP at T = T_map,i is
overconfident (test ECE ≈ 0.2 at accuracy ≈ 0.65); 18 *null* predictives share the MAP's parameters, so
their population ECE and NLL equal the MAP's EXACTLY (a global null, also for every pair of them); one
*planted* predictive has the temperature T_p,i that makes the population Δ_ECE ≈ 0.03. Seeds are random
effects: log T_map,i = log T_map + τ ε_i and log T_p,i = log T_p + τ ε_i + τ_p η_i, ε, η ~ N(0, 1).

Truth: the population ECE (15 equal-width bins, from q: no labels sampled) and NLL (−Σ_c q_c log p_c) of
softmax(T (z + σ u)) as functions of log T, from M common-random-number examples on a grid and
interpolated; one seed's estimand is its own population Δ, several seeds' the mean over the seed
population (Gauss–Hermite over ε, η).

Designs: ``single`` (one seed); ``crossed`` (3 seeds, one test set: seed 0's); ``nested`` (3 seeds, each its
own test set). Seed 0 is shared by all three, so one repetition scores five seed-test pairs. Every pair goes
through the REAL code: :func:`distlap.ranking.trial_replicates` (the paired bootstrap,
:func:`distlap.intervals.improvement_replicates`, seeded by the test set), :func:`distlap.ranking.pooled_laws`
(design detected from the test-set identity, :func:`distlap.seed_intervals.pool`), the lead table's marginal
interval (:meth:`distlap.seed_intervals.Pooled.interval`) and :func:`distlap.ranking.family`.

One setting differs from a trial's defaults, for time (one core, about 10 minutes): R = 200 example
resamples per seed (``laplace.n_bootstrap`` is 1000).

Printed per design: coverage of the 95% intervals of Δ_ECE and Δ_NLL (all 19 rows, and the planted row),
the family-wise error rate of the calls among the null rows (vs the MAP and pairs, families of 10 and 18)
and the power to call the planted row among 10 and 18 predictives (vs the MAP), each with its
Monte-Carlo standard error. The last lines, one per design:
``design=<name> coverage_ece=<x> coverage_nll=<x> fwer=<x> power10=<x> power18=<x>`` (coverage: the
lower of the all-rows and planted-row coverage; fwer: the largest of the four families).

    python benchmarks/inference_coverage.py            # the default: 500 repetitions per design
    python benchmarks/inference_coverage.py --quick    # a tiny run (tests)
"""

from __future__ import annotations

import argparse
import functools
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import interpolate, optimize

from distlap import metrics, ranking
from distlap.intervals import test_set_identity
from distlap.provenance import write_benchmark

ROOT = Path(__file__).resolve().parents[1]
DESIGNS = ("single", "crossed", "nested")
N_NULL = 18
FAMILIES = (10, 18)


@dataclass(frozen=True)
class World:
    """The generator's settings (module doc)."""

    n_classes: int = 5
    n_test: int = 1000
    scale: float = 2.7  # a
    sigma: float = 1.0  # σ, the per-example noise of every predictive
    t_map: float = 1.8  # T_map (ECE ≈ 0.2)
    target: float = 0.03  # population Δ_ECE of the planted predictive at the central parameters
    tau: float = 0.1  # seed effect on log T shared by the MAP and the planted predictive
    tau_planted: float = 0.05  # the planted predictive's own seed effect on log T
    n_bins: int = 15
    n_seeds: int = 3


@dataclass(frozen=True)
class Settings:
    reps: int = 500
    n_resamples: int = 200  # R per seed (a trial's laplace.n_bootstrap is 1000)
    population: int = 400_000  # M, examples of the population functions
    seed: int = 0
    level: float = 0.95


# ------------------------------------------------------------------------------------ the generator


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_set(world: World, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Latent logits z (N, C) and labels y ~ Cat(softmax(z))."""
    z = world.scale * rng.standard_normal((world.n_test, world.n_classes))
    q = softmax(z)
    y = (q.cumsum(1) < rng.random((world.n_test, 1))).sum(1).clip(max=world.n_classes - 1)
    return z, y


def predictive(world: World, z: np.ndarray, temp: float, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(softmax(temp * (z + world.sigma * rng.standard_normal(z.shape))))


def seed_probs(world: World, z: np.ndarray, temps: tuple[float, float], rng: np.random.Generator) -> tuple:
    """One seed's MAP and its 19 other predictives (planted first, then the nulls)."""
    t_map, t_planted = temps
    others = {"planted": predictive(world, z, t_planted, rng)}
    others |= {f"null_{k:02d}": predictive(world, z, t_map, rng) for k in range(N_NULL)}
    return predictive(world, z, t_map, rng), others


def seed_temps(world: World, t_planted: float, rng: np.random.Generator) -> tuple[float, float]:
    eps, eta = rng.standard_normal(2)
    return world.t_map * np.exp(world.tau * eps), t_planted * np.exp(
        world.tau * eps + world.tau_planted * eta
    )


# ----------------------------------------------------------------------------------------- the truth


@dataclass(frozen=True)
class Truth:
    ece: interpolate.CubicSpline  # population ECE as a function of log T
    nll: interpolate.CubicSpline
    t_planted: float
    mean_delta: dict  # {"ece": ..., "nll": ...}: the seed population's mean Δ of the planted row

    def delta(self, temps: tuple[float, float]) -> dict:
        a, b = np.log(temps)
        return {s: float(f(a) - f(b)) for s, f in (("ece", self.ece), ("nll", self.nll))}


def population(world: World, log_temps: np.ndarray, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Population ECE and NLL at each log T, from m common-random-number examples (module doc)."""
    rng = np.random.default_rng([seed, 99])
    z = world.scale * rng.standard_normal((m, world.n_classes))
    noisy, q = z + world.sigma * rng.standard_normal(z.shape), softmax(z)
    ece, nll = [], []
    for lt in log_temps:
        logp = np.exp(lt) * noisy
        logp = logp - logp.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        conf, pred = np.exp(logp.max(1)), logp.argmax(1)
        bins = np.minimum((conf * world.n_bins).astype(int), world.n_bins - 1)
        gap = np.bincount(bins, q[np.arange(m), pred] - conf, world.n_bins)
        ece.append(np.abs(gap).sum() / m)
        nll.append(-(q * logp).sum(1).mean())
    return np.array(ece), np.array(nll)


def truth(world: World, settings: Settings) -> Truth:
    """The population functions on a grid of log T, the planted temperature and the estimands."""
    width = 6 * (world.tau + world.tau_planted)
    grid = np.linspace(np.log(world.t_map) - 0.6 - width, np.log(world.t_map) + width, 161)
    ece, nll = population(world, grid, settings.population, settings.seed)
    ece_f, nll_f = interpolate.CubicSpline(grid, ece), interpolate.CubicSpline(grid, nll)
    at_map = float(ece_f(np.log(world.t_map)))
    low = optimize.brentq(lambda lt: at_map - ece_f(lt) - world.target, grid[0] + width, np.log(world.t_map))
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    weights = weights / weights.sum()
    eps, eta = np.meshgrid(nodes, nodes, indexing="ij")
    w = np.outer(weights, weights)
    a, b = np.log(world.t_map) + world.tau * eps, low + world.tau * eps + world.tau_planted * eta
    mean = {s: float((w * (f(a) - f(b))).sum()) for s, f in (("ece", ece_f), ("nll", nll_f))}
    return Truth(ece_f, nll_f, float(np.exp(low)), mean)


# -------------------------------------------------------------------------------- one repetition


def _record(world: World, z: np.ndarray, y: np.ndarray, temps, rng, settings: Settings) -> dict:
    """One seed on one test set, through the protocol's own code."""
    probs_map, others = seed_probs(world, z, temps, rng)
    labels = torch.from_numpy(y)
    scores = {
        "ece": (functools.partial(metrics.expected_calibration_error, n_bins=world.n_bins), False),
        "nll": (metrics.negative_log_likelihood, False),
    }
    identity = test_set_identity(torch.from_numpy(z), labels)
    return ranking.trial_replicates(
        probs_map, others, labels, scores, test_set=identity, n_resamples=settings.n_resamples
    )


def _judge(records: list[dict], truth_delta: dict, settings: Settings) -> dict:
    """Coverage, calls among the nulls and calls of the planted row, for one design's records."""
    laws = ranking.pooled_laws(records)
    out = {"design": laws["ece"].design}
    for score in ("ece", "nll"):
        law = laws[score]
        low, high = law.interval(settings.level)
        true = torch.tensor([truth_delta[score] if n == "planted" else 0.0 for n in law.names])
        covered = (low <= true) & (true <= high)
        out[f"cover_{score}"] = float(covered.double().mean())
        out[f"cover_{score}_planted"] = bool(covered[law.names.index("planted")])
    _, se, _ = laws["ece"].contrast(torch.eye(len(laws["ece"].names)))
    out["se_planted_ece"] = float(se[laws["ece"].names.index("planted")])
    ece = laws["ece"]
    nulls = [n for n in ece.names if n != "planted"]
    for m in FAMILIES:
        vs = ranking.family(ece, ranking.versus_map(ece.names, nulls[:m]), settings.level)
        pairs = ranking.family(ece, ranking.pairs(ece.names, nulls[:m]), settings.level)
        out[f"fwer_vs_map_{m}"] = any(row["distinguishable"] for row in vs["rows"])
        out[f"fwer_pairs_{m}"] = any(row["distinguishable"] for row in pairs["rows"])
        power = ranking.family(
            ece, ranking.versus_map(ece.names, ["planted", *nulls[: m - 1]]), settings.level
        )
        row = next(r for r in power["rows"] if r["name"] == "planted")
        out[f"power_{m}"] = bool(row["distinguishable"] and row["estimate"] > 0)
    return out


def repetition(world: World, tr: Truth, settings: Settings, rep: int) -> dict:
    """The three designs on one draw: seed 0 on test set A (single); seeds 1', 2' on A (crossed); seeds
    1, 2 on their own test sets B, C (nested)."""
    rng = np.random.default_rng([settings.seed, rep])
    z, y = test_set(world, rng)
    temps = [seed_temps(world, tr.t_planted, rng) for _ in range(2 * world.n_seeds - 1)]
    first = _record(world, z, y, temps[0], rng, settings)
    crossed = [first] + [_record(world, z, y, t, rng, settings) for t in temps[1 : world.n_seeds]]
    nested = [first]
    for t in temps[world.n_seeds :]:
        z2, y2 = test_set(world, rng)
        nested.append(_record(world, z2, y2, t, rng, settings))
    return {
        "single": _judge([first], tr.delta(temps[0]), settings),
        "crossed": _judge(crossed, tr.mean_delta, settings),
        "nested": _judge(nested, tr.mean_delta, settings),
    }


# ---------------------------------------------------------------------------------------- summary


def _rate(values: list) -> dict:
    x = np.asarray(values, dtype=float)
    return {"rate": float(x.mean()), "mc_se": float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None}


def summarise(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if k not in ("design", "se_planted_ece")]
    out = {k: _rate([r[k] for r in runs]) for k in keys}
    out["se_planted_ece"] = float(np.sqrt(np.mean([r["se_planted_ece"] ** 2 for r in runs])))
    out["design_detected"] = sorted({r["design"] for r in runs})
    out["coverage_ece"] = min(out["cover_ece"]["rate"], out["cover_ece_planted"]["rate"])
    out["coverage_nll"] = min(out["cover_nll"]["rate"], out["cover_nll_planted"]["rate"])
    out["fwer"] = max(out[f"fwer_{f}_{m}"]["rate"] for f in ("vs_map", "pairs") for m in FAMILIES)
    return out


def _fmt(r: dict) -> str:
    se = r["mc_se"]
    return f"{r['rate']:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def report(name: str, s: dict) -> list[str]:
    lines = [
        f"[{name}] design detected {s['design_detected']}; coverage Δ_ECE all rows {_fmt(s['cover_ece'])}, "
        f"planted {_fmt(s['cover_ece_planted'])}; Δ_NLL all rows {_fmt(s['cover_nll'])}, planted "
        f"{_fmt(s['cover_nll_planted'])}",
        f"[{name}] FWER (global null): vs MAP 10 {_fmt(s['fwer_vs_map_10'])}, "
        f"18 {_fmt(s['fwer_vs_map_18'])}; pairs 45 {_fmt(s['fwer_pairs_10'])}, "
        f"153 {_fmt(s['fwer_pairs_18'])}",
        f"[{name}] power (planted Δ_ECE, vs MAP): among 10 {_fmt(s['power_10'])}, among 18 "
        f"{_fmt(s['power_18'])}; rms se of the planted Δ_ECE {s['se_planted_ece']:.4f}",
    ]
    return lines


def final_line(name: str, s: dict) -> str:
    return (
        f"design={name} coverage_ece={s['coverage_ece']:.3f} coverage_nll={s['coverage_nll']:.3f} "
        f"fwer={s['fwer']:.3f} power10={s['power_10']['rate']:.3f} power18={s['power_18']['rate']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run: 4 repetitions, small population")
    parser.add_argument("--reps", type=int, help="repetitions per design (default 500)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = Settings(reps=4, population=20_000) if args.quick else Settings()
    if args.reps:
        settings = Settings(**{**asdict(settings), "reps": args.reps})
    world, start = World(), time.perf_counter()
    tr = truth(world, settings)
    print(
        f"truth: T_map {world.t_map}, planted T {tr.t_planted:.4f}; MAP population ECE "
        f"{float(tr.ece(np.log(world.t_map))):.4f}; seed-population mean Δ_ECE {tr.mean_delta['ece']:+.4f}, "
        f"Δ_NLL {tr.mean_delta['nll']:+.4f}",
        flush=True,
    )
    runs = {d: [] for d in DESIGNS}
    for rep in range(settings.reps):
        for design, result in repetition(world, tr, settings, rep).items():
            runs[design].append(result)
        if (rep + 1) % 50 == 0:
            print(f"  {rep + 1} repetitions, {time.perf_counter() - start:.0f} s", flush=True)
    summary = {d: summarise(runs[d]) for d in DESIGNS}
    for d in DESIGNS:
        print("\n".join(report(d, summary[d])))
    figures = {
        "summary": summary,
        "truth": {"t_planted": tr.t_planted, "mean_delta": tr.mean_delta},
        "seconds": time.perf_counter() - start,
    }
    path = write_benchmark(
        "inference_coverage", {"world": asdict(world), **asdict(settings)}, figures, args.out
    )
    args.results.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, args.results / path.name)
    print(f"wrote {path} and {args.results / path.name}")
    for d in DESIGNS:
        print(final_line(d, summary[d]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
