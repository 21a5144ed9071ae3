"""Where the MLflow store is: the tracking URI the project uses, and the file behind a SQLite one.

``MLFLOW_TRACKING_URI`` wins over params.yaml, which wins over ``mlflow.db`` in the project root;
a relative SQLite path is anchored at the project root, never at the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_tracking_uri(repo: Path) -> str:
    """The SQLite store in the repository root, as an absolute ``sqlite:////...`` URI."""
    return f"sqlite:///{Path(repo).resolve()}/mlflow.db"


def resolve_tracking_uri(configured: str | None, repo: Path) -> str:
    """Pick the tracking URI: ``MLFLOW_TRACKING_URI`` env var > ``configured`` (params.yaml) > default.

    A relative SQLite path in ``configured`` is taken relative to ``repo`` (params.yaml lives there);
    SQLite itself would resolve it against whatever the working directory happens to be.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if configured and configured.strip():
        return _anchor_sqlite_uri(configured.strip(), Path(repo))
    return default_tracking_uri(repo)


def _anchor_sqlite_uri(uri: str, repo: Path) -> str:
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.partition("?")[2]
    anchored = f"sqlite:///{(repo.resolve() / path)}"
    return f"{anchored}?{query}" if query else anchored


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite://`` URI; None for in-memory or non-SQLite URIs."""
    if not uri.lower().startswith("sqlite://"):
        return None
    rest = uri[len("sqlite://") :].partition("?")[0]
    # "sqlite://" and "sqlite:///:memory:" are in-memory; "sqlite:///x" is relative, "sqlite:////x" absolute.
    if rest in ("", "/", "/:memory:"):
        return None
    return Path(rest[1:])


def artifact_location(tracking_uri: str, artifact_root: Path | None) -> str | None:
    """Where a new experiment keeps its artifacts: ``artifact_root``, else ``mlartifacts`` next to a
    SQLite database, as a file URI; None for other stores (the server's default root)."""
    if artifact_root is None:
        db = sqlite_path(tracking_uri)
        if db is None:
            return None
        artifact_root = db.absolute().parent / "mlartifacts"
    # A file URI, so a later `mlflow server` reads the artifacts in place instead of looking
    # for them under its own (cwd-relative) default root.
    return Path(artifact_root).resolve().as_uri()
