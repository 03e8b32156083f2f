"""The key-by-key reference of docs/config.md, generated from the model like the schema."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args, get_origin

from federation.config.decode import fields_of, optional_arg, unwrap
from federation.config.model import DERIVED, FederationConfig
from federation.config.scalars import DurationSpec, Items, ParseSpec, Range, StrSpec
from federation.config.schema import NO_DEFAULT, default_json, field_docs

BEGIN = "<!-- BEGIN GENERATED REFERENCE (meshfed.config.reference) -->"
END = "<!-- END GENERATED REFERENCE -->"


def render_reference() -> str:
    """Markdown: one table per model class, in the order a reader meets them."""
    order: list[type[Any]] = []
    _collect(FederationConfig, order)
    parts = [BEGIN, ""]
    for cls in order:
        doc = " ".join((cls.__doc__ or "").split()).replace("``", "`")
        parts += [
            f"### {cls.__name__}",
            "",
            doc,
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        docs = field_docs(cls)
        for f in fields_of(cls):
            if f.required:
                default = "**required**"
            elif DERIVED in f.field.metadata:
                default = f"derived: {f.field.metadata[DERIVED]}"
            else:
                value = default_json(f.default(), f.type)
                default = "see its table" if value is NO_DEFAULT else f"`{_yaml(value)}`"
            meaning = docs.get(f.name, "").replace("|", "\\|")
            parts.append(f"| `{f.key}` | {_type_text(f.type)} | {default} | {meaning} |")
        parts.append("")
    parts.append(END)
    return "\n".join(parts) + "\n"


def _collect(cls: type[Any], order: list[type[Any]]) -> None:
    if cls in order:
        return
    order.append(cls)
    for f in fields_of(cls):
        for leaf in _dataclasses_in(f.type):
            _collect(leaf, order)


def _dataclasses_in(tp: Any) -> list[type[Any]]:
    base, markers = unwrap(tp)
    if any(isinstance(m, ParseSpec) for m in markers):
        return []
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        return [base]
    return [leaf for arg in get_args(base) for leaf in _dataclasses_in(arg)]


def _type_text(tp: Any) -> str:
    base, markers = unwrap(tp)
    inner = optional_arg(base)
    if inner is not None:
        return _type_text(inner) + " or null"
    for m in markers:
        if isinstance(m, DurationSpec):
            return "duration" + (" > 0" if m.positive else "")
        if isinstance(m, StrSpec | ParseSpec):
            return m.description.replace("|", "\\|")
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        return f"[{base.__name__}](#{base.__name__.lower()})"
    origin = get_origin(base)
    if origin is tuple:
        items: Items | None = next((m for m in markers if isinstance(m, Items)), None)
        text = f"list of {_type_text(get_args(base)[0])}"
        if items is not None and items.min_items:
            text += f", at least {items.min_items}"
        return text
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(base))
    if origin is not None:
        key, value = get_args(base)
        return f"mapping of {_type_text(key)} to {_type_text(value)}"
    rng: Range | None = next((m for m in markers if isinstance(m, Range)), None)
    name = {bool: "boolean", int: "integer", float: "number", str: "string"}[base]
    if rng is not None:
        name += f" {_num(rng.minimum)} to {_num(rng.maximum)}"
    return name


def _num(x: float | None) -> str:
    if x is None:
        return "any"
    return str(int(x)) if float(x).is_integer() else str(x)


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)
