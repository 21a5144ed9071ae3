"""Is the MLflow store usable? Fail fast, with the URI in the message, before a night writes to it.

MLflow's own client would create a missing SQLite folder (an empty registry under a mistyped
path) or retry a dead server for minutes; the checks here refuse both at once.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

from flows.tracking.uris import sqlite_path

log = logging.getLogger(__name__)

# Seconds the HTTP health probe waits; MLflow's own client retries for minutes (7 retries, 120 s
# timeout), which would turn a dead server into a hung nightly run.
PROBE_TIMEOUT_S = 5


class TrackingError(RuntimeError):
    """The tracking store is unreachable or refused a read or write (the message names the URI)."""


def check_tracking_store(tracking_uri: str) -> None:
    """Fail fast (TrackingError) when the store at ``tracking_uri`` obviously cannot be used.

    SQLite: the database's folder must already exist and be writable; MLflow would otherwise
    create missing folders, silently starting an empty registry under a mistyped path.
    HTTP(S): one short probe without retries. Other schemes are left to the first real call.
    """
    scheme = urlsplit(tracking_uri).scheme.lower()
    if scheme == "sqlite":
        _check_sqlite(tracking_uri)
    elif scheme in ("http", "https"):
        _probe_http(tracking_uri)
    elif scheme in ("", "file"):
        log.warning("tracking URI %s is a file store, which MLflow 3 deprecates; prefer sqlite:///", tracking_uri)


def _check_sqlite(uri: str) -> None:
    path = sqlite_path(uri)
    if path is None:
        log.warning("tracking URI %s is an in-memory SQLite store: nothing will persist", uri)
        return
    path = path.absolute()
    folder = path.parent
    if not folder.is_dir():
        raise TrackingError(
            f"MLflow store {uri} is unreachable: folder {folder} does not exist or is not a folder "
            "(create it, or point MLFLOW_TRACKING_URI / params.yaml at the right database)"
        )
    if path.exists():
        if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
            raise TrackingError(f"MLflow store {uri} is unusable: {path} is not a readable, writable file")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingError(f"MLflow store {uri} cannot be created: folder {folder} is not writable")


def _probe_http(uri: str) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        # A GET search is cheap, read-only and answered 200 by every MLflow server; host creds
        # carry MLFLOW_TRACKING_TOKEN/USERNAME/PASSWORD like the real client would.
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            max_retries=0,
            timeout=PROBE_TIMEOUT_S,
            raise_on_status=False,
            params={"max_results": 1},
        )
    except Exception as exc:  # connection refused, DNS, TLS, timeout: all mean "unreachable"
        raise TrackingError(f"MLflow tracking server {uri} is unreachable: {exc}") from exc
    if response.status_code in (401, 403):
        raise TrackingError(f"MLflow tracking server {uri} refused the credentials (HTTP {response.status_code})")
    if response.status_code != 200:
        raise TrackingError(
            f"MLflow tracking server {uri} answered HTTP {response.status_code} to a health probe; "
            "is this an MLflow tracking server?"
        )


def store_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a store raises when it cannot read or write (imported only when needed)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    # requests' errors subclass OSError; artifact repositories raise OSError too.
    return (MlflowException, SQLAlchemyError, OSError)


def error_code(exc: BaseException) -> str | None:
    """MLflow's error code of ``exc`` (e.g. ``RESOURCE_DOES_NOT_EXIST``), None for other errors."""
    return getattr(exc, "error_code", None)
