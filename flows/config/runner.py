"""Where independent work runs: a study's units (methods, layers) and an evaluation's scoring shards."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

RUNNERS = ("sequential", "dask")


@dataclass(frozen=True)
class RunnerSettings:
    """How independent units run (``--runner``, ``--address``, ``--workers``, ``--threads``).

    Attributes:
        kind: ``sequential`` (one unit after another in this process) or ``dask``.
        address: an existing Dask scheduler (``tcp://host:8786``); its workers need the project's
            folders (model cache, statistics) at the same paths. None: a local cluster.
        workers: processes of the local cluster (one task thread each); None: one per CPU core.
        threads: torch threads of every unit; None keeps the process's count (the sequential run:
            all cores; a Dask worker: 1). Runs with the same value compute the same bits.
    """

    kind: str = "sequential"
    address: str | None = None
    workers: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.kind!r}")
        if self.address is not None and self.workers is not None:
            raise ValueError("address and workers are mutually exclusive (a cluster at an address has its own)")
        if self.kind != "dask" and (self.address is not None or self.workers is not None):
            raise ValueError("address and workers need the dask runner")
        if (self.workers is not None and self.workers < 1) or (self.threads is not None and self.threads < 1):
            raise ValueError("workers and threads must be >= 1")

    def record(self) -> dict[str, Any]:
        """What results say about how they were computed."""
        return asdict(self)


@dataclass(frozen=True)
class ScoringParams:
    """How the edit metrics over many facts (retention) are scored (params.yaml ``scoring``).

    Attributes:
        shards: the scoring batches are cut into this many shards of about equal tokens; any count
            gives the numbers of one shard (a batch's scores depend only on the batch), at the same
            ``runner.threads``.
        runner: where the shards run: one after another here, or on a Dask cluster (each worker
            loads the base model once and receives the edited weights).
    """

    shards: int = 1
    runner: RunnerSettings = field(default_factory=RunnerSettings)

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"scoring.shards must be >= 1, got {self.shards}")


@dataclass(frozen=True)
class AnchorParams:
    """Where the NAS anchor's pilots are optimised on a first night (params.yaml ``anchor``).

    Attributes:
        runner: sequential (one pilot batch after another here), or dask: every batch of
            ``nas.pilot_batch_size`` pilots a task on the cluster, on the worker's own copy of the
            base model. A batch's v* depend only on the batch and the torch threads, so every
            runner gives the sequential anchor at the same ``runner.threads`` (another thread
            count moves single pilot norms by up to 0.3% on the bf16 path, a by about 3e-5). On
            2 cores two one-thread workers optimise pilots 13-18% faster than one two-thread process.
    """

    runner: RunnerSettings = field(default_factory=RunnerSettings)
