"""One editor per file, each satisfying :class:`nas_core.editors.base.Editor`."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from nas_core.editors.alphaedit import AlphaEditEditor
from nas_core.editors.base import Editor, EditResult, RequestDiagnostics
from nas_core.editors.memit import MemitEditor
from nas_core.editors.rome import RomeEditor
from nas_core.settings import AlphaEditSettings, MemitSettings, RomeSettings

#: The one method registry: each method's editor class and settings class.
EDITORS: Mapping[str, type] = MappingProxyType({"memit": MemitEditor, "alphaedit": AlphaEditEditor, "rome": RomeEditor})
SETTINGS: Mapping[str, type] = MappingProxyType(
    {"memit": MemitSettings, "alphaedit": AlphaEditSettings, "rome": RomeSettings})
METHODS: tuple[str, ...] = tuple(EDITORS)

#: The classic baselines the literature compares against, as settings of an editor above:
#: ``memit-plain`` forgets earlier keys (no sequential key cache: the MEMIT row of the
#: sequential tables), ``rome-classic`` puts the unprefixed key into ROME's denominator (the
#: inconsistency "The Fall of ROME" identifies, which r-ROME removes).
VARIANTS: Mapping[str, tuple[str, Mapping[str, bool]]] = MappingProxyType({
    "memit-plain": ("memit", MappingProxyType({"use_key_cache": False})),
    "rome-classic": ("rome", MappingProxyType({"prefix_consistent": False})),
})


def base_method(name: str) -> str:
    """The editor a method or variant name runs (``memit-plain`` -> ``memit``)."""
    return VARIANTS[name][0] if name in VARIANTS else name


def check_method(name: str) -> str:
    """``name``'s editor method; a ValueError naming every known method and variant otherwise."""
    base = base_method(name)
    if base not in EDITORS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)} and {sorted(VARIANTS)}")
    return base

__all__ = [
    "EDITORS",
    "METHODS",
    "SETTINGS",
    "check_method",
    "VARIANTS",
    "base_method",
    "AlphaEditEditor",
    "EditResult",
    "Editor",
    "MemitEditor",
    "RequestDiagnostics",
    "RomeEditor",
]
