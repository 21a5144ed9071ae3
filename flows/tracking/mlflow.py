"""MLflow bookkeeping for the nightly flow: batch runs, metrics, checkpoints and the champion alias.

Every call goes through one ``MlflowClient`` bound to an explicit tracking URI (and the same URI as
registry), so nothing here changes MLflow's process-wide tracking URI. ``mlflow`` and ``matplotlib``
are imported lazily: importing this module (e.g. for :func:`resolve_tracking_uri`) stays cheap.

Checkpoints are logged as plain artifacts (safetensors + JSON, never pickles) and registered as
model versions whose source is the run's ``checkpoint/`` artifact folder. A registry lost with its
store (a deleted ``mlflow.db``) is rebuilt from the ledger's checkpoint folders: see
:meth:`Tracker.rebuild_registry`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "nightly-refresh"
CHAMPION_ALIAS = "champion"
VERSION_LABEL_TAG = "version_label"
CHECKPOINT_ARTIFACT_PATH = "checkpoint"
REGISTERED_MODEL_PREFIX = "nas-"
# What the night registers from a checkpoint folder (the editor state stays with the checkpoint).
REGISTRY_FILES = ("deltas.safetensors", "manifest.json")
REBUILT_TAG = "rebuilt_from_ledger"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Seconds the HTTP health probe waits; MLflow's own client retries for minutes (7 retries, 120 s
# timeout), which would turn a dead server into a hung nightly run.
PROBE_TIMEOUT_S = 5

# Mirrors of mlflow.utils.validation (tests check they still agree); kept here so the module can
# truncate and chunk without importing MLflow's internals.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_ENTITY_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
TRUNCATION_MARKER = "...[truncated]"

# The portable subset of MLflow's key charset (MLflow also allows ':' except on Windows, and '\w'
# there matches non-ASCII letters; neither is worth the surprise).
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_BAD_MODEL_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")


class TrackingError(RuntimeError):
    """The tracking store is unreachable or refused a read or write (the message names the URI)."""


@dataclass(frozen=True)
class ChampionInfo:
    """The model version that currently holds the ``champion`` alias."""

    model_name: str
    version: str
    version_label: str | None
    run_id: str | None
    source: str


@dataclass(frozen=True)
class PromotedCheckpoint:
    """One ledger ``promote`` line, as much as the registry needs (plain data: no ledger import).

    ``checkpoint`` is the version's folder; ``run_id`` and ``model_version`` are the original
    MLflow run and version number, kept as tags when a lost registry is rebuilt.
    """

    version_label: str
    checkpoint: Path
    weights_hash: str | None = None
    batch_id: str | None = None
    run_id: str | None = None
    model_version: str | None = None
    files: Mapping[str, str] | None = None  # the ledger's sha256 of every checkpoint file

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], root: Path, checkpoints: Path | None = None) -> PromotedCheckpoint:
        """Read a ledger ``promote`` dict; a relative ``checkpoint`` is taken relative to ``root`` (the repo).

        A line without ``checkpoint`` falls back to ``checkpoints / version`` (ValueError without either).
        """
        label = str(entry["version"])
        if entry.get("checkpoint"):
            folder = Path(entry["checkpoint"])
            folder = folder if folder.is_absolute() else Path(root) / folder
        elif checkpoints is not None:
            folder = Path(checkpoints) / label
        else:
            raise ValueError(f"the ledger's promote line for {label} names no checkpoint folder")

        def text(field: str) -> str | None:
            return None if entry.get(field) is None else str(entry[field])

        return cls(
            version_label=label,
            checkpoint=folder,
            weights_hash=text("weights_hash"),
            batch_id=text("batch_id"),
            run_id=text("mlflow_run_id"),
            model_version=text("model_version"),
            files=dict(entry.get("files") or {}) or None,
        )


@dataclass(frozen=True)
class RegistryRebuild:
    """What :meth:`Tracker.rebuild_registry` did; labels in ledger order.

    ``missing``: the checkpoint folder (or one of :data:`REGISTRY_FILES`) is gone; ``mismatched``: its
    manifest is unreadable or names other weights than the ledger promoted. Neither is registered.
    ``champion_version`` is the registry version holding the alias afterwards (None: no alias).
    """

    rebuilt: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    alias_moved: bool = False
    champion_version: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.rebuilt) or self.alias_moved


# --------------------------------------------------------------------------- URIs and names


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
    path = _sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.partition("?")[2]
    anchored = f"sqlite:///{(repo.resolve() / path)}"
    return f"{anchored}?{query}" if query else anchored


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite://`` URI; None for in-memory or non-SQLite URIs."""
    if not uri.lower().startswith("sqlite://"):
        return None
    rest = uri[len("sqlite://") :].partition("?")[0]
    # "sqlite://" and "sqlite:///:memory:" are in-memory; "sqlite:///x" is relative, "sqlite:////x" absolute.
    if rest in ("", "/", "/:memory:"):
        return None
    return Path(rest[1:])


