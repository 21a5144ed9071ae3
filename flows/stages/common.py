"""What the DVC stages share: arguments, logging, and the lineage's recorded precision path.

Every stage is ``python -m flows.stages.NAME [--params FILE] [--project DIR]`` run by
``dvc repro`` from the project root; it reads params.yaml with :func:`flows.config.params.load_params`,
loads through the nightly flow's own functions (:mod:`flows.engine.editing`), logs with ``logging``
and never imports Prefect.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from flows.config.params import Params, load_params

log = logging.getLogger("flows.stages")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, default=None, help="params.yaml (default: the project's)")
    p.add_argument("--project", type=Path, default=None,
                   help="project directory relative paths resolve against (default: $NAS_PROJECT or the working one)")
    return p


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # read when Dask is imported, by workers too


def stage_params(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.project)


def recorded_settings(params: Params):
    """The method settings on the precision path the lineage's first night took (its anchor was
    calibrated on it), never this machine's own ``auto`` choice; float32 for a lineage recorded
    before the setting existed, the machine's choice when nothing was promoted yet."""
    from flows.engine import precision
    from flows.ledger.records import Ledger

    settings = params.method_settings()
    promotions = Ledger(params.roots.ledger).promotions()
    if not promotions:
        return settings
    return precision.with_path(settings, *precision.recorded_path(promotions[0]))
