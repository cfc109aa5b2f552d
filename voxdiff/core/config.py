"""Typed configs: plain dataclasses, saved as YAML next to every artifact.

Every stage function takes a dataclass config. ``to_dict``/``from_dict`` round-trip it through
JSON/YAML-safe types (tuples become lists and back), and :func:`write_config` stores the resolved
config together with the package versions that produced the artifact.

Sections
--------
A config class may group its fields into dataclass-typed *sections*, named by its ``SECTIONS``
class variable (e.g. ``PretrainConfig.optim``, an :class:`~voxdiff.core.sections.OptimConfig`).
``to_dict`` writes the nested layout (``{"optim": {"lr": ...}}``); ``from_dict`` reads it and also
the older *flat* layout (``{"lr": ...}``), so configs saved before a class was nested keep loading:

* a top-level key that is not a field of the class but a field (or an old, ``RENAMED`` name of a
  field) of exactly one section moves into that section; ``FLAT_NAMES`` (``{flat name: "section.field"}``)
  lists flat names that differ from the field's (``data_kind`` -> ``data.kind``) and settles names
  that several sections share; an unsettled shared name is an error on the class's first use
  (:func:`flat_names`);
* a plain value given for a section (not a mapping) sets the section's ``VALUE_FIELD``
  (``data: [folder]`` -> ``data.paths``, ``backbone: unet`` -> ``backbone.name``);
* a section given as a mapping may be partial: the missing fields keep the parent's default.

The flat layout is read silently by :func:`from_dict` (saved configs, experiment budgets and the
Python API use it); on the command line (:func:`from_namespace`) the flat options are hidden aliases
that warn (:class:`~voxdiff.core.errors.VoxdiffDeprecationWarning`) and point at the nested option.
"""

from __future__ import annotations

import dataclasses
import functools
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


def check_window(overlap: float | None = None, sw_batch_size: int | None = None, prefix: str = "") -> None:
    """The one check of sliding-window settings every command shares (:class:`InputError`, one line):
    ``overlap`` in [0, 1) and ``sw_batch_size`` >= 1 (None: not given); ``prefix`` names their section
    (``"inference."``)."""
    if overlap is not None and not 0 <= float(overlap) < 1:
        raise InputError(None, f"{prefix}overlap must lie in [0, 1), got {overlap}")
    if sw_batch_size is not None and int(sw_batch_size) < 1:
        raise InputError(None, f"{prefix}sw_batch_size must be >= 1, got {sw_batch_size}")


def warn_renamed(cls: Any, old: str, new: str) -> None:
    import warnings

    from .errors import VoxdiffDeprecationWarning

    warnings.warn(f"{getattr(cls, '__name__', cls)}: '{old}' is deprecated, use '{new}' (same meaning)",
                  VoxdiffDeprecationWarning, stacklevel=3)


@dataclasses.dataclass
class Bf16Renamed:
    """Base of the configs whose precision switch was called ``amp`` before it became ``bf16``.

    A dataclass itself (with no fields): jsonargparse validates the options of a dataclass whose
    base is a plain class with a ``__post_init__`` as ``Unvalidated`` types, so ``--sw_batch_size
    abc`` or ``--bf16 abc`` would pass the parser.

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


def section_names(cls: Any) -> tuple[str, ...]:
    """The section fields of a config class (its ``SECTIONS`` class variable; empty for flat classes)."""
    return tuple(getattr(cls, "SECTIONS", None) or ())


def section_classes(cls: Any) -> dict[str, type]:
    """``{section name: its dataclass}`` of a config class."""
    if not section_names(cls):
        return {}
    hints = typing.get_type_hints(cls)
    out: dict[str, type] = {}
    for name in section_names(cls):
        tp = hints.get(name)
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise TypeError(f"{cls.__name__}.SECTIONS names {name!r}, which is not a dataclass-typed field")
        out[name] = tp
    return out


def flat_names(cls: Any) -> dict[str, str]:
    """``{flat name: "section.field"}``: where each key of the flat (pre-sections) layout of ``cls``
    goes. Every field (and old ``RENAMED`` name) of a section under its own name, unless it is a
    top-level field of ``cls``, plus the class's ``FLAT_NAMES``. Raises ``TypeError`` when a name
    belongs to several sections and ``FLAT_NAMES`` does not say which (a ``None`` target there
    makes a name not flat at all)."""
    return dict(_flat_names(cls))


@functools.lru_cache(maxsize=None)
def _flat_names(cls: Any) -> dict[str, str]:
    sections = section_classes(cls)
    if not sections:
        return {}
    top = {f.name for f in dataclasses.fields(cls)}
    explicit = dict(getattr(cls, "FLAT_NAMES", None) or {})
    found: dict[str, list[str]] = {}
    for sec, scls in sections.items():
        names = [f.name for f in dataclasses.fields(scls)] + list(renamed_fields(scls))
        for n in names:
            if n not in top:
                found.setdefault(n, []).append(f"{sec}.{n}")
    out: dict[str, str] = {}
    for n, paths in found.items():
        if n in explicit:
            continue
        if len(paths) > 1:
            raise TypeError(f"{cls.__name__}: the flat name {n!r} is a field of several sections "
                            f"({', '.join(paths)}); say which in {cls.__name__}.FLAT_NAMES")
        out[n] = paths[0]
    for n, path in explicit.items():
        if path is None:
            continue
        sec, _, fld = path.partition(".")
        target = sections.get(sec)
        if n in top or target is None or fld not in {f.name for f in dataclasses.fields(target)} | set(renamed_fields(target)):
            raise TypeError(f"{cls.__name__}.FLAT_NAMES: {n!r} -> {path!r} is not a section field "
                            f"(or {n!r} is a top-level field)")
        out[n] = path
    return out


def _section_value(scls: type, value: Any) -> Any:
    """A section's value as given: a mapping/dataclass as is, a plain value as ``{VALUE_FIELD: value}``."""
    if value is None or isinstance(value, dict) or dataclasses.is_dataclass(value):
        return value
    vf = getattr(scls, "VALUE_FIELD", None)
    if vf is None:
        return value  # left to the type check of the section
    return {vf: value}


