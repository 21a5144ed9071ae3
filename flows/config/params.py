"""params.yaml: the nightly refresh's settings, one frozen dataclass per section, strictly loaded.

Unknown keys and wrong types are errors naming the key path (``flows.config.model.build``). The
model's own editing settings (layers, lambda, NAS...) come from ``configs/MODEL.yaml``;
params.yaml picks the model and method and holds everything about the pipeline itself.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.config.model import ConfigError, ModelConfig, build, config_for, read_yaml
from flows.config.runner import AnchorParams, ScoringParams
from flows.config.validation import ValidationSettings
from flows.paths import Paths, Roots, project_root
from nas_core.collapse import CollapseSettings
from nas_core.editors import METHODS
from nas_core.settings import EvalSettings

#: What ``--device`` / ``--dtype`` set for a command's lifetime (params.yaml ``runtime`` otherwise).
ENV_DEVICE, ENV_DTYPE = "NAS_DEVICE", "NAS_DTYPE"


@dataclass(frozen=True)
class EditParams:
    """How a night's batch is edited.

    Attributes:
        method: memit, alphaedit or rome (NAS on/off comes from ``nas``).
        nas: Norm-Anchor Scaling on or off (the product's point: on).
        batch_size: requests per sequential edit call within a night's batch.
        pilots: NAS pilots for the anchor (the model config's value when 0).
        stats_tokens: covariance tokens (the model config's value when 0).
    """

    method: str = "alphaedit"
    nas: bool = True
    batch_size: int = 8
    pilots: int = 0
    stats_tokens: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"edit.method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.batch_size < 1 or self.pilots < 0 or self.stats_tokens < 0:
            raise ValueError("edit.batch_size >= 1, edit.pilots >= 0 and edit.stats_tokens >= 0 are required")


@dataclass(frozen=True)
class PromotionParams:
    """Gate thresholds on top of the collapse verdict (percent unless stated).

    Attributes:
        min_batch_efficacy: efficacy success on the new batch's edit prompts.
        min_batch_generalisation: generalisation success on the new batch's paraphrases.
        min_batch_specificity: specificity success on the new batch's neighbourhood prompts.
        min_retention_efficacy: efficacy success over every accepted edit so far.
        max_norm_growth_per_edit: largest (||W_t||/||W_0|| - 1) per edit so far: the rate at
            which a lineage would reach ``collapse.max_norm_ratio`` (1.45) within 100 edits.
            Every steady rate measured stays below it (MEMIT and MEMIT+NAS 3.0-3.7e-4 over
            1,500-2,000 edits, AlphaEdit 4.8e-4 and r-ROME 3.5e-3 over 40; docs/horizon.md), so
            it refuses a blow-up, not a trend; the trend is the forecast's job. The old 0.01
            let a lineage reach the bound in 45 edits.
        max_skipped_fraction: share of the batch NAS may skip as outliers before the batch
            is rejected (a skipped fact is not in the model).
        forecast_warn_nights: a night whose norm forecast (``nas_core.collapse.forecast``:
            edits left before ``collapse.max_norm_ratio``, the worse of a linear and an
            exponential fit, divided by the lineage's mean edits per night) falls below this
            many nights is promoted with a warning (log, MLflow tag, ledger): time to plan a
            consolidation before the gate starts refusing.
    """

    min_batch_efficacy: float = 80.0
    min_batch_generalisation: float = 40.0
    min_batch_specificity: float = 60.0
    min_retention_efficacy: float = 80.0
    max_norm_growth_per_edit: float = 0.0045
    max_skipped_fraction: float = 0.2
    forecast_warn_nights: float = 30.0

    def __post_init__(self) -> None:
        if not self.forecast_warn_nights >= 0:
            raise ValueError(f"promotion.forecast_warn_nights must be >= 0, not {self.forecast_warn_nights}")
        for f in dataclasses.fields(self):
            if f.name == "forecast_warn_nights":
                continue
            v = getattr(self, f.name)
            limit = 1.0 if f.name in ("max_norm_growth_per_edit", "max_skipped_fraction") else 100.0
            if not 0 <= v <= limit:
                raise ValueError(f"promotion.{f.name} must be in [0, {limit:g}], not {v}")


@dataclass(frozen=True)
class TrackingParams:
    """MLflow. ``uri``: tracking URI (the MLFLOW_TRACKING_URI variable wins; empty: sqlite
    ``mlflow.db`` in the repository). ``experiment``: the nightly runs' experiment.
    ``answer_tokens``: greedy tokens of each fact's answer, before and after the edit, in the
    run's per-fact table (0: no answers, only the probabilities)."""

    uri: str = ""
    experiment: str = "nightly-refresh"
    answer_tokens: int = 8

    def __post_init__(self) -> None:
        if self.answer_tokens < 0:
            raise ValueError(f"tracking.answer_tokens must be >= 0, not {self.answer_tokens}")


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RuntimeParams:
    """Where the model lives, in which dtype its weights are loaded, how its memory is kept.

    Attributes:
        device: ``auto`` (cuda when a GPU is present, else cpu), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (bfloat16 on cuda, float32 on cpu), ``float32``, ``bfloat16`` or
            ``float16``. Statistics, keys and solves stay float32/float64 whatever the weights
            are; the update is cast to the weight's dtype where it is written. A checkpoint is
            bound to the base weights it was made from, so a lineage keeps one dtype.
        heap_trim_every_s: during a batch's edit and evaluation, freed heap pages go back to
            the OS this often (glibc's ``malloc_trim``, :mod:`flows.engine.memory`); the solves
            and forwards free and reallocate blocks of many sizes, and the heap otherwise grows
            around the ones no longer used (about 100 MB of a night's peak, docs/integrity.md).
            0: only at the phases' ends. Elsewhere than glibc it does nothing.

    ``$NAS_DEVICE`` and ``$NAS_DTYPE`` (what the CLI's ``--device``/``--dtype`` set) win.
    """

    device: str = "auto"
    dtype: str = "auto"
    heap_trim_every_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.heap_trim_every_s >= 0:
            raise ValueError(f"runtime.heap_trim_every_s must be >= 0, not {self.heap_trim_every_s}")
        if self.device.split(":")[0] not in DEVICES or (":" in self.device and not self.device.startswith("cuda:")):
            raise ValueError(f"runtime.device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"runtime.dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")


@dataclass(frozen=True)
class CheckpointParams:
    """How versions are stored (flows/engine/checkpoints.py documents the format).

    Attributes:
        snapshot_every: a version whose load would replay this many increments (its own and
            its parents' back to the last snapshot) is written as a snapshot instead: D and the
            editor state, about 190 MB for SmolLM2 against 2.5 MB for a 24-edit increment
            (docs/scale.md). 1 makes every version a snapshot.
    """

    snapshot_every: int = 30

    def __post_init__(self) -> None:
        if self.snapshot_every < 1:
            raise ValueError(f"checkpoints.snapshot_every must be >= 1, not {self.snapshot_every}")


@dataclass(frozen=True)
class LockParams:
    """Who may edit a model at once (flows/refresh/lock.py). The project's file lock always holds.

    Attributes:
        prefect_slot: also hold the model's Prefect global concurrency slot for the night, so
            workers on other machines sharing the Prefect server never edit it at the same time.
        lease_s: the slot's lease; Prefect renews it while the night runs. A night that was
            killed keeps the slot until its lease lapses, so the next night may start after that.
        wait_s: how long a night waits for the slot before it reports another night and stops.
    """

    prefect_slot: bool = False
    lease_s: float = 120.0
    wait_s: float = 5.0

    def __post_init__(self) -> None:
        if self.lease_s <= 0 or self.wait_s < 0:
            raise ValueError("lock.lease_s must be > 0 and lock.wait_s >= 0")


@dataclass(frozen=True)
class SourceParams:
    """Where a night pulls new fact batches from (flows/facts/pull.py), before it reads the inbox.

    Attributes:
        name: the source's name in the ledger's ``pull`` lines.
        kind: ``files``: ``url`` is an fsspec URL prefix (``file:///srv/facts``, ``s3://bucket/facts``,
            ``ssh://host/path``...) whose files matching ``pattern`` are batches; ``datasets``: ``url``
            is what ``datasets.load_dataset`` takes (a local folder or data file; a hub id only when
            you write one), its ``split`` one batch of fact records.
        url: see ``kind``.
        pattern: which file names under a ``files`` source are batches (a glob on the name).
        split: the split of a ``datasets`` source.
        retries: further attempts at a listing or a read that failed, before the night stops.
        retry_delay_s: seconds between attempts.
    """

    name: str
    url: str
    kind: str = "files"
    pattern: str = "*.jsonl"
    split: str = "train"
    retries: int = 3
    retry_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.name or not self.url:
            raise ValueError("a source needs a name and a url")
        if self.kind not in ("files", "datasets"):
            raise ValueError(f"source {self.name}: kind must be files or datasets, not {self.kind!r}")
        if self.retries < 0 or self.retry_delay_s < 0:
            raise ValueError(f"source {self.name}: retries and retry_delay_s must be >= 0")


@dataclass(frozen=True)
class AuditParams:
    """When a rebuild that is not bit-identical still counts as the promoted model (``nas audit``).

    Attributes:
        weights_rel_tol: the largest divergence of any layer's update fingerprint
            (nas_core/fingerprint.py: ||D||_F and bilinear sketches, relative to the recorded
            ||D||_F) at any version of the lineage, and of the night's inputs (NAS anchor, the
            covariance's trace per layer).
        score_abs_tol: the largest difference, in percentage points, of any retention success
            rate or editing score of the rebuilt champion against the promotion's.
        perplexity_ratio_rel_tol: the largest relative difference of the canary perplexity ratio.
        commit_pointers: after each promotion (and rollback / promote) also commit DVC's pointer
            files (``data/*.dvc``, ``dvc.lock``) and the audit outputs to git, so that a clone of
            the project's git remote can ``dvc pull`` and ``dvc repro`` the champion; nothing is
            pushed (a scheduled ``git push`` publishes them). Off: the operator commits them.
    """

    weights_rel_tol: float = 0.01
    score_abs_tol: float = 2.0
    perplexity_ratio_rel_tol: float = 0.01
    commit_pointers: bool = False

    def __post_init__(self) -> None:
        if min(self.weights_rel_tol, self.score_abs_tol, self.perplexity_ratio_rel_tol) < 0:
            raise ValueError("audit tolerances must be >= 0")


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    model: str = "smollm2-135m"
    edit: EditParams = field(default_factory=EditParams)
    paths: Paths = field(default_factory=Paths)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    promotion: PromotionParams = field(default_factory=PromotionParams)
    eval: EvalSettings = field(default_factory=EvalSettings)
    collapse: CollapseSettings = field(default_factory=CollapseSettings)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    checkpoints: CheckpointParams = field(default_factory=CheckpointParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)
    audit: AuditParams = field(default_factory=AuditParams)
    sources: tuple[SourceParams, ...] = ()
    lock: LockParams = field(default_factory=LockParams)
    scoring: ScoringParams = field(default_factory=ScoringParams)
    anchor: AnchorParams = field(default_factory=AnchorParams)
    #: The project directory the relative ``paths`` resolve against (not a params.yaml key).
    root: Path = field(default_factory=project_root, metadata={"yaml": False})

    @property
    def roots(self) -> Roots:
        """Every folder and data file of the project, absolute."""
        return self.paths.under(self.root)

    def model_config(self) -> ModelConfig:
        """The model's config with this file's overrides (pilots, statistics tokens, eval, collapse
        with the norm bound of ``edit.method``)."""
        cfg = config_for(self.model, self.roots.configs)
        label = f"{self.edit.method}{'+nas' if self.edit.nas else ''}"
        cfg = dataclasses.replace(cfg, eval=self.eval, collapse=self.collapse.for_method(label))
        if self.edit.stats_tokens:
            cfg = dataclasses.replace(cfg, stats=dataclasses.replace(cfg.stats, tokens=self.edit.stats_tokens))
        return cfg

    def method_settings(self):
        s = self.model_config().method(self.edit.method, self.edit.nas)
        if self.edit.pilots:
            s = dataclasses.replace(s, nas=dataclasses.replace(s.nas, pilots=self.edit.pilots))
        return s


def load_params(path: Path | None = None, project: Path | None = None) -> Params:
    """Read params.yaml strictly (a missing file means all defaults); its relative paths
    resolve against ``project`` (:func:`flows.paths.project_root`), whose params.yaml is the default."""
    root = project_root(project)
    path = Path(path) if path is not None else root / "params.yaml"
    raw: Any = read_yaml(path) if path.is_file() else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        params = build(Params, raw, path.name)
        runtime = dataclasses.replace(params.runtime, device=os.environ.get(ENV_DEVICE) or params.runtime.device,
                                      dtype=os.environ.get(ENV_DTYPE) or params.runtime.dtype)
        return dataclasses.replace(params, root=root, runtime=runtime)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
