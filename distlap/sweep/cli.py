"""The command line of the sweep scripts (``sweeps/layerwise.py``, ``sweeps/peft_methods.py``).

``main(kind, configs, report, argv)`` parses ``[--config X.yaml] [key=value ...] [--output DIR] [--address A]
[--resume] [--smoke-test]``, runs the sweep and writes its report. Exit codes: 0 done (failed trials
are recorded, not fatal), 1 every trial failed, 2 bad input, an unusable store or folder, or an
unreachable cluster (one message, nothing written), 3 a store failed mid-sweep (results kept; fix it,
then --resume), 130 interrupted (continue with --resume --output DIR). ``--resume`` takes only the
overrides that cannot change what the sweep computes (resources, max_failures, --address).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from distlap.config import ConfigError
from distlap.names import CONFIG_FILE, STATUS
from distlap.sweep.driver import SweepError, load_saved, run_sweep
from distlap.sweep.kinds import KINDS, resume_command
from distlap.sweep.lock import LockError
from distlap.sweep.progress import print_closing
from distlap.sweep.settings import SweepConfig, load_sweep_config, resolve
from distlap.sweep.stores import StoreError


def main(
    kind: str,
    configs: tuple[Path, Path],
    report: Callable[[Path], object],
    argv: list[str] | None = None,
    description: str = "",
) -> int:
    """``configs``: the script's embedded default and its smoke-test config; ``report(output_dir)``
    writes the sweep's report when it ends."""
    parser = _parser(kind, *configs, description)
    args = parser.parse_args(argv)
    if args.smoke_test and args.config:
        parser.error("--smoke-test is a config of its own; drop --config")
    if args.resume and (args.config or args.smoke_test or not args.output):
        parser.error("--resume takes --output DIR (the sweep to continue), no --config or --smoke-test")
    cfg, start = None, time.monotonic()
    try:
        cfg = _config(kind, args, *configs)
        summary = run_sweep(cfg, resume=args.resume)
    except (ConfigError, SweepError, LockError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StoreError as err:
        print(
            f"error: {err}\n  The sweep stopped; finished trials are kept. Fix the store, then continue with:"
            f"\n  {resume_command(cfg)}",
            file=sys.stderr,
        )
        return 3
    except KeyboardInterrupt:
        started = cfg is not None and (cfg.out / CONFIG_FILE).is_file()
        print(
            f"\ninterrupted; continue with: {resume_command(cfg)}" if started else "\ninterrupted",
            file=sys.stderr,
        )
        return 130
    return _ended(cfg, summary, report, start)


def _ended(cfg: SweepConfig, summary, report: Callable[[Path], object], start: float) -> int:
    """The exit code of a sweep that returned its summary; the report if any trial is ok; then the
    closing lines, the last ones printed: the wall time, where everything is, how to look at it."""
    if len(summary) < cfg.search.num_samples or (summary[STATUS] == "unfinished").any():
        code = 130  # interrupted: --resume continues it
    elif not (summary[STATUS] == "ok").any():
        code = 1
    else:
        _report(report, cfg.out)
        code = 0
    print_closing(cfg, wall_s=time.monotonic() - start)
    return code


def _parser(kind: str, default: Path, smoke: Path, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=KINDS[kind].command, description=description)
    parser.add_argument("--config", type=Path, help=f"sweep YAML (default: {default.name} beside the script)")
    parser.add_argument("--output", type=Path, help="output folder (default: runs/<name>-<timestamp>)")
    parser.add_argument(
        "--address", help="Ray cluster: auto (on a cluster node) or HEAD:6379 (default: a local Ray)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep in --output (overrides: resources.*, max_failures only)",
    )
    parser.add_argument("--smoke-test", action="store_true", help=f"run {smoke.name} (~1-2 min)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="e.g. search.num_samples=8 trial.train.epochs=1 resources.cpus_per_trial=2",
    )
    return parser


def _config(kind: str, args: argparse.Namespace, default: Path, smoke: Path) -> SweepConfig:
    """The sweep to run: the saved one (--resume), or the file (or default) with the overrides."""
    # Paths and addresses are taken as they are: YAML would cut "a #b" at the '#'.
    exact = {"address": args.address} if args.address else {}
    if args.resume:
        cfg = load_saved(args.output, args.overrides, exact)
    else:
        path = args.config or (smoke if args.smoke_test else default)
        output = {"output_dir": str(args.output.expanduser().resolve())} if args.output else {}
        cfg = resolve(load_sweep_config(path, args.overrides, {**output, **exact}))
    if cfg.kind != kind:
        raise ConfigError(f"kind={cfg.kind}: this config is for sweeps/{cfg.kind}.py, not sweeps/{kind}.py")
    return cfg


def _report(report: Callable[[Path], object], out: Path) -> None:
    """The sweep's report. A report that cannot be made fails no sweep: its results are saved and the
    message says why."""
    try:
        report(out)
    except Exception as err:  # noqa: BLE001 - whatever broke the report, the sweep's results stand
        print(f"[sweep] no report: {type(err).__name__}: {err}", file=sys.stderr)
