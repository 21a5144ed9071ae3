"""Where the product's files live: one project root, and every folder and data file under it.

The project root is ``--project DIR``, else ``$NAS_PROJECT``, else the working directory,
never the installed package's location: two clones sharing one virtualenv (or a
non-editable install) each keep their own inbox, ledger, checkpoints and MLflow store.
params.yaml's ``paths`` section (:class:`Paths`) names the folders; relative ones resolve
against the root, once, into :class:`Roots`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PROJECT = "NAS_PROJECT"


def project_root(explicit: str | Path | None = None) -> Path:
    """The project directory: ``explicit``, else ``$NAS_PROJECT``, else the working directory."""
    chosen = explicit or os.environ.get(ENV_PROJECT) or Path.cwd()
    root = Path(chosen).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"project directory {root} does not exist")
    return root


@dataclass(frozen=True)
class Paths:
    """Where the pipeline keeps its files (params.yaml ``paths``; relative to the project root).

    Attributes:
        inbox: new fact batches (``*.jsonl``), processed in name order.
        accepted: batches that were promoted, moved here untouched.
        quarantine: batches that failed validation or the gate, one folder each with the
            report and ``reason.json``.
        checkpoints: promoted checkpoints ``vNNNN/``.
        ledger: the append-only JSONL record of every night's decision.
        reports: validation reports and evaluation results per batch.
        demo_batches: the product's own demo nights (``nas refresh --demo`` copies them
            into the inbox one night at a time).
        models, stats, anchors, eval_cache: caches of fetched models, covariance
            statistics, NAS anchors and the base model's health scores.
        shared_data: the benchmark data (WikiText-2, CounterFact, general tasks); each
            use falls back or skips, saying so, where it is absent.
        demo: the product's own small data (canary text, fallback NAS pilots).
    """

    inbox: str = "data/inbox"
    accepted: str = "data/accepted"
    quarantine: str = "data/quarantine"
    checkpoints: str = "data/checkpoints"
    ledger: str = "data/ledger.jsonl"
    reports: str = "data/reports"
    demo_batches: str = "data/demo/batches"
    models: str = "data/models"
    stats: str = "data/stats"
    anchors: str = "data/anchors"
    eval_cache: str = "data/eval"
    shared_data: str = "../shared/data"
    demo: str = "data/demo"

    def under(self, root: Path) -> Roots:
        """Every folder resolved against the project ``root``."""
        root = Path(root)

        def resolved(value: str) -> Path:
            p = Path(value).expanduser()
            return p if p.is_absolute() else root / p

        return Roots(project=root, **{f.name: resolved(getattr(self, f.name)) for f in fields(self)})


@dataclass(frozen=True)
class Roots:
    """:class:`Paths` resolved: absolute folders, plus the data files the product reads."""

    project: Path
    inbox: Path
    accepted: Path
    quarantine: Path
    checkpoints: Path
    ledger: Path
    reports: Path
    demo_batches: Path
    models: Path
    stats: Path
    anchors: Path
    eval_cache: Path
    shared_data: Path
    demo: Path

    @property
    def configs(self) -> Path:
        """The model configs (``configs/NAME.yaml``)."""
        return self.project / "configs"

    @property
    def wikitext(self) -> Path:
        """WikiText-2 test: the covariance corpus and the canary text."""
        return self.shared_data / "text" / "wikitext-2-raw-wiki.test.raw"

    @property
    def pilot_source(self) -> Path:
        """CounterFact train: the NAS pilots (disjoint from every evaluation set)."""
        return self.shared_data / "counterfact" / "counterfact-train.json"

    @property
    def fallback_pilots(self) -> Path:
        """Pilots shipped with the project, for machines without the shared data."""
        return self.demo / "pilot_facts.jsonl"

    @property
    def fallback_corpus(self) -> Path:
        """Covariance text shipped with the project (scripts/make_fallback_corpus.py), for machines
        without WikiText-2: the same bytes everywhere, so C rebuilds on any machine."""
        return self.demo / "corpus.txt"

    @property
    def canary_text(self) -> Path:
        """The product's own canary, where WikiText-2 is absent."""
        return self.demo / "canary.txt"

    @property
    def general_tasks(self) -> Path:
        return self.shared_data / "general"

    @property
    def counterfact_500(self) -> Path:
        return self.shared_data / "counterfact" / "counterfact_500.json"

    @property
    def horizon_stream(self) -> Path:
        """CounterFact edit split: the long-horizon study's request stream."""
        return self.shared_data / "counterfact" / "counterfact-edit.json"

    def relative(self, path: Path) -> str:
        """``path`` as the ledger records it: relative to the project when inside it."""
        path = Path(path)
        return str(path.relative_to(self.project)) if path.is_relative_to(self.project) else str(path)

    def resolve(self, recorded: str | Path) -> Path:
        """A path the ledger recorded, back to an absolute one."""
        p = Path(recorded)
        return p if p.is_absolute() else self.project / p


__all__ = ["ENV_PROJECT", "Paths", "Roots", "project_root"]
