"""The MLflow adapter of the nightly flow: one experiment of one store, and that store's registry.

Every call goes through one ``MlflowClient`` bound to an explicit tracking URI (and the same URI as
registry), so nothing here changes MLflow's process-wide tracking URI; ``mlflow`` is imported
lazily. Checkpoints are logged as plain artifacts (safetensors + JSON, never pickles) and
registered as model versions whose source is the run's ``checkpoint/`` artifact folder.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.tracking import names, rebuild
from flows.tracking.names import as_float, chunks, flatten_params, sanitize_key, sanitized, truncate
from flows.tracking.plots import norm_plot
from flows.tracking.store import TrackingError, check_tracking_store, error_code, store_errors
from flows.tracking.uris import artifact_location

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChampionInfo:
    """The model version that currently holds the ``champion`` alias."""

    model_name: str
    version: str
    version_label: str | None
    run_id: str | None
    source: str


class Tracker:
    """One experiment in one tracking store, plus the model registry of that store."""

    def __init__(self, tracking_uri: str, experiment: str = names.DEFAULT_EXPERIMENT,
                 artifact_root: Path | None = None):
        """Connect (failing fast if the store is unreachable) and create ``experiment`` if missing.

        ``artifact_root`` defaults to ``<folder of the SQLite db>/mlartifacts``; for other stores
        the server's default artifact root is used. An existing experiment keeps its location.
        """
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.artifact_location = artifact_location(tracking_uri, artifact_root)
        check_tracking_store(tracking_uri)
        from mlflow import MlflowClient

        with self._guard("open the store"):
            # registry_uri explicitly: otherwise MLFLOW_REGISTRY_URI could send versions elsewhere.
            self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.experiment_id = self._ensure_experiment()

    def __repr__(self) -> str:
        return f"Tracker({self.tracking_uri!r}, experiment={self.experiment_name!r})"

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except TrackingError:
            raise
        except store_errors() as exc:
            raise TrackingError(f"MLflow store {self.tracking_uri} could not {action}: {exc}") from exc

    def _ensure_experiment(self) -> str:
        with self._guard(f"get or create experiment {self.experiment_name!r}"):
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    return self.client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
                except store_errors() as exc:
                    # Another process created it between our lookup and create.
                    if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
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
            self.abandon_run(run_id)
            raise
        log.info("MLflow run %s started for batch %s", run_id, batch_id)
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log (nested) params: keys flattened and sanitised, values stringified and truncated."""
        from mlflow.entities import Param

        flat = sanitized("param", flatten_params(params))
        entries = [Param(k, truncate("param", k, v, names.MAX_PARAM_VAL_LENGTH)) for k, v in flat.items()]
        with self._guard(f"log params to run {run_id}"):
            for chunk in chunks(entries, names.MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(run_id, params=chunk)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics in batches. NaN and inf are logged as-is: they are collapse signals.

        (The SQL stores keep NaN but read +/-inf back as +/-1.8e308.)
        """
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in sanitized("metric", metrics).items():
            number = as_float(key, value)
            if not math.isfinite(number):
                log.warning("metric %r is %s (logged as-is)", key, number)
            entries.append(Metric(key, number, timestamp, int(step or 0)))
        self._log_metric_entries(run_id, entries)

    def log_series(self, run_id: str, key: str, values: Sequence[tuple[int, float]]) -> None:
        """Log a metric history, one point per ``(step, value)`` (e.g. step = edits so far)."""
        from mlflow.entities import Metric

        clean = sanitize_key(key)
        timestamp = int(time.time() * 1000)
        entries = [Metric(clean, as_float(clean, value), timestamp, int(step)) for step, value in values]
        self._log_metric_entries(run_id, entries)

    def _log_metric_entries(self, run_id: str, entries: list[Any]) -> None:
        with self._guard(f"log metrics to run {run_id}"):
            for chunk in chunks(entries, names.MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=chunk)

    def tag_run(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set run tags (keys sanitised, values stringified and truncated)."""
        from mlflow.entities import RunTag

        entries = [RunTag(k, v) for k, v in self._clean_tags(tags).items()]
        with self._guard(f"tag run {run_id}"):
            for chunk in chunks(entries, names.MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(run_id, tags=chunk)

    @staticmethod
    def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
        return {k: truncate("tag", k, str(v), names.MAX_TAG_VAL_LENGTH) for k, v in sanitized("tag", tags).items()}

    def mark_rejected(self, run_id: str, failed_checks: Sequence[str]) -> None:
        """Tag the run ``verdict=rejected``, ``failed_checks=a,b`` and ``failed.<check>=true`` per check."""
        tags = {"verdict": "rejected", "failed_checks": ",".join(failed_checks)}
        tags.update({f"failed.{sanitize_key(name).replace('/', '_')}": "true" for name in failed_checks})
        self.tag_run(run_id, tags)

    def finish_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (FINISHED, FAILED or KILLED)."""
        status = status.upper()
        if status not in names.RUN_STATUSES:
            raise ValueError(f"run status must be one of {names.RUN_STATUSES}, not {status!r}")
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
                self.client.set_tag(run.info.run_id, "orphaned", reason[:names.MAX_TAG_VAL_LENGTH])
                self.client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
        return closed

    def abandon_run(self, run_id: str) -> None:
        """Mark a run FAILED after a write into it failed; a store error here is logged, not raised."""
        try:
            self.client.set_terminated(run_id, status="FAILED")
        except store_errors():
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

    def log_norm_plot(self, run_id: str, history: Mapping[str, Sequence[tuple[int, float]]], out_png: Path,
                      title: str, ylabel: str) -> None:
        """Draw ``history`` (:func:`flows.tracking.plots.norm_plot`) to ``out_png`` and store it under ``plots/``."""
        self.log_artifact(run_id, norm_plot(history, out_png, title, ylabel), "plots")

    def log_dict(self, run_id: str, data: Mapping[str, Any], artifact_file: str) -> None:
        """Store ``data`` as a JSON (or YAML, by extension) artifact; non-JSON values are stringified."""
        plain = json.loads(json.dumps(data, default=str))
        with self._guard(f"store artifact {artifact_file} for run {run_id}"):
            self.client.log_dict(run_id, plain, artifact_file)

    def log_table(self, run_id: str, columns: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """A table artifact (column -> values, all the same length) the run page shows as a table."""
        with self._guard(f"store table {artifact_file} for run {run_id}"):
            self.client.log_table(run_id, {k: list(v) for k, v in columns.items()}, artifact_file)

    def log_batch_input(self, run_id: str, name: str, source: Path, sha256: str,
                        columns: Mapping[str, Sequence[Any]]) -> None:
        """The night's batch as the run's dataset input (the Datasets panel): its records, the file
        as source and its sha256 as digest (cut to MLflow's 36 characters; params hold all 64)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        ds = mlflow.data.from_pandas(pd.DataFrame({k: list(v) for k, v in columns.items()}), source=str(source),
                                     name=name, digest=sha256[:32])
        tags = [InputTag("mlflow.data.context", "nightly-batch")]
        with self._guard(f"log the dataset input {name} for run {run_id}"):
            self.client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=tags)])

    def describe_run(self, run_id: str, text: str) -> None:
        """The run's description (the run page's first paragraph)."""
        self.tag_run(run_id, {"mlflow.note.content": text})

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

        version_tags = {**{str(k): str(v) for k, v in (tags or {}).items()}, names.VERSION_LABEL_TAG: version_label}
        version_tags = {k: str(v) for k, v in sanitized("model version tag", version_tags).items()}
        with self._guard(f"register checkpoint {checkpoint_dir} as {model_name}"):
            self.client.log_artifacts(run_id, str(checkpoint_dir), names.CHECKPOINT_ARTIFACT_PATH)
            artifact_uri = self.client.get_run(run_id).info.artifact_uri.rstrip("/")
            self._ensure_registered_model(model_name, _base_model(checkpoint_dir) or model_name)
            # A plain artifact URI is a valid source: the SQL registry stores it verbatim, and a
            # tracking server accepts it because it lies inside the artifact folder of run_id.
            # No MLflow "logged model" (mlflow.pytorch.log_model would pickle) is involved.
            version = self.client.create_model_version(
                model_name,
                source=f"{artifact_uri}/{names.CHECKPOINT_ARTIFACT_PATH}",
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
        except store_errors() as exc:
            if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            self.client.create_registered_model(
                model_name,
                tags={"base_model": base_model},
                description=f"{base_model} + cumulative NAS edit deltas",
            )
        except store_errors() as exc:
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":  # created concurrently
                raise

    def describe_version(self, model_name: str, version: str, description: str) -> None:
        """Replace the description of ``model_name`` version ``version``."""
        with self._guard(f"describe {model_name} version {version}"):
            self.client.update_model_version(model_name, version, description=description)

    def set_champion(self, model_name: str, version: str) -> None:
        """Point the ``champion`` alias of ``model_name`` at ``version``."""
        with self._guard(f"set the champion of {model_name} to version {version}"):
            self.client.set_registered_model_alias(model_name, names.CHAMPION_ALIAS, str(version))

    def champion(self, model_name: str) -> ChampionInfo | None:
        """The version holding the ``champion`` alias, or None (no such model or no alias yet)."""
        with self._guard(f"look up the champion of {model_name}"):
            try:
                mv = self.client.get_model_version_by_alias(model_name, names.CHAMPION_ALIAS)
            except store_errors() as exc:
                # No such model: RESOURCE_DOES_NOT_EXIST. Model without the alias: the SQL registry
                # says INVALID_PARAMETER_VALUE "... alias champion not found", so match the text.
                code = error_code(exc)
                if code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc)):
                    return None
                raise
        return ChampionInfo(
            model_name=model_name,
            version=str(mv.version),
            version_label=(mv.tags or {}).get(names.VERSION_LABEL_TAG),
            run_id=mv.run_id or None,
            source=mv.source,
        )

    def unregistered_labels(self, model_name: str, labels: Sequence[str]) -> list[str]:
        """The ``labels`` (in order, each once) that no version of ``model_name`` carries."""
        present = {(v.tags or {}).get(names.VERSION_LABEL_TAG) for v in self._model_versions(model_name)}
        return [label for label in dict.fromkeys(labels) if label not in present]

    def registry_lost(self, model_name: str, labels: Sequence[str]) -> bool:
        """True when the ledger promoted ``labels`` (not empty) but the registry holds none of them.

        That is what a deleted ``mlflow.db`` looks like: MLflow silently recreates an empty store.
        """
        wanted = list(dict.fromkeys(labels))
        return bool(wanted) and len(self.unregistered_labels(model_name, wanted)) == len(wanted)

    def rebuild_registry(
        self, model_name: str, promotions: Sequence[rebuild.PromotedCheckpoint], champion_label: str | None
    ) -> rebuild.RegistryRebuild:
        """Rebuild a registry lost with its store from the ledger (:func:`flows.tracking.rebuild.rebuild_registry`)."""
        return rebuild.rebuild_registry(self, model_name, promotions, champion_label)

    def version_for_label(self, model_name: str, version_label: str) -> str | None:
        """The newest version of ``model_name`` tagged ``version_label``, or None."""
        versions = self._versions_with_label(model_name, version_label)
        return str(max(int(v.version) for v in versions)) if versions else None

    def _versions_with_label(self, model_name: str, version_label: str) -> list[ModelVersion]:
        return [v for v in self._model_versions(model_name)
                if (v.tags or {}).get(names.VERSION_LABEL_TAG) == version_label]

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


def _base_model(checkpoint_dir: Path) -> str | None:
    manifest = checkpoint_dir / "manifest.json"
    try:
        model = json.loads(manifest.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return str(model) if model else None
