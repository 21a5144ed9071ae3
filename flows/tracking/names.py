"""What the product calls things in MLflow, and what MLflow accepts as keys and values.

The registered model, alias and tag names live here; so do the key sanitising, the param
flattening and MLflow's length and batch limits, mirrored from ``mlflow.utils.validation`` (the
tests check they agree) so that values can be truncated and batched without importing MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "nightly-refresh"
CHAMPION_ALIAS = "champion"
VERSION_LABEL_TAG = "version_label"
CHECKPOINT_ARTIFACT_PATH = "checkpoint"
REGISTERED_MODEL_PREFIX = "nas-"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

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


def truncate(kind: str, key: str, value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, ending in :data:`TRUNCATION_MARKER` (logged) when it was longer."""
    if len(value) <= limit:
        return value
    log.warning("%s %r is %d characters; truncated to MLflow's limit of %d", kind, key, len(value), limit)
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def sanitized(kind: str, items: Mapping[str, Any]) -> dict[str, Any]:
    """``items`` with sanitised keys; ValueError when two keys would become one."""
    out: dict[str, Any] = {}
    for key, value in items.items():
        clean = sanitize_key(key)
        if clean in out:
            raise ValueError(f"{kind} keys {key!r} and another key both map to {clean!r} once sanitised")
        if clean != key:
            log.debug("%s key %r logged as %r", kind, key, clean)
        out[clean] = value
    return out


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in slices of at most ``size`` (MLflow's batch limits)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def as_float(key: str, value: Any) -> float:
    """A metric value as a float; TypeError naming the metric when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {key!r} must be a number, got {value!r}") from exc
