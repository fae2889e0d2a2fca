"""The cluster's stores: MLflow and Optuna in one PostgreSQL server (SQLite's locking is not reliable
on the cluster's NFS), reached with a password that lives in PGPASSFILE, never in a URI."""

from __future__ import annotations

import signal

import pytest
from faults.harness import check_exact, ids, postgres_server, runs_by_kind, start, sweep, wait_for
from mlflow import MlflowClient

from distlap.config import ConfigError
from distlap.sweep.settings import load_sweep_config

N = 3


@pytest.mark.slow
def test_a_sweep_on_postgresql_keeps_every_trial_and_subset_run_across_a_resume(tmp_path, monkeypatch):
    """Ctrl-C after the first trial, then --resume: every trial and subset run is in PostgreSQL, once."""
    with postgres_server() as (stores, passfile):
        monkeypatch.setenv("PGPASSFILE", str(passfile))  # this test reads the stores too
        out, log = tmp_path / "pg", tmp_path / "first.log"
        proc = start(log, "--smoke-test", "--output", str(out), f"search.num_samples={N}", *stores)
        wait_for(proc, log, lambda text: ids(text, "stage: done"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]

        second = sweep("--resume", "--output", str(out), "max_failures=2")  # an override a resume takes
        assert second.returncode == 0, second.stderr[-3000:]
        check_exact(out, N)
        cfg = load_sweep_config(out / "config.yaml")
        assert cfg.max_failures == 2  # the config continued is saved
        assert cfg.tracking.uri.startswith("postgresql") and cfg.search.storage.startswith("postgresql")
        assert not list(out.glob("*.db"))  # no SQLite beside it
        client = MlflowClient(cfg.tracking.uri)
        subset = runs_by_kind(out)["subset"][0]  # artifacts stay files, in the output folder
        assert [a.path for a in client.list_artifacts(subset.info.run_id)] == [
            f"reliability_{subset.data.tags['distlap.subset']}.png"
        ]
        assert (out / "mlartifacts").is_dir()


def test_a_password_in_a_store_uri_is_refused():
    """It would be saved in config.yaml and logged to MLflow as a parameter."""
    with pytest.raises(ConfigError, match=r"search\.storage: holds a password.*PGPASSFILE"):
        load_sweep_config(overrides=["search.storage=postgresql+psycopg://u:secret@db:5432/optuna"])
    with pytest.raises(ConfigError, match=r"tracking\.uri: holds a password.*MLFLOW_TRACKING_PASSWORD"):
        load_sweep_config(overrides=["tracking.uri=http://u:secret@head:5000"])
