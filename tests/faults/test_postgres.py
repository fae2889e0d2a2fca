"""The cluster's stores: MLflow and Optuna in one PostgreSQL server (SQLite's locking is not reliable
on the cluster's NFS), reached with a password that lives in PGPASSFILE, never in a URI. A whole sweep
on PostgreSQL, stopped and resumed: tests/faults/test_resume.py (Ctrl-C)."""

from __future__ import annotations

import pytest

from distlap.config import ConfigError
from distlap.sweep.settings import load_sweep_config


def test_a_password_in_a_store_uri_is_refused():
    """It would be saved in config.yaml and logged to MLflow as a parameter."""
    with pytest.raises(ConfigError, match=r"search\.storage: holds a password.*PGPASSFILE"):
        load_sweep_config(overrides=["search.storage=postgresql+psycopg://u:secret@db:5432/optuna"])
    with pytest.raises(ConfigError, match=r"tracking\.uri: holds a password.*MLFLOW_TRACKING_PASSWORD"):
        load_sweep_config(overrides=["tracking.uri=http://u:secret@head:5000"])
