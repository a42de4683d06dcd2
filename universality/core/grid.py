"""Grid specs of ``univ sweep``: ``section.field=v1,v2,...`` parsed, coerced to the field's type, and
every point of the grid built into a validated config.

A tuple-valued field takes bracketed values (``sae.resample_fractions=[0.2,0.4],[0.1]``). Everything
here is pure and light (no torch), so a bad spec is a one-line error before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass
from typing import Any, Sequence

from universality.core.config import ExperimentConfig
from universality.core.errors import ConfigError

BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


@dataclass(frozen=True)
class Axis:
    """One grid axis: a config field and the values it takes, coerced to the field's type."""

    section: str
    field: str
    values: tuple[Any, ...]

    @property
    def name(self) -> str:
        return f"{self.section}.{self.field}"

    @property
    def dtype(self) -> str:
        """The column's dtype in the summary table (tuples and strings are written as text)."""
        kind = type(self.values[0])
        return {bool: "bool", int: "int64", float: "float64"}.get(kind, "string")

    def column(self, value: Any) -> Any:
        """``value`` as it appears in the summary table's column."""
        return format_value(value) if self.dtype == "string" else value


@dataclass(frozen=True)
class Point:
    """One grid point: the axis values (in grid order) and the validated config they make."""

    values: dict[str, Any]
    cfg: ExperimentConfig

    @property
    def label(self) -> str:
        return " ".join(f"{name}={format_value(value)}" for name, value in self.values.items())


def format_value(value: Any) -> str:
    """A grid value as written in a spec: ``true``, ``819200``, ``[0.2,0.4]``."""
    if isinstance(value, tuple):
        return "[" + ",".join(map(format_value, value)) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def config_fields() -> dict[str, dict[str, Any]]:
    """section -> field -> the field's type (``int``, ``float``, ``bool``, ``str``, ``tuple[float, ...]``)."""
    sections = typing.get_type_hints(ExperimentConfig)
    return {name: typing.get_type_hints(cls) for name, cls in sections.items() if dataclasses.is_dataclass(cls)}


def split_values(text: str) -> list[str]:
    """Split on the commas outside brackets: ``"[1,2],[3]"`` -> ``["[1,2]", "[3]"]``."""
    items, depth, current = [], 0, []
    for char in text:
        depth += (char == "[") - (char == "]")
        if depth < 0:
            raise ConfigError(f"unbalanced ']' in {text!r}")
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if depth:
        raise ConfigError(f"unbalanced '[' in {text!r}")
    return [*items, "".join(current).strip()]


def coerce(text: str, kind: Any) -> Any:
    """One value of a spec, as the field's type; ConfigError (one line) when it is not one."""
    if not text:
        raise ConfigError("empty value")
    if typing.get_origin(kind) is tuple:
        if not (text.startswith("[") and text.endswith("]")):
            raise ConfigError(f"expected a bracketed list like [0.2,0.4], not {text!r}")
        inner = text[1:-1].strip()
        return tuple(coerce(item, typing.get_args(kind)[0]) for item in (split_values(inner) if inner else []))
    if kind is bool:
        if text.lower() not in BOOLEANS:
            raise ConfigError(f"expected true or false, not {text!r}")
        return BOOLEANS[text.lower()]
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"expected an integer, not {text!r}") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"expected a number, not {text!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"expected a finite number, not {text!r}")
        return value
    return text


def parse_axis(spec: str) -> Axis:
    """``section.field=v1,v2,...`` -> an Axis of distinct values of the field's type."""
    name, sep, text = spec.partition("=")
    section, dot, field = name.strip().partition(".")
    if not sep or not dot:
        raise ConfigError(f"{spec!r}: expected section.field=v1,v2,... (e.g. sae.dict_size=1024,2048)")
    fields = config_fields()
    if section not in fields:
        raise ConfigError(f"{spec!r}: unknown config section {section!r} (choose from {', '.join(fields)})")
    if field not in fields[section]:
        raise ConfigError(f"{spec!r}: unknown field {field!r} in [{section}] (choose from {', '.join(fields[section])})")
    if not text.strip():
        raise ConfigError(f"{spec!r}: empty list of values")
    try:
        values = tuple(coerce(item, fields[section][field]) for item in split_values(text))
    except ConfigError as exc:
        raise ConfigError(f"{spec!r}: {exc}") from None
    if len(set(values)) != len(values):
        raise ConfigError(f"{spec!r}: a value is repeated")
    return Axis(section, field, values)


def parse_grid(specs: Sequence[str]) -> list[Axis]:
    """Every ``--grid`` spec as an Axis; at least one, and no field twice."""
    if not specs:
        raise ConfigError("give at least one --grid section.field=v1,v2,...")
    axes = [parse_axis(spec) for spec in specs]
    names = [axis.name for axis in axes]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"grid axis {repeated[0]} is given more than once (list all its values in one --grid)")
    return axes


def grid_points(base: ExperimentConfig, axes: Sequence[Axis]) -> list[Point]:
    """The cartesian product of the axes (the first varies slowest), each point's config built and
    validated now, so a value the config rejects stops the sweep before any work."""
    points = []
    for combo in itertools.product(*(axis.values for axis in axes)):
        values = {axis.name: value for axis, value in zip(axes, combo)}
        sections: dict[str, dict[str, Any]] = {}
        for axis, value in zip(axes, combo):
            sections.setdefault(axis.section, {})[axis.field] = value
        try:
            cfg = base.replace(**sections)
            if "sae.dict_size" in values and cfg.sae.dict_sizes:
                raise ConfigError(f"sae.dict_size is the largest of sae.dict_sizes {list(cfg.sae.dict_sizes)}: "
                                  "grid over sae.dict_sizes instead")
        except ConfigError as exc:
            raise ConfigError(f"grid point {Point(values, base).label}: {exc}") from None
        points.append(Point(values, cfg))
    return points
