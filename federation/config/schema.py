"""JSON Schema (draft 2020-12) for the config format, generated from the model.

``configs/meshfed.schema.json`` is the output of :func:`render_schema`; a test
keeps the committed file equal to it. The schema is for editors (completion,
hover docs from the field docstrings, early red squiggles); it cannot express
cross references or value relations, so the parser stays the authority.

:func:`validate_instance` checks data against the subset of JSON Schema that
:func:`build_schema` emits, so tests need no ``jsonschema`` dependency.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import re
import textwrap
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from federation.config.decode import fields_of, optional_arg, unwrap
from federation.config.durations import DURATION_PATTERN, format_duration
from federation.config.model import DERIVED, FederationConfig
from federation.config.scalars import DurationSpec, Items, ParseSpec, Range, StrSpec

SCHEMA_ID = "https://meshfed.dev/schemas/config-v1.json"

JsonObject = dict[str, Any]


def field_docs(cls: type[Any]) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            text = " ".join(inspect.cleandoc(following.value.value).split())
            docs[node.target.id] = text.replace("``", "`")
    return docs


def build_schema() -> JsonObject:
    """The JSON Schema of a config document."""
    defs: dict[str, JsonObject] = {}
    root = _object_schema(FederationConfig, defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "meshfed deployment config",
        **root,
        "$defs": dict(sorted(defs.items())),
    }


def render_schema() -> str:
    """The schema as the committed file holds it (stable key order, trailing newline)."""
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


def _object_schema(cls: type[Any], defs: dict[str, JsonObject]) -> JsonObject:
    docs = field_docs(cls)
    properties: JsonObject = {}
    required: list[str] = []
    for f in fields_of(cls):
        prop: JsonObject = {}
        doc = docs.get(f.name, "")
        if doc:
            prop["description"] = doc
        prop.update(_type_schema(f.type, defs))
        if f.required:
            required.append(f.key)
        elif DERIVED not in f.field.metadata:
            default = default_json(f.default(), f.type)
            if default is not NO_DEFAULT:
                prop["default"] = default
        properties[f.key] = prop
    schema: JsonObject = {
        "type": "object",
        "description": " ".join(inspect.cleandoc(cls.__doc__ or "").split()).replace("``", "`"),
        "properties": properties,
    }
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def _type_schema(tp: Any, defs: dict[str, JsonObject]) -> JsonObject:
    base, markers = unwrap(tp)
    inner = optional_arg(base)
    if inner is not None:
        return {"anyOf": [_type_schema(inner, defs) | _marker_schema(markers), {"type": "null"}]}
    if any(isinstance(m, ParseSpec) for m in markers):
        return _marker_schema(markers)  # written as a string, whatever it parses into
    return _base_schema(base, defs) | _marker_schema(markers)


def _base_schema(base: Any, defs: dict[str, JsonObject]) -> JsonObject:
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        name = base.__name__
        if name not in defs:
            defs[name] = {}  # placeholder first: recursive models terminate
            defs[name] = _object_schema(base, defs)
        return {"$ref": f"#/$defs/{name}"}
    origin = get_origin(base)
    if origin is tuple:
        return {"type": "array", "items": _type_schema(get_args(base)[0], defs)}
    if origin is Mapping:
        key_type, value_type = get_args(base)
        return {
            "type": "object",
            "propertyNames": _type_schema(key_type, defs),
            "additionalProperties": _type_schema(value_type, defs),
        }
    if origin is Literal:
        return {"enum": list(get_args(base))}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if base in simple:
        return {"type": simple[base]}
    raise TypeError(f"no JSON Schema for {base!r}")


def _marker_schema(markers: tuple[Any, ...]) -> JsonObject:
    out: JsonObject = {}
    for m in markers:
        if isinstance(m, Range):
            if m.minimum is not None:
                out["minimum"] = _number(m.minimum)
            if m.maximum is not None:
                out["maximum"] = _number(m.maximum)
        elif isinstance(m, Items):
            if m.min_items:
                out["minItems"] = m.min_items
            if m.unique:
                out["uniqueItems"] = True
        elif isinstance(m, DurationSpec):
            # A duration is a string in YAML, whatever the Python type.
            out.update({"type": "string", "pattern": DURATION_PATTERN, "format": "duration"})
        elif isinstance(m, StrSpec | ParseSpec):
            out["type"] = "string"
            if m.pattern is not None:
                out["pattern"] = m.pattern
    return out


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


NO_DEFAULT: Any = object()


def default_json(value: Any, tp: Any) -> Any:
    base, markers = unwrap(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(value):
        return NO_DEFAULT  # nested defaults are documented on their own fields
    if any(isinstance(m, DurationSpec) for m in markers) or (
        optional_arg(base) is not None
        and any(isinstance(m, DurationSpec) for m in unwrap(optional_arg(base))[1])
    ):
        return format_duration(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, float):
        return _number(value)
    return value


# -- a validator for the subset above --------------------------------------------------------

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def validate_instance(instance: Any, schema: JsonObject) -> list[str]:
    """Problems of ``instance`` (JSON-like data) against ``schema``, as 'path: message'.

    Supports what :func:`build_schema` emits: type, properties, required,
    additionalProperties, propertyNames, items, minItems, uniqueItems, enum,
    pattern, minimum, maximum, anyOf and local ``$ref`` into ``$defs``.
    """
    problems: list[str] = []
    _validate(instance, schema, schema, "$", problems)
    return problems


def _validate(value: Any, schema: JsonObject, root: JsonObject, path: str, out: list[str]) -> None:
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref}")
        _validate(value, root["$defs"][ref[len("#/$defs/") :]], root, path, out)
    if "anyOf" in schema:
        attempts: list[list[str]] = []
        for alternative in schema["anyOf"]:
            attempt: list[str] = []
            _validate(value, alternative, root, path, attempt)
            if not attempt:
                break
            attempts.append(attempt)
        else:
            # Report the alternative that came closest: its problems are the useful ones.
            closest = attempts[0]
            for attempt in attempts[1:]:
                if len(attempt) < len(closest):
                    closest = attempt
            out.extend(closest)
        return
    expected = schema.get("type")
    if expected is not None:
        kinds = _JSON_TYPES[expected]
        if not isinstance(value, kinds) or (expected != "boolean" and isinstance(value, bool)):
            out.append(f"{path}: expected {expected}, got {type(value).__name__}")
            return
    if "enum" in schema and not any(value == e and type(value) is type(e) for e in schema["enum"]):
        out.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        out.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{path}: {value} is below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{path}: {value} is above {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{path}: fewer than {schema['minItems']} items")
        if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) != len(
            value
        ):
            out.append(f"{path}: items are not unique")
        if "items" in schema:
            for i, item in enumerate(value):
                _validate(item, schema["items"], root, f"{path}[{i}]", out)
    if isinstance(value, dict):
        props: JsonObject = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{path}: missing required property {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if "propertyNames" in schema:
                _validate(key, schema["propertyNames"], root, f"{path}.{key}(name)", out)
            if key in props:
                _validate(item, props[key], root, f"{path}.{key}", out)
            elif extra is False:
                out.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, dict):
                _validate(item, extra, root, f"{path}.{key}", out)
