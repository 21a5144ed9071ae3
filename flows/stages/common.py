"""What the DVC stages share: arguments, logging, and loading the base model the way the flow does.

Every stage is ``python -m flows.stages.NAME [--params FILE]`` run by ``dvc repro`` from the
repository root; it reads params.yaml with :func:`flows.params.load_params`, logs with
``logging`` and never imports Prefect.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config import REPO, ModelConfig
from flows.params import PARAMS, Params, load_params

log = logging.getLogger("flows.stages")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, default=PARAMS, help="params.yaml (default: the repository's)")
    p.add_argument("--repo", type=Path, default=REPO, help="root that relative paths resolve against")
    return p


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@dataclass
class Base:
    """The unedited model as ``flows.refresh.load_champion`` loads it."""

    params: Params
    cfg: ModelConfig
    settings: Any
    model: Any
    tok: Any
    name: str
    path: Path
    base_hash: str
    repo: Path


def load_base(params_file: Path, repo: Path) -> Base:
    """fetch_model (a no-op once fetched) + load_model + weights_hash, exactly like the nightly flow."""
    from flows.assets import fetch_model, load_model
    from nas_core.deltas import weights_hash

    params = load_params(params_file)
    cfg = params.model_config()
    fetched = fetch_model(cfg.model, params.paths.resolve("models", repo), show_progress=False)
    model, tok = load_model(fetched.path)
    return Base(params, cfg, recorded_settings(params, repo), model, tok, fetched.path.name, fetched.path,
                weights_hash(model), Path(repo))


def recorded_settings(params: Params, repo: Path):
    """The method settings on the precision path the lineage's first night took (its anchor was
    calibrated on it), never this machine's own ``auto`` choice; float32 for a lineage recorded
    before the setting existed, the machine's choice when nothing was promoted yet."""
    from flows import precision
    from flows.ledger import Ledger

    settings = params.method_settings()
    promotions = Ledger(params.paths.resolve("ledger", repo)).promotions()
    if not promotions:
        return settings
    return precision.with_path(settings, *precision.recorded_path(promotions[0]))


def stats_of(base: Base, require_cached: bool) -> dict[int, Any]:
    """The covariance statistics the flow uses (``ensure_stats`` over every edited layer)."""
    from flows import editing

    cov, path, cached = editing.ensure_stats(base.model, base.tok, base.name, base.cfg.all_layers(), base.cfg.stats,
                                             base.base_hash, root=base.params.paths.resolve("stats", base.repo))
    if require_cached and not cached:
        raise RuntimeError(f"covariance statistics {path} were not made by the stats stage (dvc repro stats)")
    log.info("covariance statistics %s%s", path, " (cached)" if cached else "")
    return cov


def anchor_of(base: Base, require_cached: bool) -> float | None:
    """The NAS reference norm the flow uses (None when NAS is off)."""
    from flows import editing

    if not base.settings.nas.enabled:
        return None
    rec, path, cached = editing.ensure_anchor(base.model, base.tok, base.name, base.params.edit.method, base.settings,
                                              base.base_hash, root=base.params.paths.resolve("anchors", base.repo))
    if require_cached and not cached:
        raise RuntimeError(f"NAS anchor {path} was not made by the anchor stage (dvc repro anchor)")
    log.info("NAS reference norm a = %.4f from %d pilots (%s)", rec["reference_norm"], rec["pilots"], path)
    return float(rec["reference_norm"])
