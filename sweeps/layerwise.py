"""Layer-wise Laplace sweep: Optuna over prior precision and LoRA rank, Ray Tune trials, MLflow tracking.

python sweeps/layerwise.py [--config sweeps/configs/NAME.yaml] [key=value ...] [--output DIR]
                           [--address ray://HOST:10001 | auto] [--resume] [--smoke-test]

With no arguments: sweeps/configs/default.yaml on a local Ray (tiny ViT, Fashion-MNIST classes 5-9).
Exit codes: 0 done (failed trials are recorded, not fatal), 1 every trial failed, 2 bad input or
unreachable cluster, 130 interrupted (continue with --resume --output DIR).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distlap.config import ConfigError
from distlap.sweep import CONFIG_FILE, SweepError, load_saved, run_sweep
from distlap.sweep_config import load_sweep_config, resolve

CONFIGS = Path(__file__).resolve().parent / "configs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python sweeps/layerwise.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="sweep YAML (default: sweeps/configs/default.yaml)")
    parser.add_argument("--output", type=Path, help="output folder (default: runs/<name>-<timestamp>)")
    parser.add_argument("--address", help="Ray cluster: ray://HOST:10001 or auto (default: a local Ray)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --output")
    parser.add_argument("--smoke-test", action="store_true", help="run sweeps/configs/smoke.yaml (~1 min)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. search.num_samples=8 trial.train.epochs=1 resources.cpus_per_trial=2")
    args = parser.parse_args(argv)
    if args.smoke_test and args.config:
        parser.error("--smoke-test is a config of its own; drop --config")
    if args.resume and (args.config or args.smoke_test or args.overrides or not args.output):
        parser.error("--resume takes --output DIR (and optionally --address) only: the sweep's own "
                     f"DIR/{CONFIG_FILE} is what continues")
    extra = [f"address={args.address}"] if args.address else []
    try:
        if args.resume:
            cfg = load_saved(args.output, extra)
        else:
            path = CONFIGS / "smoke.yaml" if args.smoke_test else args.config or CONFIGS / "default.yaml"
            output = [f"output_dir={args.output.resolve()}"] if args.output else []
            cfg = resolve(load_sweep_config(path, [*args.overrides, *output, *extra]))
        summary = run_sweep(cfg, resume=args.resume)
    except (ConfigError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(summary) < cfg.search.num_samples or (summary.status == "unfinished").any():
        return 130  # interrupted: --resume continues it
    if not (summary.status == "ok").any():
        return 1
    _report(cfg.out)
    return 0


def _report(out: Path) -> None:
    """The analysis report of the finished sweep (``analysis/report.py``); its failure fails no sweep."""
    from analysis.collect import ReportError
    from analysis.report import build_report

    try:
        build_report(out)
    except ReportError as err:
        print(f"[sweep] no report: {err}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
