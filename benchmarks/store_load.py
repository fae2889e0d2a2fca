"""Load on the sweep's stores: many tiny trials at once, then every write checked in the stores themselves.

python benchmarks/store_load.py [--quick] [--trials 24] [--concurrency 8] [--postgres auto|yes|no]
                                [--sweeps DIR] [--out DIR] [--results DIR]

Runs the real sweep (``python sweeps/layerwise.py --smoke-test``) with ``--trials`` trials made as
tiny as the config allows, ``--concurrency`` of them at once on a local Ray (``cpus_per_trial`` =
this machine's CPUs / concurrency), first on the default stores (SQLite files ``mlflow.db`` and
``optuna.db`` in the output folder), then, where PostgreSQL's programs are installed, on a throwaway
PostgreSQL server (the cluster's store). After each sweep :func:`distlap.sweep.audit.audit` compares
the stores with the files the trials wrote: every MLflow run, metric and artifact and every Optuna trial
there once. One line per store:

    store_load: trials=<n> concurrency=<c> lost=<n> duplicated=<n> locked_errors=<n> seconds=<s> store=<s>

(store: sqlite or postgresql; goal: lost=0 duplicated=0 locked_errors=0; seconds: the sweep's wall
time, its report included, on a shared machine a noisy figure). The JSON (``store_load-<time>.json``:
the lines' figures, what was lost or duplicated, settings, provenance) goes to ``--out`` and
``--results``. ``--quick``: 4 trials, 2 at once, SQLite only (the test).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distlap.provenance import write_benchmark
from distlap.sweep.audit import audit

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "layerwise.py"
# The smoke sweep (sweeps/configs/smoke.yaml: 3-block width-32 ViT, 1 epoch) made smaller still: the
# load is on the stores, not the CPUs.
TINY = [
    "trial.data.max_train=100",
    "trial.data.max_val=50",
    "trial.data.max_test=50",
    "trial.train.refine_steps=0",
    "trial.laplace.fit_examples=50",
    "trial.laplace.n_samples=2",
    "trial.laplace.n_bootstrap=200",
    "trial.shift.corruptions=[]",
    "trial.ood.max_examples=20",
]


def sweep_args(out: Path, trials: int, concurrency: int, cpus: int) -> list[str]:
    """The sweep's command line: ``concurrency`` trials fit this machine's local Ray at once."""
    per_trial = math.floor(100 * min(1.0, cpus / concurrency)) / 100
    return [
        "--smoke-test",
        "--output",
        str(out),
        f"search.num_samples={trials}",
        f"resources.max_concurrent={concurrency}",
        f"resources.cpus_per_trial={per_trial}",
        *TINY,
    ]


def run_one(store: str, out: Path, args: argparse.Namespace, extra: list[str], env: dict) -> dict:
    """One sweep on ``store``, its console in ``out/../<store>.log``; the audit's figures."""
    log = out.parent / f"{store}.log"
    cmd = [sys.executable, str(SCRIPT), *sweep_args(out, args.trials, args.concurrency, os.cpu_count() or 1)]
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([*cmd, *extra], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    console = log.read_text(errors="replace")
    if proc.returncode not in (0, 1):  # 1: every trial failed; the stores are still audited
        print(console[-3000:], file=sys.stderr)
    with _env(env):  # the audit reads the stores as the sweep did (PGPASSFILE)
        found = audit(out, console)
    return {
        "store": store,
        "trials": args.trials,
        "concurrency": args.concurrency,
        "lost": len(found.lost),
        "duplicated": len(found.duplicated),
        "locked_errors": found.locked_errors,
        "seconds": round(seconds, 1),
        "exit_code": proc.returncode,
        "failed_trials": found.failed,
        "checked": dict(found.checked),
        "lost_items": found.lost[:200],
        "duplicated_items": found.duplicated[:200],
    }


def line(r: dict) -> str:
    return (
        f"store_load: trials={r['trials']} concurrency={r['concurrency']} lost={r['lost']} "
        f"duplicated={r['duplicated']} locked_errors={r['locked_errors']} seconds={r['seconds']:.0f} "
        f"store={r['store']}"
    )


@contextlib.contextmanager
def _env(env: dict):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- a throwaway PostgreSQL server (tests/faults/harness.py starts it from here) ------------------


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@contextlib.contextmanager
def postgres_server(user: str = "distlap", password: str = "store-load-benchmark"):
    """A PostgreSQL server on 127.0.0.1 with databases ``mlflow`` and ``optuna``; yields (the two
    store overrides, a PGPASSFILE path). Runs as the ``postgres`` user when this is root."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    root = Path(tempfile.mkdtemp(prefix="distlap-pg-"))
    root.chmod(0o755)
    (root / "pw").write_text(password)
    as_owner = []
    if os.geteuid() == 0:
        as_owner = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        shutil.chown(root / "pw", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda cmd: subprocess.run(cmd, check=True, capture_output=True, text=True)
    run([*as_owner, initdb, "-D", root / "data", "-U", user, "-A", "scram-sha-256", "--pwfile", root / "pw"])
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    run([*as_owner, pg_ctl, "-D", root / "data", "-o", options, "-l", root / "log", "-w", "start"])
    passfile = root / "pgpass"
    passfile.write_text(f"127.0.0.1:{port}:*:{user}:{password}\n")
    passfile.chmod(0o600)
    try:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=port, user=user, password=password, dbname="postgres", autocommit=True
        ) as conn:
            for db in ("mlflow", "optuna"):
                conn.execute(f"CREATE DATABASE {db}")
        server = f"postgresql+psycopg://{user}@127.0.0.1:{port}"
        yield [f"tracking.uri={server}/mlflow", f"search.storage={server}/optuna"], passfile
    finally:
        subprocess.run(
            [*as_owner, pg_ctl, "-D", root / "data", "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 trials, 2 at once, SQLite only (the test)")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--postgres", choices=("auto", "yes", "no"), default="auto", help="auto: where initdb is installed"
    )
    parser.add_argument("--sweeps", type=Path, help="where the sweeps go (default: a new temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.concurrency, args.postgres = 4, 2, "no"
    if args.postgres == "yes" and not postgres_bin("initdb"):
        parser.error("--postgres yes: PostgreSQL's programs are not installed (apt-get install postgresql)")
    folder = args.sweeps or Path(tempfile.mkdtemp(prefix="store_load-"))  # kept for a look
    folder.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}  # this checkout's distlap in the sweep too
    results = [run_one("sqlite", folder / "sqlite", args, [], env)]
    print(line(results[-1]), flush=True)
    if args.postgres == "yes" or (args.postgres == "auto" and postgres_bin("initdb")):
        with postgres_server() as (stores, passfile):
            pg_env = {**env, "PGPASSFILE": str(passfile)}
            results.append(run_one("postgresql", folder / "postgresql", args, stores, pg_env))
        print(line(results[-1]), flush=True)
    settings = {
        "trials": args.trials,
        "concurrency": args.concurrency,
        "overrides": TINY,
        "quick": args.quick,
    }
    path = write_benchmark("store_load", settings, {"stores": results, "folder": str(folder)}, args.out)
    args.results.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, args.results / path.name)
    print(f"wrote {path} and {args.results / path.name}; sweeps in {folder}")
    for r in results:
        print(line(r))
    return 0 if all(r["lost"] == r["duplicated"] == r["locked_errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