def nest_flat(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` in the nested layout of ``cls``: flat keys (:func:`flat_names`) moved into their
    sections, plain section values turned into their ``VALUE_FIELD``. When a value is given both
    ways, the nested one wins. Keys are moved, not checked."""
    sections = section_classes(cls)
    if not sections:
        return data
    routes = flat_names(cls)
    out = dict(data)
    for sec, scls in sections.items():
        if sec in out:
            out[sec] = _section_value(scls, out[sec])
    for n, path in routes.items():
        if n not in out:
            continue
        value = out.pop(n)
        sec, _, fld = path.partition(".")
        cur = out.get(sec)
        if dataclasses.is_dataclass(cur) and not isinstance(cur, type):
            cur = to_dict(cur)
        sub = dict(cur) if isinstance(cur, dict) else {}
        sub.setdefault(fld, value)
        out[sec] = sub
    return out


def flatten(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """A nested dict of ``cls`` (``to_dict`` of it, or a saved one in either layout) with its
    sections spelt out as dotted keys (``{"optim.lr": ...}``); other values (e.g. a dict-valued
    field) stay whole. For comparing two configs field by field."""
    data = nest_flat(cls, apply_renamed(cls, data))
    sections = section_classes(cls)
    out: dict[str, Any] = {}
    for k, v in data.items():
        if k in sections and isinstance(v, dict):
            for sk, sv in apply_renamed(sections[k], v).items():
                out[f"{k}.{sk}"] = sv
        else:
            out[k] = v
    return out


def from_dict(cls: type[T], data: dict[str, Any], strict: bool = True) -> T:
    """dict -> dataclass ``cls``; unknown keys raise (``strict``) or are ignored; old names of
    renamed fields are accepted (:func:`renamed_fields`), and so is the flat layout of a class
    with sections (see the module's docstring)."""
    data = nest_flat(cls, apply_renamed(cls, data))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown and strict:
        raise ValueError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    sections = section_classes(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            continue
        if k in sections and isinstance(v, dict):
            default = _field_default(fields[k])
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                # a partial section keeps the parent's defaults for the fields it does not give
                v = {**to_dict(default), **apply_renamed(sections[k], v)}
            v = from_dict(sections[k], v, strict=strict)
        kwargs[k] = _coerce(hints.get(k, Any), v)
    return cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def from_namespace(cls: type[T], ns: Any) -> T:
    """Build a dataclass config from a (jsonargparse) namespace holding its fields (sections as
    nested namespaces); the hidden options of renamed fields and of a sectioned class's flat names
    (:func:`~voxdiff.core.cli.add_config`) override what they alias, with a deprecation warning."""
    d = ns.as_dict() if hasattr(ns, "as_dict") else dict(vars(ns))
    routes = flat_names(cls)
    names = [f.name for f in dataclasses.fields(cls)] + list(renamed_fields(cls))  # type: ignore[arg-type]
    data = apply_renamed(cls, {n: d[n] for n in names if n in d}, old_wins=True)
    sections = section_classes(cls)
    for n, path in routes.items():
        if d.get(n) is None:
            continue
        sec, _, fld = path.partition(".")
        fld = renamed_fields(sections[sec]).get(fld, fld)  # e.g. --amp: runtime.bf16
        warn_renamed(cls, n, f"{sec}.{fld}")
        sub = data.get(sec)
        data[sec] = {**(sub if isinstance(sub, dict) else {}), fld: d[n]}
    return from_dict(cls, data, strict=False)


def versions() -> dict[str, str]:
    """Versions of the packages that shape results, saved with every artifact (a fresh dict)."""
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    # looked up once per process: reading the installed packages' metadata costs about 30 ms, and an
    # experiment writes dozens of configs and checkpoints
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("voxdiff", "torch", "monai", "numpy", "scipy", "nibabel", "pydicom", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return tuple(out.items())


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


def read_config_doc(path: str | os.PathLike) -> Any:
    """The whole YAML document of a saved config file: the config and what :func:`write_config` wrote
    beside it (``extra``, versions); a missing or unreadable file is refused in one line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "config file not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise InputError(p, f"not valid YAML ({e.__class__.__name__})") from None


def read_config(path: str | os.PathLike, cls: type[T] | None = None) -> Any:
    doc = read_config_doc(path)
    cfg = doc.get("config", doc) if isinstance(doc, dict) else doc
    return from_dict(cls, cfg) if cls is not None else cfg
