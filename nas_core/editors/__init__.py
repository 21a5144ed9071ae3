"""One editor per file, each satisfying :class:`nas_core.editors.base.Editor`."""

from __future__ import annotations

from nas_core.editors.alphaedit import AlphaEditEditor
from nas_core.editors.base import Editor, EditResult, RequestDiagnostics
from nas_core.editors.memit import MemitEditor
from nas_core.editors.rome import RomeEditor

METHODS: tuple[str, ...] = ("memit", "alphaedit", "rome")

__all__ = [
    "METHODS",
    "AlphaEditEditor",
    "EditResult",
    "Editor",
    "MemitEditor",
    "RequestDiagnostics",
    "RomeEditor",
]
