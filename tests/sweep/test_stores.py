"""The stores of a sweep checked before it starts, and a store's failure recognised mid-sweep."""

from __future__ import annotations

import errno
import http.server
import socket
import sqlite3
import threading
import time

import optuna
import pytest
from faults.harness import read_only

from distlap.sweep.settings import SweepConfig, resolve, sqlite_path, sqlite_url
from distlap.sweep.stores import (
    MLFLOW,
    OPTUNA,
    StoreError,
    check_folder,
    check_mlflow_server,
    check_sql,
    check_stores,
    client_env,
    filesystem_type,
    masked,
    store_fault,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["a #b", "{a}", "it's", "50%", "ü n", "{SCHEMA_VERSION}", "x\ny"])
def test_sqlite_urls_survive_file_names(tmp_path, name):
    """Optuna and MLflow open exactly the file named, whatever characters its folder holds (but the two
    that settings.resolve refuses), and create nothing else."""
    from mlflow import MlflowClient

    from distlap.sweep.study import storage

    folder = tmp_path / name
    folder.mkdir()
    url = sqlite_url(folder / "optuna.db")
    assert sqlite_path(url) == folder / "optuna.db"
    optuna.create_study(storage=storage(url), study_name="s")
    client = MlflowClient(sqlite_url(folder / "mlflow.db"))
    client.create_experiment("e", artifact_location=(folder / "art").as_uri())
    assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db", "optuna.db"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_check_stores_passes_a_fresh_sweep_and_writes_nothing(tmp_path):
    cfg = resolve(SweepConfig(output_dir=str(tmp_path / "new" / "sweep")))
    check_stores(cfg, resume=False)
    assert list(tmp_path.iterdir()) == []  # nothing created, not even the folder


def test_read_only_or_unreachable_database_is_named(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    db = store / "mlflow.db"
    sqlite3.connect(db).execute("create table t (x)").connection.commit()
    check_sql(MLFLOW, sqlite_url(db))
    with (
        read_only(store),
        pytest.raises(StoreError, match=r"the MLflow store .* failed: attempt to write a readonly database"),
    ):
        check_sql(MLFLOW, sqlite_url(db))
    start = time.monotonic()
    with pytest.raises(StoreError, match=r"the Optuna store \(postgresql\+psycopg://nobody@.*\) failed"):
        check_sql(OPTUNA, f"postgresql+psycopg://nobody@127.0.0.1:{_free_port()}/none")
    assert time.monotonic() - start < 10


def test_a_dead_mlflow_server_fails_in_seconds(monkeypatch):
    start = time.monotonic()
    with pytest.raises(StoreError, match=r"the MLflow store \(http://127.0.0.1:\d+\) failed: no answer"):
        check_mlflow_server(f"http://127.0.0.1:{_free_port()}")
    assert time.monotonic() - start < 10


def test_mlflow_server_that_refuses_our_credentials_says_how_to_give_them():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(StoreError, match=r"HTTP 401.*MLFLOW_TRACKING_USERNAME"):
            check_mlflow_server(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


def test_folder_without_room_or_write_access_is_refused(tmp_path, monkeypatch):
    check_folder(tmp_path / "a" / "b", need_bytes=1)
    with pytest.raises(StoreError, match=r"the output folder .* MiB free, the sweep needs about"):
        check_folder(tmp_path / "a", need_bytes=2**62)
    monkeypatch.setattr("tempfile.NamedTemporaryFile", _raise(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(StoreError, match=r"is not writable \(Read-only file system\)"):
        check_folder(tmp_path / "a", need_bytes=1)


def _raise(err):
    def fail(*args, **kwargs):
        raise err

    return fail


def test_sqlite_on_a_network_file_system_is_refused(tmp_path, monkeypatch):
    mounts = f"server:/export {tmp_path} nfs4 rw 0 0\n/dev/vda / ext4 rw 0 0\n"
    assert filesystem_type(tmp_path / "x" / "optuna.db", mounts) == "nfs4"
    assert filesystem_type(tmp_path.parent, mounts) == "ext4"
    monkeypatch.setattr("distlap.sweep.stores.filesystem_type", lambda path: "nfs4")
    with pytest.raises(
        StoreError, match=r"nfs4 file system, where SQLite's locking is not reliable.*PostgreSQL"
    ):
        check_sql(OPTUNA, sqlite_url(tmp_path / "optuna.db"))


def test_store_faults_are_told_apart_from_other_errors(tmp_path):
    """Which store failed, from what the libraries raise; a trial's own error is no store fault."""
    import sqlalchemy
    from mlflow.exceptions import MlflowException
    from optuna.exceptions import StorageInternalError

    cfg = resolve(SweepConfig(output_dir=str(tmp_path)))
    operational = sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("disk I/O error"))
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    wrapped = MlflowException("(sqlite3.OperationalError) attempt to write", TEMPORARILY_UNAVAILABLE)
    wrapped.__cause__ = operational  # what MLflow's SQLAlchemy store raises
    bare = MlflowException("(sqlite3.OperationalError) database is locked")
    bare.__cause__ = operational
    cases = [
        (wrapped, MLFLOW),
        (bare, MLFLOW),
        (MlflowException("API request to http://x/api failed with exception ConnectionError"), MLFLOW),
        (StorageInternalError("commit failed"), OPTUNA),
        (operational, OPTUNA),
        (OSError(errno.ENOSPC, "No space left on device", "/elsewhere/x"), "output folder"),
        (PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "trials" / "x")), "output folder"),
    ]
    for error, store in cases:
        fault = store_fault(error, cfg)
        assert fault is not None and fault.store == store, error
    for error in (
        RuntimeError("non-finite training loss"),
        PermissionError(errno.EACCES, "Permission denied", "/usr/share/datasets/x"),
        MlflowException("Changing param values is not allowed"),
    ):
        assert store_fault(error, cfg) is None, error
    nested = RuntimeError("trial failed")
    nested.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert store_fault(nested, cfg).store == "output folder"


def test_client_env_bounds_mlflow_retries_and_respects_the_user(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    assert client_env()["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    assert client_env()["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"


def test_passwords_are_masked_in_messages():
    assert masked("postgresql+psycopg://u:secret@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"
    assert masked("sqlite:////a/b.db") == "sqlite:////a/b.db"