def registered_model_name(model_name: str) -> str:
    """Registry name for a base model's edited checkpoints, e.g. ``smollm2-135m`` -> ``nas-smollm2-135m``.

    Characters MLflow rejects ('/' and ':' among them, e.g. in Hub ids) become '-'. Idempotent.
    """
    cleaned = _BAD_MODEL_NAME_CHARS.sub("-", model_name.strip()).strip("-.")
    if not cleaned:
        raise ValueError(f"cannot build a registered model name from {model_name!r}")
    return cleaned if cleaned.startswith(REGISTERED_MODEL_PREFIX) else f"{REGISTERED_MODEL_PREFIX}{cleaned}"


def sanitize_key(key: str) -> str:
    """Map ``key`` onto MLflow's allowed metric/param/tag keys: ``[A-Za-z0-9_\\-. /]``, a normalised path."""
    cleaned = _BAD_KEY_CHARS.sub("_", str(key))
    # MLflow rejects keys that are not already normalised relative paths ("a//b", "/a", "a/", "./a").
    parts = [p for p in cleaned.split("/") if p.strip(".") != ""]
    cleaned = "/".join(parts)
    if cleaned.startswith(".."):
        cleaned = "_" + cleaned[1:]
    return cleaned[:MAX_ENTITY_KEY_LENGTH] or "_"


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings/dataclasses into dotted keys ("nas.enabled") with string values."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        elif isinstance(value, Mapping):
            flat[name] = "{}"
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
            flat[name] = json.dumps(items, default=str)
        else:
            flat[name] = str(value)
    return flat


