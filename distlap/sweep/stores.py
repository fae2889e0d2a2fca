"""The stores a sweep writes to -- MLflow, the Optuna database, the output folder -- checked before Ray
starts, and a store's failure during the sweep recognised and named.

:func:`check_stores` runs before anything is written: each store reachable and writable within seconds
(a probe table created and rolled back; nothing is created where nothing exists yet), SQLite never on a
network file system (its locking is not reliable there: use PostgreSQL), the output folder writable with
room for the sweep. :func:`store_fault` turns an exception raised mid-sweep into a :class:`StoreError`
that names the store, or None when no store is at fault. :func:`client_env` bounds MLflow's HTTP
retries (its default retries a dead server for minutes) for the driver and every Ray worker.
"""

from __future__ import annotations

import base64
import errno
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from distlap.sweep.settings import SweepConfig, sqlite_path

MLFLOW, OPTUNA, FOLDER = "MLflow", "Optuna", "output folder"
CONNECT_TIMEOUT_S = 5
# A dead MLflow server fails a request in ~10 s (2 retries, 1-2 s apart, 5 s timeout) instead of ~4 min.
_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "lustre", "gpfs")
_RESERVE_BYTES, _PER_TRIAL_BYTES = 100 * 2**20, 20 * 2**20


class StoreError(RuntimeError):
    """A store that cannot be used: ``store`` names it, ``where`` is its URI or path."""

    def __init__(self, store: str, where: str, problem: str):
        self.store, self.where, self.problem = store, where, problem
        super().__init__(f"the {store} store ({where}) failed: {problem}")


def client_env() -> dict[str, str]:
    """MLflow client settings for the driver and the Ray workers (a user's own values win)."""
    return {key: os.environ.get(key, value) for key, value in _CLIENT_ENV.items()}


# --- checks before the sweep ---------------------------------------------------------------------


def check_stores(cfg: SweepConfig, resume: bool) -> None:
    """Every store reachable and writable; raise :class:`StoreError` naming the first that is not."""
    need = 0 if resume else _RESERVE_BYTES + _PER_TRIAL_BYTES * cfg.search.num_samples
    check_folder(cfg.out, need)
    check_sql(OPTUNA, cfg.search.storage)
    if cfg.tracking.uri.startswith(("http://", "https://")):
        check_mlflow_server(cfg.tracking.uri)
    else:
        check_sql(MLFLOW, cfg.tracking.uri)


def check_folder(out: Path, need_bytes: int) -> None:
    """``out`` (or, before it exists, the folder it will be made in) is writable and has room."""
    existing = _existing(out)
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".distlap-probe-"):
            pass
    except OSError as err:
        raise StoreError(FOLDER, str(out), f"{existing} is not writable ({err.strerror})") from None
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise StoreError(
            FOLDER,
            str(out),
            f"{free / 2**20:.0f} MiB free, the sweep needs about {need_bytes / 2**20:.0f} MiB "
            "(checkpoints, results, the stores); free some space or choose another --output",
        )


def check_sql(store: str, url: str) -> None:
    """A SQLAlchemy database answers within seconds and lets us create a table (rolled back)."""
    path = sqlite_path(url)
    if path is not None:
        _check_sqlite_file(store, url, path)
        if not path.exists():
            return  # made by the sweep; its folder was checked
    try:
        _probe_table(url)
    except Exception as err:  # noqa: BLE001 - drivers raise their own types; the message names it
        raise StoreError(store, masked(url), _first_line(err)) from None


def _check_sqlite_file(store: str, url: str, path: Path) -> None:
    fs = filesystem_type(path)
    if fs in _NETWORK_FS:
        raise StoreError(
            store,
            url,
            f"the SQLite file is on a {fs} file system, where SQLite's locking is not reliable; "
            "use a PostgreSQL URI (README, 'On a cluster')",
        )
    if not path.exists():
        return
    if not path.is_file():
        raise StoreError(store, url, f"{path} is not a file")


def _probe_table(url: str) -> None:
    import sqlalchemy

    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
    if url.startswith("sqlite"):
        connect_args = {"timeout": CONNECT_TIMEOUT_S}
    engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    table = f"distlap_probe_{uuid.uuid4().hex[:12]}"
    try:
        with engine.connect() as conn:
            if url.startswith("sqlite"):  # pysqlite only begins before DML; make the DDL transactional
                conn.exec_driver_sql("BEGIN")
            else:
                conn.begin()
            conn.exec_driver_sql(f"CREATE TABLE {table} (x INTEGER)")
            conn.rollback()
    finally:
        engine.dispose()


def check_mlflow_server(uri: str) -> None:
    """An MLflow tracking server answers ``/health`` and accepts our credentials, within seconds."""
    base = uri.rstrip("/")
    try:
        _get(f"{base}/health")
        _get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
    except urllib.error.HTTPError as err:
        hint = (
            "; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            if err.code in (401, 403)
            else ""
        )
        raise StoreError(MLFLOW, masked(uri), f"HTTP {err.code} {err.reason}{hint}") from None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise StoreError(
            MLFLOW, masked(uri), f"no answer within {CONNECT_TIMEOUT_S} s ({reason}); is the server up?"
        ) from None


def _get(url: str) -> None:
    request = urllib.request.Request(url)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user and password:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S) as response:
        response.read(1)


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the file system holding ``path`` (longest mount point of /proc/mounts above it)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    target, best, kind = str(_existing(path)), -1, ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), fields[2]
    return kind


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def masked(url: str) -> str:
    """A URL with any password masked (messages are printed and logged)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- faults during the sweep ---------------------------------------------------------------------


def store_fault(exc: BaseException, cfg: SweepConfig) -> StoreError | None:
    """The store at fault in ``exc`` (raised by the driver, Ray Tune or a trial), or None."""
    for err in _chain(exc):
        if isinstance(err, StoreError):
            return err
        if isinstance(err, OSError) and _disk_fault(err, cfg.out):
            return StoreError(FOLDER, str(cfg.out), f"{err.strerror} ({err.filename or cfg.out})")
        store = _store_of(err)
        if store is not None:
            uri = cfg.tracking.uri if store == MLFLOW else cfg.search.storage
            return StoreError(store, masked(uri), _first_line(err))
    return None


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)  # a full, read-only or failing disk


def _disk_fault(err: OSError, out: Path) -> bool:
    """A full, read-only or failing disk anywhere; a permission error only inside the output folder."""
    if err.errno in DISK_ERRNOS:
        return True
    inside = err.filename is not None and str(err.filename).startswith(str(out))
    return err.errno in (errno.EACCES, errno.EPERM) and inside


def _store_of(err: BaseException) -> str | None:
    module, name = type(err).__module__ or "", type(err).__name__
    if module.startswith("mlflow"):
        server = name == "RestException"  # an answer of the tracking server; 5xx: it is failing
        status = err.get_http_status_code() if server and hasattr(err, "get_http_status_code") else 0
        unavailable = getattr(err, "error_code", "") == "TEMPORARILY_UNAVAILABLE" or status >= 500
        database = type(err.__cause__).__module__.startswith("sqlalchemy")  # MLflow's own database
        return MLFLOW if unavailable or database or str(err).startswith("API request to") else None
    if module.startswith("optuna") and name == "StorageInternalError":
        return OPTUNA
    if module.startswith("sqlalchemy") and name in ("OperationalError", "InterfaceError"):
        return OPTUNA  # MLflow wraps its own database errors; a bare one comes from Optuna's storage
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the errors it was raised from or during, and a Ray task error's cause."""
    seen, todo = set(), [exc]
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        todo += [getattr(err, "cause", None), err.__cause__, err.__context__]
