"""How close each optimiser gets the default trial to a mode of the negative log joint, per prior precision.

For λ in ``--lambdas`` (default 1, 10, 100, 1000), on the layer-wise sweep's default trial (LoRA, the tiny
ViT, 300 Fashion-MNIST images, the init anchor), one line per (method, λ): iterations, seconds, the
stationarity ‖∇ log joint‖ / ‖∇ NLL‖ reached (0 at a mode; the mode regime's tolerance is 1e-2) and the
final objective L(θ) = mean NLL + λ/(2N)‖θ − θ₀‖² (full batch). Methods, each from the same seeded start:

- ``adam``:        the trial's Adam epochs (train.epochs, cosine schedule): the posthoc regime's θ̂.
- ``adam_long``:   Adam for ``--long`` times as many epochs (the same schedule stretched).
- ``adam+lbfgs``:  ``adam``, then full-batch L-BFGS (scipy's L-BFGS-B; the mode regime, and the posthoc
                   refinement's ``lbfgs`` method) for at most ``--lbfgs-steps`` steps, stopping at the
                   mode tolerance; the stationarity every 50 steps is kept in the JSON (it is not
                   monotone: L-BFGS lowers L, not the gradient norm).
- ``adam+adam``:   ``adam``, then Adam continued for ``--refine-epochs`` epochs at ``train.refine_lr``
                   (the posthoc refinement's default method, :mod:`distlap.finetune.refine`, here
                   without its early stop).

    python benchmarks/map_convergence.py
    python benchmarks/map_convergence.py --lambdas 10 --lbfgs-steps 3000     # how far the mode is

Writes ``runs/benchmarks/map_convergence-<timestamp>.json`` (settings, figures, git commit, versions,
machine); the README quotes a copy kept in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from distlap.config import TrialConfig, build, deep_merge, parse_overrides
from distlap.finetune.refine import refine
from distlap.finetune.run import prepare, train
from distlap.finetune.train import converge, full_batch_gradients
from distlap.provenance import write_benchmark
from distlap.sweep.settings import load_sweep_config

DEFAULT = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "default.yaml"


def trial_config(lam: float, epochs: int | None, overrides: list[str]) -> TrialConfig:
    """The default sweep's base trial with ``overrides``, at prior precision ``lam`` (and ``epochs``),
    posthoc, 1 thread."""
    raw = deep_merge(load_sweep_config(DEFAULT).trial.model_dump(mode="json"), parse_overrides(overrides))
    train = {"prior_precision": lam, "regime": "posthoc", "num_threads": 1}
    return build(TrialConfig, deep_merge(raw, {"train": train | ({"epochs": epochs} if epochs else {})}))


def point(ft) -> dict:
    """The stationarity ratio and the objective at the model's current parameters (full batch)."""
    loader = ft.loader("train", batch_size=ft.cfg.train.batch_size)
    value, nll, joint = full_batch_gradients(ft.model, loader, ft.prior, ft.device)
    return {"stationarity": (joint.norm() / nll.norm().clamp_min(1e-30)).item(), "objective": value}


def run_adam(lam: float, epochs: int | None, overrides: list[str]):
    """Fresh seeded trial, Adam for its epochs: (the trained FineTuned, its figures)."""
    ft = prepare(trial_config(lam, epochs, overrides), log=lambda m: None)
    start = time.perf_counter()
    train(ft, log=lambda m: None)
    seconds = time.perf_counter() - start
    steps = ft.cfg.train.epochs * len(ft.loader("train", batch_size=ft.cfg.train.batch_size))
    return ft, {"iterations": steps, "seconds": seconds, **point(ft)}


def run_lbfgs(ft, max_steps: int) -> dict:
    """L-BFGS from ``ft``'s current point until the mode tolerance or ``max_steps``."""
    trace = []

    def keep(line: str) -> None:  # "[distlap] L-BFGS step 50/500: stationarity 9.84e-01"
        trace.append(float(line.rsplit(" ", 1)[-1]))

    loader = ft.loader("train", batch_size=ft.cfg.train.batch_size)
    start = time.perf_counter()
    steps, _ = converge(ft.model, loader, ft.prior, ft.cfg.train, ft.device, keep, max_steps)
    return {"iterations": steps, "seconds": time.perf_counter() - start, **point(ft), "every_50": trace}


def run_adam_refine(ft, epochs: int) -> dict:
    """Adam continued from ``ft``'s current point for ``epochs`` at ``train.refine_lr`` (no early stop);
    the model is back at that point afterwards, for the next method."""
    cfg = ft.cfg.train.model_copy(update={"refine_method": "adam", "refine_steps": epochs})
    loaders = (ft.loader("train", batch_size=cfg.batch_size, shuffle=True), ft.loader("train"))
    theta_hat = copy.deepcopy(ft.model.state_dict())
    start = time.perf_counter()
    steps, _ = refine(ft.model, loaders, ft.prior, cfg, ft.device, target=0.0)
    row = {"iterations": steps, "seconds": time.perf_counter() - start, **point(ft)}
    ft.model.load_state_dict(theta_hat)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 10.0, 100.0, 1000.0])
    parser.add_argument("--lbfgs-steps", type=int, default=500)
    parser.add_argument("--long", type=int, default=10, help="adam_long: this many times the epochs")
    parser.add_argument("--refine-epochs", type=int, default=60, help="adam+adam: epochs after theta-hat")
    parser.add_argument("--out", default="runs/benchmarks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="trial settings (tests: tiny data)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    figures = {}
    for lam in args.lambdas:
        ft, adam = run_adam(lam, None, args.overrides)
        long_ = run_adam(lam, ft.cfg.train.epochs * args.long, args.overrides)[1]
        again = run_adam_refine(ft, args.refine_epochs)  # from θ̂, which L-BFGS then starts from too
        lbfgs = run_lbfgs(ft, args.lbfgs_steps)
        figures[f"{lam:g}"] = {"adam": adam, "adam_long": long_, "adam+adam": again, "adam+lbfgs": lbfgs}
        for method, row in figures[f"{lam:g}"].items():
            print(
                f"map_convergence: method={method} lambda={lam:g} iterations={row['iterations']} "
                f"seconds={row['seconds']:.1f} stationarity={row['stationarity']:.3e} "
                f"objective={row['objective']:.4f}",
                flush=True,
            )
    settings = {**vars(args), "config": str(DEFAULT), "tolerance": ft.cfg.train.stationarity_tol}
    path = write_benchmark("map_convergence", settings, figures, args.out)
    print(f"map_convergence: written {path} (adam+*: iterations and seconds after theta-hat)")
    return figures


if __name__ == "__main__":
    main()
