"""Strict dataclass configuration from TOML tables and ``--section.key=value`` overrides.

Generic machinery, independent of distrain's sections: values are checked against the dataclass
field types (bool, int, float, str, lists, unions, lists of nested dataclass tables such as
``[[topology.replica]]``), unknown keys are errors naming the key and where it came from, and a
resolved config is written back as TOML that loads to the same object.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration value, key or file is invalid."""


# A dataclass table built from TOML remembers where it came from, so later checks can name it.
SOURCE_ATTR = "_config_source"


def source_of(obj: Any, default: str = "config") -> str:
    return getattr(obj, SOURCE_ATTR, default)


def need(ok: bool, message: str) -> None:
    """A check: a one-line ``ConfigError`` with ``message`` when ``ok`` is false."""
    if not ok:
        raise ConfigError(message)


def choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    need(value in allowed, f"{where}: {value!r} is not one of {', '.join(allowed)}")


def check_value(value: Any, tp: Any, where: str, source: str) -> Any:
    """``value`` converted to ``tp`` (int → float allowed), or a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{where}': expected a boolean, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{where}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{where}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{where}': expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        obj = tp()
        apply_table(obj, value, source, f"{where}.")
        setattr(obj, SOURCE_ATTR, f"{source}: {where}")
        return obj
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{where}': expected a list, got {value!r}")
        return [check_value(v, inner, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            if alt is type(None) and value is None:
                return None
            try:
                return check_value(value, alt, where, source)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp))
        raise ConfigError(f"{source}: '{where}': expected {names}, got {value!r}")
    raise ConfigError(f"{source}: '{where}': unsupported type {tp}")


def apply_table(obj: Any, data: Any, source: str, prefix: str = "",
                removed: Callable[[str], str | None] | None = None, explicit: set[str] | None = None) -> None:
    """Set dataclass fields of ``obj`` from ``data``, recursing into nested sections.

    ``removed(dotted_key)`` may return the message for a key that no longer exists;
    ``explicit`` collects every dotted key that was set.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            gone = removed(dotted) if removed is not None else None
            if gone:
                raise ConfigError(f"{source}: '{dotted}' was removed: {gone}")
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{dotted}' (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and (isinstance(value, dict) or dataclasses.is_dataclass(hints[key])):
            apply_table(current, value, source, f"{dotted}.", removed, explicit)  # a section, or a table in a union
        else:
            setattr(obj, key, check_value(value, hints[key], dotted, source))
            if explicit is not None:
                explicit.add(dotted)


def parse_override(arg: str) -> tuple[list[str], Any]:
    """``--a.b=v`` → (["a", "b"], v), v parsed as TOML (bare words are strings)."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r}: expected --section.key=value")
    key, raw = arg[2:].split("=", 1)
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {arg!r}: expected --section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as e:
        if raw.lstrip()[:1] in ("[", "{", '"', "'"):  # meant as a TOML list, table or string: say why not
            raise ConfigError(f"override {arg!r}: invalid TOML value ({e})") from None
        value = raw  # bare words are strings: --run.name=foo
    return parts, value


def nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # a nested table inside an array of tables: inline
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(d: dict[str, Any], prefix: str = "") -> str:
    """Nested dicts as TOML: scalars, then sub-tables, then arrays of tables (``[[a.b]]``)."""
    lines: list[str] = []
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not _is_table_list(v)}
    tables = {k: v for k, v in d.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in d.items() if _is_table_list(v)}
    if prefix and scalars:
        lines.append(f"[{prefix}]")
    for k, v in scalars.items():
        lines.append(f"{k} = {_toml_value(v)}")
    if scalars:
        lines.append("")
    for k, v in tables.items():
        lines.append(to_toml(v, f"{prefix}.{k}" if prefix else k))
    for k, items in arrays.items():
        name = f"{prefix}.{k}" if prefix else k
        for item in items:
            lines.append(f"[[{name}]]")
            lines.extend(f"{ik} = {_toml_value(iv)}" for ik, iv in item.items())
            lines.append("")
    return "\n".join(lines)
