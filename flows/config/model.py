"""params.yaml and model configs -> frozen nas_core dataclasses.

Unknown keys and wrong types are errors that name the key path. Each model config under
``configs/`` is self-contained (torchtune style): the layers, the value optimisation,
NAS and every method's settings for that model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from flows.paths import project_root
from nas_core.collapse import CollapseSettings
from nas_core.editors import METHODS, SETTINGS, VARIANTS, check_method
from nas_core.settings import (
    AlphaEditSettings,
    EvalSettings,
    MemitSettings,
    NASSettings,
    RomeSettings,
    StatsSettings,
    ValueSettings,
)


class ConfigError(ValueError):
    """A configuration file broke a rule; the message names the file and key path."""


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return build(hint, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        key_hint, value_hint = typing.get_args(hint)
        return {_coerce(k, key_hint, f"{path} key"): _coerce(v, value_hint, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} matches none of {args}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported setting type {hint}")


def build(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path or cls.__name__}: unknown keys {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from err


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One model's self-contained editing configuration (``configs/NAME.yaml``).

    Attributes:
        model: what ``nas fetch-model`` takes (a known name, ``hf:ORG/NAME``, or a path).
        layers_note: how the layers were chosen (a measurement, or the literature source).
        stats: covariance statistics settings.
        values: defaults for the v* optimisation, used by every method below unless the
            method's section overrides them.
        nas: NAS defaults, likewise.
        eval: what the evaluation scores (general tasks, canary, fluency).
        collapse: the collapse verdict's thresholds.
    """

    model: str
    layers_note: str
    stats: StatsSettings
    memit: MemitSettings
    alphaedit: AlphaEditSettings
    rome: RomeSettings
    eval: EvalSettings = EvalSettings()
    collapse: CollapseSettings = CollapseSettings()

    def all_layers(self) -> list[int]:
        """Every layer any method of the config edits: one statistics file serves them all."""
        return sorted({*self.memit.layers, *self.alphaedit.layers, *self.rome.layers})

    def method(self, name: str, nas: bool | None = None) -> MemitSettings | AlphaEditSettings | RomeSettings:
        """The settings of method ``name`` (or a baseline variant of one, ``memit-plain``,
        ``rome-classic``), with NAS switched on/off when ``nas`` is given."""
        base, changes = VARIANTS.get(name, (name, {}))  # a baseline is a setting of its editor
        try:
            check_method(name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        s = dataclasses.replace(getattr(self, base), **changes)
        if nas is not None:
            s = dataclasses.replace(s, nas=dataclasses.replace(s.nas, enabled=nas))
        return s


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """yaml's safe loader that refuses a mapping repeating a key (plain yaml keeps the last one
    silently, so a second ``runtime:`` section would override the first unseen)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content, duplicate keys refused with the file and line."""
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeySafeLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def load_model_config(path: Path) -> ModelConfig:
    """Read ``configs/NAME.yaml``. Top-level ``values``/``nas`` are shared by all methods."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    allowed = {"model", "layers_note", "stats", "values", "nas", *METHODS, "eval", "collapse"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    shared = {"values": raw.get("values", {}), "nas": raw.get("nas", {})}
    try:
        sections = {}
        for name in METHODS:
            sec = dict(raw.get(name) or {})
            for key in ("values", "nas"):
                sec[key] = {**shared[key], **(sec.get(key) or {})}
            sections[name] = build(SETTINGS[name], sec, f"{Path(path).name}:{name}")
        return ModelConfig(
            model=_coerce(raw.get("model"), str, f"{Path(path).name}:model"),
            layers_note=_coerce(raw.get("layers_note", ""), str, f"{Path(path).name}:layers_note"),
            stats=build(StatsSettings, raw.get("stats") or {}, f"{Path(path).name}:stats"),
            eval=build(EvalSettings, raw.get("eval") or {}, f"{Path(path).name}:eval"),
            collapse=build(CollapseSettings, raw.get("collapse") or {}, f"{Path(path).name}:collapse"),
            **sections,
        )
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_for(name_or_path: str, configs: Path | None = None) -> ModelConfig:
    """A model config by name (``configs/NAME.yaml`` of the project, :mod:`flows.paths`) or an
    explicit YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return load_model_config(p)
    configs = configs if configs is not None else project_root() / "configs"
    candidate = configs / f"{name_or_path}.yaml"
    if candidate.is_file():
        return load_model_config(candidate)
    known = sorted(x.stem for x in configs.glob("*.yaml"))
    raise ConfigError(f"no config for {name_or_path!r}; shipped configs: {known}")


__all__ = ["ConfigError", "ModelConfig", "build", "config_for", "load_model_config", "NASSettings",
           "ValueSettings"]
