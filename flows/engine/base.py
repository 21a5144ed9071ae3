"""The unedited model a night, a replay or a study starts from: fetched, loaded, and hashed.

Kept apart from :mod:`flows.engine.loading` (statistics and anchor) so the workers that load their
own copy need nothing of the caches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from nas_core.deltas import weights_hash


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """The unedited model a night (or its replay) starts from, and its weights hash."""

    model: nn.Module
    tok: Any
    name: str
    path: Path
    base_hash: str


def fetch_base(source: str, models_root: Path, device: str = "cpu", dtype: str = "float32") -> BaseModel:
    """The model ``source`` names (a model config's ``model``) from ``models_root``, fetched first
    when absent, loaded onto ``device`` in ``dtype`` (``auto``: :func:`flows.engine.precision.runtime`)."""
    from flows.assets.fetch import fetch_model
    from flows.assets.load import load_model
    from flows.engine.precision import runtime

    device, dtype = runtime(device, dtype)
    fetched = fetch_model(source, models_root, show_progress=False)
    model, tok = load_model(fetched.path, dtype=dtype, device=device)
    return BaseModel(model, tok, fetched.path.name, fetched.path, weights_hash(model))


def load_base(params) -> BaseModel:
    """params.yaml's model from the project's model cache (fetched first when absent), on
    params.yaml's ``runtime`` device and dtype."""
    return fetch_base(params.model_config().model, params.roots.models, params.runtime.device, params.runtime.dtype)