def _truncate(kind: str, key: str, value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    log.warning("%s %r is %d characters; truncated to MLflow's limit of %d", kind, key, len(value), limit)
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _sanitized(kind: str, items: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in items.items():
        clean = sanitize_key(key)
        if clean in out:
            raise ValueError(f"{kind} keys {key!r} and another key both map to {clean!r} once sanitised")
        if clean != key:
            log.debug("%s key %r logged as %r", kind, key, clean)
        out[clean] = value
    return out


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- store health


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
    path = _sqlite_path(uri)
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


def _store_errors() -> tuple[type[BaseException], ...]:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    # requests' errors subclass OSError; artifact repositories raise OSError too.
    return (MlflowException, SQLAlchemyError, OSError)


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


# --------------------------------------------------------------------------- the tracker


class Tracker:
    """One experiment in one tracking store, plus the model registry of that store."""

    def __init__(self, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT, artifact_root: Path | None = None):
        """Connect (failing fast if the store is unreachable) and create ``experiment`` if missing.

        ``artifact_root`` defaults to ``<folder of the SQLite db>/mlartifacts``; for other stores
        the server's default artifact root is used. An existing experiment keeps its location.
        """
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.artifact_location = self._artifact_location(tracking_uri, artifact_root)
        check_tracking_store(tracking_uri)
        from mlflow import MlflowClient

        with self._guard("open the store"):
            # registry_uri explicitly: otherwise MLFLOW_REGISTRY_URI could send versions elsewhere.
            self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.experiment_id = self._ensure_experiment()

    def __repr__(self) -> str:
        return f"Tracker({self.tracking_uri!r}, experiment={self.experiment_name!r})"

    @staticmethod
    def _artifact_location(tracking_uri: str, artifact_root: Path | None) -> str | None:
        if artifact_root is None:
            db = _sqlite_path(tracking_uri)
            if db is None:
                return None
            artifact_root = db.absolute().parent / "mlartifacts"
        # A file URI, so a later `mlflow server` reads the artifacts in place instead of looking
        # for them under its own (cwd-relative) default root.
        return Path(artifact_root).resolve().as_uri()

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except TrackingError:
            raise
        except _store_errors() as exc:
            raise TrackingError(f"MLflow store {self.tracking_uri} could not {action}: {exc}") from exc

    def _ensure_experiment(self) -> str:
        with self._guard(f"get or create experiment {self.experiment_name!r}"):
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    return self.client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
                except _store_errors() as exc:
                    # Another process created it between our lookup and create.
                    if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                        raise
                exp = self.client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    raise TrackingError(
                        f"MLflow store {self.tracking_uri}: experiment {self.experiment_name!r} vanished"
                    )
            if exp.lifecycle_stage == "deleted":
                log.warning("experiment %r was deleted; restoring it", self.experiment_name)
                self.client.restore_experiment(exp.experiment_id)
            if self.artifact_location and exp.artifact_location != self.artifact_location:
                log.info(
                    "experiment %r keeps its artifact location %s (not %s)",
                    self.experiment_name,
                    exp.artifact_location,
                    self.artifact_location,
                )
            return exp.experiment_id

    def healthcheck(self) -> None:
        """Raise TrackingError with a clear message if the store cannot be reached right now."""
        check_tracking_store(self.tracking_uri)
        with self._guard("answer a health check"):
            self.client.search_experiments(max_results=1)

    # ------------------------------------------------------------------ runs

    def start_batch_run(self, batch_id: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        """Open a run named ``batch_id`` with flattened, stringified params; return its run id."""
        run_tags = {"batch_id": batch_id, **(tags or {})}
        with self._guard(f"create a run for batch {batch_id!r}"):
            run = self.client.create_run(self.experiment_id, run_name=batch_id, tags=self._clean_tags(run_tags))
        run_id = run.info.run_id
        try:
            self.log_params(run_id, params)
        except BaseException:
            # Leave no RUNNING zombie behind when the params were refused.
            self._terminate_quietly(run_id)
            raise
        log.info("MLflow run %s started for batch %s", run_id, batch_id)
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log (nested) params: keys flattened and sanitised, values stringified and truncated."""
        from mlflow.entities import Param

        flat = _sanitized("param", flatten_params(params))
        entries = [Param(k, _truncate("param", k, v, MAX_PARAM_VAL_LENGTH)) for k, v in flat.items()]
        with self._guard(f"log params to run {run_id}"):
            for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(run_id, params=chunk)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics in batches. NaN and inf are logged as-is: they are collapse signals.

        (The SQL stores keep NaN but read +/-inf back as +/-1.8e308.)
        """
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in _sanitized("metric", metrics).items():
            number = _as_float(key, value)
            if not math.isfinite(number):
                log.warning("metric %r is %s (logged as-is)", key, number)
            entries.append(Metric(key, number, timestamp, int(step or 0)))
        self._log_metric_entries(run_id, entries)

    def log_series(self, run_id: str, key: str, values: Sequence[tuple[int, float]]) -> None:
        """Log a metric history, one point per ``(step, value)`` (e.g. step = edits so far)."""
        from mlflow.entities import Metric

        clean = sanitize_key(key)
        timestamp = int(time.time() * 1000)
        entries = [Metric(clean, _as_float(clean, value), timestamp, int(step)) for step, value in values]
        self._log_metric_entries(run_id, entries)

    def _log_metric_entries(self, run_id: str, entries: list[Any]) -> None:
        with self._guard(f"log metrics to run {run_id}"):
            for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=chunk)

    def tag_run(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set run tags (keys sanitised, values stringified and truncated)."""
        from mlflow.entities import RunTag

        entries = [RunTag(k, v) for k, v in self._clean_tags(tags).items()]
        with self._guard(f"tag run {run_id}"):
            for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(run_id, tags=chunk)

    @staticmethod
    def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
        return {k: _truncate("tag", k, str(v), MAX_TAG_VAL_LENGTH) for k, v in _sanitized("tag", tags).items()}

    def mark_rejected(self, run_id: str, failed_checks: Sequence[str]) -> None:
        """Tag the run ``verdict=rejected``, ``failed_checks=a,b`` and ``failed.<check>=true`` per check."""
        tags = {"verdict": "rejected", "failed_checks": ",".join(failed_checks)}
        tags.update({f"failed.{sanitize_key(name).replace('/', '_')}": "true" for name in failed_checks})
        self.tag_run(run_id, tags)

    def finish_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (FINISHED, FAILED or KILLED)."""
        status = status.upper()
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, not {status!r}")
        with self._guard(f"finish run {run_id}"):
            self.client.set_terminated(run_id, status=status)

    def close_orphaned_runs(self, reason: str) -> list[str]:
        """Mark every RUNNING run of the experiment KILLED, tagged ``orphaned=<reason>``.

        Only safe while no other writer can have a run open (the nightly flow calls it under
        the refresh lock): a RUNNING run then belongs to a night whose process died.
        Returns the closed run ids.
        """
        from mlflow.entities import ViewType

        with self._guard("list running runs"):
            runs = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                           run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        closed = []
        for run in runs:
            with self._guard(f"close orphaned run {run.info.run_id}"):
                self.client.set_tag(run.info.run_id, "orphaned", reason[:MAX_TAG_VAL_LENGTH])
                self.client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
        return closed

    def _terminate_quietly(self, run_id: str) -> None:
        try:
            self.client.set_terminated(run_id, status="FAILED")
        except _store_errors():
            log.warning("could not mark run %s as FAILED", run_id, exc_info=True)

    # ------------------------------------------------------------------ artifacts

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file (or a folder's contents) into the run's artifacts."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"cannot log {path} to run {run_id}: no such file")
        with self._guard(f"store artifact {path.name} for run {run_id}"):
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, data: Mapping[str, Any], artifact_file: str) -> None:
        """Store ``data`` as a JSON (or YAML, by extension) artifact; non-JSON values are stringified."""
        plain = json.loads(json.dumps(data, default=str))
        with self._guard(f"store artifact {artifact_file} for run {run_id}"):
            self.client.log_dict(run_id, plain, artifact_file)

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Paths of the run's artifacts directly under ``path``."""
        with self._guard(f"list artifacts of run {run_id}"):
            return [f.path for f in self.client.list_artifacts(run_id, path)]

    # ------------------------------------------------------------------ registry

    def register_checkpoint(
        self,
        model_name: str,
        run_id: str,
        checkpoint_dir: Path,
        version_label: str,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Log a checkpoint folder under ``checkpoint/`` in the run and register it as a model version.

        ``model_name`` is the registered model's name (see :func:`registered_model_name`). The
        version's source is the run's artifact URI for ``checkpoint/``; it carries the tag
        ``version_label`` (e.g. "v0003") plus ``tags``. Registering the same run and label again
        returns the existing version. Returns the MLflow version number as a string.
        """
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise FileNotFoundError(f"checkpoint folder {checkpoint_dir} does not exist")
        if not any(p.is_file() for p in checkpoint_dir.iterdir()):
            raise ValueError(f"checkpoint folder {checkpoint_dir} holds no files")
        labelled = self._versions_with_label(model_name, version_label)
        for existing in labelled:
            if existing.run_id == run_id:
                log.info("%s %s is already version %s", model_name, version_label, existing.version)
                return str(existing.version)
        if labelled:
            log.warning("%s already has a version labelled %s; registering another", model_name, version_label)

        version_tags = {**{str(k): str(v) for k, v in (tags or {}).items()}, VERSION_LABEL_TAG: version_label}
        version_tags = {k: str(v) for k, v in _sanitized("model version tag", version_tags).items()}
        with self._guard(f"register checkpoint {checkpoint_dir} as {model_name}"):
            self.client.log_artifacts(run_id, str(checkpoint_dir), CHECKPOINT_ARTIFACT_PATH)
            artifact_uri = self.client.get_run(run_id).info.artifact_uri.rstrip("/")
            self._ensure_registered_model(model_name, _base_model(checkpoint_dir) or model_name)
            # A plain artifact URI is a valid source: the SQL registry stores it verbatim, and a
            # tracking server accepts it because it lies inside the artifact folder of run_id.
            # No MLflow "logged model" (mlflow.pytorch.log_model would pickle) is involved.
            version = self.client.create_model_version(
                model_name,
                source=f"{artifact_uri}/{CHECKPOINT_ARTIFACT_PATH}",
                run_id=run_id,
                tags=version_tags,
                description=f"{version_label}: NAS-edited checkpoint from run {run_id}",
            )
        self.tag_run(run_id, {"registered_model": model_name, "model_version": str(version.version)})
        log.info("registered %s version %s (%s)", model_name, version.version, version_label)
        return str(version.version)

    def _ensure_registered_model(self, model_name: str, base_model: str) -> None:
        try:
            self.client.get_registered_model(model_name)
            return
        except _store_errors() as exc:
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            self.client.create_registered_model(
                model_name,
                tags={"base_model": base_model},
                description=f"{base_model} + cumulative NAS edit deltas",
            )
        except _store_errors() as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":  # created concurrently
                raise

    def set_champion(self, model_name: str, version: str) -> None:
        """Point the ``champion`` alias of ``model_name`` at ``version``."""
        with self._guard(f"set the champion of {model_name} to version {version}"):
            self.client.set_registered_model_alias(model_name, CHAMPION_ALIAS, str(version))

    def champion(self, model_name: str) -> ChampionInfo | None:
        """The version holding the ``champion`` alias, or None (no such model or no alias yet)."""
        with self._guard(f"look up the champion of {model_name}"):
            try:
                mv = self.client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
            except _store_errors() as exc:
                # No such model: RESOURCE_DOES_NOT_EXIST. Model without the alias: the SQL registry
                # says INVALID_PARAMETER_VALUE "... alias champion not found", so match the text.
                code = _error_code(exc)
                if code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc)):
                    return None
                raise
        return ChampionInfo(
            model_name=model_name,
            version=str(mv.version),
            version_label=(mv.tags or {}).get(VERSION_LABEL_TAG),
            run_id=mv.run_id or None,
            source=mv.source,
        )

    def unregistered_labels(self, model_name: str, labels: Sequence[str]) -> list[str]:
        """The ``labels`` (in order, each once) that no version of ``model_name`` carries."""
        present = {(v.tags or {}).get(VERSION_LABEL_TAG) for v in self._model_versions(model_name)}
        return [label for label in dict.fromkeys(labels) if label not in present]

    def registry_lost(self, model_name: str, labels: Sequence[str]) -> bool:
        """True when the ledger promoted ``labels`` (not empty) but the registry holds none of them.

        That is what a deleted ``mlflow.db`` looks like: MLflow silently recreates an empty store.
        """
        wanted = list(dict.fromkeys(labels))
        return bool(wanted) and len(self.unregistered_labels(model_name, wanted)) == len(wanted)

    def rebuild_registry(
        self, model_name: str, promotions: Sequence[PromotedCheckpoint], champion_label: str | None
    ) -> RegistryRebuild:
        """Re-register the ledger's promoted versions the registry lacks, then point ``champion`` at the ledger's.

        In ledger order, each missing version gets a new FINISHED run tagged ``rebuilt_from_ledger=true``
        and ``original_run_id`` (the night's run went with the old store), and is registered from its
        checkpoint folder's :data:`REGISTRY_FILES` with the night's labels and tags. Unusable folders
        are skipped and reported. Idempotent: once nothing is missing, a call changes nothing.
        """
        todo = set(self.unregistered_labels(model_name, [p.version_label for p in promotions]))
        rebuilt: list[str] = []
        missing: list[str] = []
        mismatched: list[str] = []
        for promo in promotions:
            if promo.version_label not in todo:
                continue
            todo.discard(promo.version_label)  # a label listed twice is handled once
            problem = _checkpoint_problem(promo)
            if problem is not None:
                (missing if problem == "missing" else mismatched).append(promo.version_label)
                continue
            version = self._reregister(model_name, promo)
            log.warning(
                "%s %s re-registered from %s as version %s (rebuilt from the ledger)",
                model_name,
                promo.version_label,
                promo.checkpoint,
                version,
            )
            rebuilt.append(promo.version_label)
        moved, champion_version = self._point_champion(model_name, champion_label)
        return RegistryRebuild(tuple(rebuilt), tuple(missing), tuple(mismatched), moved, champion_version)

    def _reregister(self, model_name: str, promo: PromotedCheckpoint) -> str:
        label = promo.version_label
        run_tags = {"original_run_id": promo.run_id, "original_model_version": promo.model_version}
        version_tags = {"batch_id": promo.batch_id, "weights_hash": promo.weights_hash}
        run_tags = {REBUILT_TAG: "true", "version": label, **_known(run_tags)}
        version_tags = {REBUILT_TAG: "true", **_known(version_tags)}
        run_id = self.start_batch_run(promo.batch_id or label, {}, tags=run_tags)
        try:
            with tempfile.TemporaryDirectory() as staging:
                for name in REGISTRY_FILES:
                    shutil.copy2(promo.checkpoint / name, Path(staging) / name)
                version = self.register_checkpoint(model_name, run_id, Path(staging), label, version_tags)
            with self._guard(f"describe {model_name} version {version}"):
                self.client.update_model_version(
                    model_name,
                    version,
                    description=f"{label}: NAS-edited checkpoint rebuilt from the ledger "
                    f"(original run {promo.run_id or 'unknown'}, lost with the old store)",
                )
        except BaseException:
            self._terminate_quietly(run_id)
            raise
        self.tag_run(run_id, {"verdict": "promoted"})
        self.finish_run(run_id)
        return version

    def _point_champion(self, model_name: str, champion_label: str | None) -> tuple[bool, str | None]:
        current = self.champion(model_name)
        held = current.version if current else None
        if champion_label is None:  # the ledger's champion is the base model: nothing to point at
            return False, held
        target = self.version_for_label(model_name, champion_label)
        if target is None:
            log.warning(
                "%s: the ledger's champion %s is not in the registry; alias %r left at %s",
                model_name,
                champion_label,
                CHAMPION_ALIAS,
                held or "nothing",
            )
            return False, held
        if held == target:
            return False, target
        self.set_champion(model_name, target)
        log.warning(
            "%s: alias %r re-pointed at version %s (%s, the ledger's champion)",
            model_name,
            CHAMPION_ALIAS,
            target,
            champion_label,
        )
        return True, target

    def version_for_label(self, model_name: str, version_label: str) -> str | None:
        """The newest version of ``model_name`` tagged ``version_label``, or None."""
        versions = self._versions_with_label(model_name, version_label)
        return str(max(int(v.version) for v in versions)) if versions else None

    def _versions_with_label(self, model_name: str, version_label: str) -> list[ModelVersion]:
        return [v for v in self._model_versions(model_name) if (v.tags or {}).get(VERSION_LABEL_TAG) == version_label]

    def _model_versions(self, model_name: str) -> list[ModelVersion]:
        if "'" in model_name:
            raise ValueError(f"registered model names must not contain quotes: {model_name!r}")
        found: list[ModelVersion] = []
        token = None
        with self._guard(f"list versions of {model_name}"):
            # Filtered in Python: one version per night stays small, and tag filters differ by backend.
            while True:
                page = self.client.search_model_versions(f"name = '{model_name}'", page_token=token)
                found.extend(page)
                token = page.token
                if not token:
                    return found


def _as_float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {key!r} must be a number, got {value!r}") from exc


def _known(tags: Mapping[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if v is not None}


def _checkpoint_problem(promo: PromotedCheckpoint) -> str | None:
    """None when ``promo.checkpoint`` can be registered; else "missing" or "mismatched" (logged)."""
    absent = [name for name in REGISTRY_FILES if not (promo.checkpoint / name).is_file()]
    if absent:
        log.warning("cannot re-register %s: %s lacks %s", promo.version_label, promo.checkpoint, ", ".join(absent))
        return "missing"
    try:
        from flows.engine.checkpoints import verify_checkpoint

        recorded = verify_checkpoint(promo.checkpoint, promo.files).get("weights_hash")
    except (OSError, ValueError, AttributeError) as exc:  # CheckpointTampered is a ValueError
        log.warning("cannot re-register %s: unreadable manifest in %s (%s)", promo.version_label, promo.checkpoint, exc)
        return "mismatched"
    if promo.weights_hash is not None and recorded != promo.weights_hash:
        log.warning(
            "cannot re-register %s: %s holds weights %s, the ledger promoted %s",
            promo.version_label,
            promo.checkpoint,
            str(recorded)[:12],
            promo.weights_hash[:12],
        )
        return "mismatched"
    return None


def _base_model(checkpoint_dir: Path) -> str | None:
    manifest = checkpoint_dir / "manifest.json"
    try:
        model = json.loads(manifest.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return str(model) if model else None


# --------------------------------------------------------------------------- plots


def norm_plot(history: Mapping[str, Sequence[tuple[int, float]]], out_png: Path, title: str, ylabel: str) -> Path:
    """Plot one line per key (e.g. "layer 3") against edits so far and write ``out_png`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_png = Path(out_png)
    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch and no figure leaks.
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for key, points in history.items():
        if not points:
            continue
        steps, values = zip(*sorted(points, key=lambda p: p[0]), strict=True)
        # NaN/inf (a collapsed edit) would wreck autoscaling; they show up as gaps instead.
        ys = [v if math.isfinite(v) else math.nan for v in map(float, values)]
        hidden = sum(1 for v in ys if math.isnan(v))
        label = f"{key} ({hidden} non-finite hidden)" if hidden else str(key)
        ax.plot(steps, ys, marker="o" if len(steps) <= 40 else None, markersize=3, label=label)
        plotted += 1
    if plotted:
        ax.legend(fontsize="small", loc="best")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("edits so far")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()

    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.name}.", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_png
