"""The one error every part of model assets raises, so callers catch a single type."""

from __future__ import annotations


class ModelFetchError(RuntimeError):
    """A model could not be fetched, verified, converted or loaded; the message says why."""


__all__ = ("ModelFetchError",)
