"""The command line of the sweep scripts (``sweeps/layerwise.py``, ``sweeps/peft_methods.py``).

``main(kind, report, argv)`` parses ``[--config X.yaml] [key=value ...] [--output DIR] [--address A]
[--resume] [--smoke-test]``, runs the sweep and writes its report. Exit codes: 0 done (failed trials
are recorded, not fatal), 1 every trial failed, 2 bad input or unreachable cluster, 130 interrupted
(continue with --resume --output DIR).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from distlap.config import ConfigError
from distlap.sweep import CONFIG_FILE, SweepError, load_saved, run_sweep
from distlap.sweep_config import load_sweep_config, resolve

CONFIGS = Path(__file__).resolve().parents[1] / "sweeps" / "configs"
# kind -> (embedded default, smoke test) in sweeps/configs/
DEFAULTS = {"layerwise": ("default.yaml", "smoke.yaml"),
            "peft_methods": ("peft_methods.yaml", "peft_methods_smoke.yaml")}


def main(kind: str, report: Callable[[Path], object], argv: list[str] | None = None,
         description: str = "") -> int:
    default, smoke = DEFAULTS[kind]
    parser = argparse.ArgumentParser(prog=f"python sweeps/{kind}.py", description=description)
    parser.add_argument("--config", type=Path, help=f"sweep YAML (default: sweeps/configs/{default})")
    parser.add_argument("--output", type=Path, help="output folder (default: runs/<name>-<timestamp>)")
    parser.add_argument("--address", help="Ray cluster: ray://HOST:10001 or auto (default: a local Ray)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --output")
    parser.add_argument("--smoke-test", action="store_true", help=f"run sweeps/configs/{smoke} (~1-2 min)")
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
            path = CONFIGS / (smoke if args.smoke_test else default) if not args.config else args.config
            output = [f"output_dir={args.output.resolve()}"] if args.output else []
            cfg = resolve(load_sweep_config(path, [*args.overrides, *output, *extra]))
        if cfg.kind != kind:
            raise ConfigError(f"kind={cfg.kind}: this config is for sweeps/{cfg.kind}.py, not sweeps/{kind}.py")
        summary = run_sweep(cfg, resume=args.resume)
    except (ConfigError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(summary) < cfg.search.num_samples or (summary.status == "unfinished").any():
        return 130  # interrupted: --resume continues it
    if not (summary.status == "ok").any():
        return 1
    _report(report, cfg.out)
    return 0


def _report(report: Callable[[Path], object], out: Path) -> None:
    """The sweep's analysis report; a report that cannot be made fails no sweep (it says why)."""
    from analysis.collect import ReportError

    try:
        report(out)
    except ReportError as err:
        print(f"[sweep] no report: {err}", file=sys.stderr)
