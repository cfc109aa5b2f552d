"""Typed configs: plain dataclasses, saved as YAML next to every artifact.

Every stage function takes a dataclass config. ``to_dict``/``from_dict`` round-trip it through
JSON/YAML-safe types (tuples become lists and back), and :func:`write_config` stores the resolved
config together with the package versions that produced the artifact.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from .errors import InputError
from .outputs import atomic_write

T = TypeVar("T")


def to_dict(cfg: Any) -> Any:
    """Dataclass (possibly nested) -> dict of plain YAML/JSON types."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    if hasattr(cfg, "item") and callable(cfg.item):  # numpy / torch scalars
        return cfg.item()
    return cfg


def _coerce(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value)
            except (TypeError, ValueError):
                continue
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_coerce(a, v) for a, v in zip(args, value))
        return tuple(value)
    if origin is list and isinstance(value, (list, tuple)):
        return [_coerce(args[0], v) if args else v for v in value]
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is Path and isinstance(value, str):
        return Path(value)
    return value


def renamed_fields(cls: Any) -> dict[str, str]:
    """``{old name: new name}`` of a config class's renamed fields (its ``RENAMED`` class variable).
    Old names keep working in saved configs, YAML files, on the command line (hidden options) and as
    keyword arguments (an ``InitVar`` of the old name), with a :class:`VoxdiffDeprecationWarning`."""
    return dict(getattr(cls, "RENAMED", None) or {})


def warn_renamed(cls: Any, old: str, new: str) -> None:
    import warnings

    from .errors import VoxdiffDeprecationWarning

    warnings.warn(f"{getattr(cls, '__name__', cls)}: '{old}' is deprecated, use '{new}' (same meaning)",
                  VoxdiffDeprecationWarning, stacklevel=3)


class Bf16Renamed:
    """Base of the configs whose precision switch was called ``amp`` before it became ``bf16``.

    The dataclass declares ``amp: InitVar[bool | None] = None`` (the old keyword); this class maps it
    to ``bf16`` with a deprecation warning, and ``RENAMED`` lets saved configs, YAML and the hidden
    ``--amp`` option use the old name too."""

    RENAMED: ClassVar[dict[str, str]] = {"amp": "bf16"}

    def __post_init__(self, amp: bool | None = None) -> None:
        if amp is not None:
            warn_renamed(type(self), "amp", "bf16")
            self.bf16 = bool(amp)


def apply_renamed(cls: Any, data: dict[str, Any], old_wins: bool = False) -> dict[str, Any]:
    """``data`` with the old names of renamed fields moved to the new ones (a warning each; when
    both are given the new name wins, or the old one with ``old_wins``: a parsed command line holds
    every new name's default; an old name set to null is dropped)."""
    ren = renamed_fields(cls)
    if not any(k in data for k in ren):
        return data
    out = dict(data)
    for old, new in ren.items():
        if old not in out:
            continue
        value = out.pop(old)
        if value is None:
            continue
        warn_renamed(cls, old, new)
        if old_wins:
            out[new] = value
        else:
            out.setdefault(new, value)
    return out


def from_dict(cls: type[T], data: dict[str, Any], strict: bool = True) -> T:
    """dict -> dataclass ``cls``; unknown keys raise (``strict``) or are ignored; old names of
    renamed fields are accepted (:func:`renamed_fields`)."""
    data = apply_renamed(cls, data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown and strict:
        raise ValueError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    kwargs = {k: _coerce(hints.get(k, Any), v) for k, v in data.items() if k in names}
    return cls(**kwargs)


def from_namespace(cls: type[T], ns: Any) -> T:
    """Build a dataclass config from a (jsonargparse) namespace holding its fields flat."""
    d = ns.as_dict() if hasattr(ns, "as_dict") else dict(vars(ns))
    names = [f.name for f in dataclasses.fields(cls)] + list(renamed_fields(cls))  # type: ignore[arg-type]
    data = apply_renamed(cls, {n: d[n] for n in names if n in d}, old_wins=True)
    return from_dict(cls, data, strict=False)


def versions() -> dict[str, str]:
    """Versions of the packages that shape results, saved with every artifact."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("voxdiff", "torch", "monai", "numpy", "scipy", "nibabel", "pydicom", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_config(path: str | os.PathLike, cfg: Any, extra: dict[str, Any] | None = None) -> Path:
    """Write the resolved config (YAML) with package versions. ``path`` may be a folder."""
    p = Path(path)
    if p.is_dir() or p.suffix == "":
        p = p / "config.yaml"
    doc: dict[str, Any] = {"config": to_dict(cfg), "versions": versions()}
    if dataclasses.is_dataclass(cfg):
        doc["config_class"] = f"{type(cfg).__module__}.{type(cfg).__qualname__}"
    if extra:
        doc.update(to_dict(extra))
    return atomic_write(p, yaml.safe_dump(doc, sort_keys=False))


def read_config(path: str | os.PathLike, cls: type[T] | None = None) -> Any:
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "config file not found")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise InputError(p, f"not valid YAML ({e.__class__.__name__})") from None
    cfg = doc.get("config", doc) if isinstance(doc, dict) else doc
    return from_dict(cls, cfg) if cls is not None else cfg
