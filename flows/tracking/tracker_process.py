"""The night's :class:`Tracker` in a child process, so the night's process never imports MLflow.

MLflow, its SQL store and what they pull in (SQLAlchemy, Alembic, pandas, pyarrow, protobuf,
matplotlib for the norm plot) hold about 120 MB of a process's resident memory from the first
call on (docs/integrity.md), all of it under the night's peak when held in-process. Here one
spawned child (:class:`flows.child.SpawnedChild`) opens the store once and runs every call of
:class:`Tracker` on it; arguments, results and errors cross as pickles, and what the child logs
comes back and is logged here under the same logger names. A child that died is replaced (a
new client on the same store, which is the state).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from flows.child import SpawnedChild
from flows.tracking import names
from flows.tracking.store import TrackingError
from flows.tracking.tracker import Tracker

_Key = tuple[str, str, "Path | None"]
_CHILD_TRACKERS: dict[_Key, Tracker] = {}  # in the child only: one open Tracker per store


class _Collect(logging.Handler):
    """Keeps the child's log records of one call, flattened so they pickle."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        self.records.append(record)


def _in_child(key: _Key, level: int, method: str | None, args: tuple, kwargs: dict) -> tuple[str, Any, list]:
    """The child's side of one call: ``("ok", result, records)`` or ``("error", exc, records)``.

    ``method`` None opens the store and returns its experiment id and artifact location."""
    collect = _Collect()
    logger = logging.getLogger("flows")
    logger.addHandler(collect)
    logger.setLevel(level)
    try:
        tracker = _CHILD_TRACKERS.get(key)
        if tracker is None:
            tracker = _CHILD_TRACKERS[key] = Tracker(*key)
        result = (tracker.experiment_id, tracker.artifact_location) if method is None else \
            getattr(tracker, method)(*args, **kwargs)
        return "ok", result, collect.records
    except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
        return "error", _picklable(exc), collect.records
    finally:
        logger.removeHandler(collect)


def _picklable(exc: Exception) -> Exception:
    """``exc`` itself when its class is Python's or this project's, else a TrackingError naming it.

    Unpickling an error of another library's class (MlflowException, SQLAlchemy's) would import
    that library into the night's process, which is what the child exists to avoid; such an
    error, or one whose arguments would not pickle, comes back as its type name and message."""
    module = type(exc).__module__
    rebuilt_from_args = module == "builtins" or (
        (module == "flows" or module.startswith("flows.")) and "__init__" not in vars(type(exc)))
    plain_args = all(isinstance(a, str | int | float | bool | None) for a in exc.args)
    if rebuilt_from_args and plain_args:
        return exc
    return TrackingError(f"{type(exc).__name__}: {exc}")


class TrackerProcess:
    """:class:`Tracker`'s methods, each run by one Tracker in a spawned child.

    Opening connects at once (an unreachable store fails here, as :class:`Tracker` does);
    :meth:`close` (or leaving a ``with`` block) stops the child."""

    def __init__(self, tracking_uri: str, experiment: str = names.DEFAULT_EXPERIMENT,
                 artifact_root: Path | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self._key: _Key = (tracking_uri, experiment, artifact_root)
        self._child = SpawnedChild()
        try:
            self.experiment_id, self.artifact_location = self._call(None)
        except BaseException:
            self._child.close()
            raise

    def __repr__(self) -> str:
        return f"TrackerProcess({self.tracking_uri!r}, experiment={self.experiment_name!r})"

    def __getattr__(self, name: str) -> Any:
        method = getattr(Tracker, name, None)
        if name.startswith("_") or not callable(method):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return functools.wraps(method)(functools.partial(self._call, name))

    def _call(self, method: str | None, *args: Any, **kwargs: Any) -> Any:
        level = logging.getLogger("flows.tracking").getEffectiveLevel()
        status, value, records = self._child.call(_in_child, self._key, level, method, args, kwargs)
        for record in records:
            logging.getLogger(record.name).handle(record)
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the child (its memory is returned); a later call starts a new one."""
        self._child.close()

    def __enter__(self) -> TrackerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


AnyTracker = Tracker | TrackerProcess

__all__ = ["AnyTracker", "TrackerProcess"]
