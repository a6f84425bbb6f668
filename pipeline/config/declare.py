"""One declaration per key: its type (the dataclass annotation) and what it accepts beyond the
type (`key(default, ge=..., choices=...)`), checked by one walker before anything is written.

    threshold: float = key(0.8, ge=0, le=1, hint="a confidence such as 0.8")

`check_declared(cfg, sections)` walks the composed config and raises UserError with one line
naming the key, the value and what it accepts, e.g. `pseudo_label.threshold=1.5 is outside
[0, 1]; pass a confidence such as 0.8` or `data.labels_per_class=2.5 must be a whole number
>= 1 (or null)`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.errors import UserError

RANGE = "range"  # the metadata entry of a declared field


@dataclass(frozen=True)
class Range:
    """What a key accepts beyond its type: bounds for numbers, choices for strings."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    hint: str | None = None
    # False for a key whose null is only its unset default (format: for stage=export, which
    # needs a value): a refusal then offers the values, not null.
    null_choice: bool = True

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or value is None:
            return True  # the type decides (bounds do not apply to true/false)
        if isinstance(value, str):
            return self.choices is None or value in self.choices
        if isinstance(value, int | float):
            return (
                (self.ge is None or value >= self.ge)
                and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le)
                and (self.lt is None or value < self.lt)
            )
        return True

    def bounds(self) -> str:
        """`in [0, 1)`, `>= 1`, ... ('' without bounds)."""
        low = _num(self.ge if self.gt is None else self.gt)
        high = _num(self.le if self.lt is None else self.lt)
        if (self.ge is not None or self.gt is not None) and high is not None:
            left, right = "[" if self.gt is None else "(", "]" if self.lt is None else ")"
            return f"in {left}{low}, {high}{right}"
        if self.ge is not None or self.gt is not None:
            return f"{'>=' if self.gt is None else '>'} {low}"
        if high is not None:
            return f"{'<=' if self.lt is None else '<'} {high}"
        return ""


def _num(x: float | None) -> str | None:
    """1.0 -> '1', 0.5 -> '0.5' (bounds read as a user writes them)."""
    if x is None:
        return None
    return str(int(x)) if float(x).is_integer() else str(x)


def key(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    hint: str | None = None,
    null_choice: bool = True,
) -> Any:
    """A dataclass field with its range: `epochs: int = key(60, ge=0)`. Without a default the
    field only declares a key of a free-form group (checked where the group has it)."""
    rng = Range(ge=ge, gt=gt, le=le, lt=lt, choices=choices, hint=hint, null_choice=null_choice)
    return dataclasses.field(default=default, metadata={RANGE: rng})


def _accepts(tp: Any, value: Any) -> bool:
    """Whether `value` (from a resolved config) has the annotated type."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(t, value) for t in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list | ListConfig) and all(_accepts(item, v) for v in value)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict | DictConfig)
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # YAML's true is not a number
    if tp is float:
        return isinstance(value, int | float)
    return isinstance(value, tp)


_KINDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _describe(tp: Any, rng: Range) -> str:
    """`a whole number >= 1 (or null)`: what a key accepts, in words."""
    members = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]
    nullable = _offers_null(tp, rng)
    words = []
    for t in members:
        if t is str and rng.choices is not None:
            words.append(f"one of {', '.join(rng.choices)}")
        elif typing.get_origin(t) is list:
            (item,) = typing.get_args(t) or (Any,)
            words.append(f"a list of {_KINDS.get(item, 'values').removeprefix('a ')}s")
        elif t in (int, float):
            words.append(f"{_KINDS[t]} {rng.bounds()}".strip())
        else:
            words.append(_KINDS.get(t, getattr(t, "__name__", str(t))))
    return " or ".join(words) + (" (or null)" if nullable else "")


def _offers_null(tp: Any, rng: Range) -> bool:
    """Whether what a key accepts, in words, includes null: its type admits None and null is
    more than its unset default (Range.null_choice)."""
    return type(None) in typing.get_args(tp) and rng.null_choice


def _refusal(name: str, value: Any, tp: Any, rng: Range) -> str:
    """The one line for a value outside its declaration."""
    null = " or null" if _offers_null(tp, rng) else ""
    if not _accepts(tp, value):
        line = f"{name}={_show(value)} must be {_describe(tp, rng)}"
    elif isinstance(value, str):
        line = f"{name}={value!r}; choose one of {', '.join(rng.choices or ())}{null}"
    elif rng.bounds().startswith("in "):
        line = f"{name}={value} is outside {rng.bounds()[3:]}{null}"
    else:
        line = f"{name}={value} must be {rng.bounds()}{null}"
    return f"{line}; {rng.hint}" if rng.hint else line


def _show(value: Any) -> str:
    """A value as the user wrote it: true, 'abc', [1, 2]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, DictConfig | ListConfig):
        return str(OmegaConf.to_container(value))
    return repr(value) if isinstance(value, str) else str(value)


def check_node(node: Any, schema: type, prefix: str) -> None:
    """Check every declared key that `node` holds against its declaration (recursing into
    fields typed by another dataclass). Keys the node lacks are left to the code's defaults."""
    if not isinstance(node, DictConfig):
        return
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name not in node or OmegaConf.is_missing(node, f.name):
            continue
        tp, value = hints[f.name], node[f.name]
        nested = [t for t in typing.get_args(tp) or (tp,) if dataclasses.is_dataclass(t)]
        if isinstance(value, DictConfig) and nested:  # a section (or an optional one)
            check_node(value, nested[0], f"{prefix}{f.name}.")
            continue
        rng = f.metadata.get(RANGE, Range())
        if not _accepts(tp, value) or not rng.admits(value):
            raise UserError(_refusal(f"{prefix}{f.name}", value, tp, rng))


def check_declared(cfg: DictConfig, sections: dict[str, type]) -> None:
    """Every declared key of every section ('' the root, 'train.', 'data.', ...): type and
    range, in one place, before the run writes anything."""
    for prefix, schema in sections.items():
        node = OmegaConf.select(cfg, prefix[:-1]) if prefix else cfg
        check_node(node, schema, prefix)
