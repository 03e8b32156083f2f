"""Turn composed YAML nodes into model dataclasses, driven by the model's type hints.

The decoder never stops at the first problem: each bad value becomes a
:class:`ConfigIssue` and the value is marked invalid, so the caller gets every
problem in one pass. Two knobs keep cross-reference checking useful after
local errors:

* *partial* list paths (``clusters``, ``services``, ...): an invalid item is
  dropped (and its raw ``name``/``namespace`` remembered) instead of
  invalidating the whole list, so the other items are still checked;
* *lenient* mapping paths: an invalid field that has a default falls back to
  it, so one bad setting does not hide every other error.

Neither can leak a wrong config: any issue means the loader raises.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from federation.config.durations import InvalidDuration, parse_duration
from federation.config.errors import ConfigIssue
from federation.config.model import YAML_KEY
from federation.config.scalars import BadValue, DurationSpec, Items, ParseSpec, Range, StrSpec

_TAG = "tag:yaml.org,2002:"
_KIND_BY_TAG: Final = {
    _TAG + "str": "a string",
    _TAG + "int": "an integer",
    _TAG + "float": "a number",
    _TAG + "bool": "a boolean",
    _TAG + "null": "null",
    _TAG + "timestamp": "a date",
    _TAG + "binary": "binary data",
}


class _Invalid:
    """Marks a value that failed to decode (its issue is already recorded)."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID: Final = _Invalid()

# SafeConstructor does the YAML 1.1 scalar conversions (0x1F, 1_000, .inf, dates) for us.
_CONSTRUCTOR = yaml.SafeLoader("")


def node_line(node: yaml.Node) -> int:
    """1-based line where ``node`` starts."""
    return int(node.start_mark.line) + 1


def join(path: str, key: str) -> str:
    """Dotted path of ``key`` below ``path``."""
    return f"{path}.{key}" if path else key


def describe(node: yaml.Node) -> str:
    """What a node is, for 'expected X, got Y' messages."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    kind = _KIND_BY_TAG.get(node.tag, f"a value tagged {node.tag}")
    value = node.value if len(node.value) <= 40 else node.value[:40] + "..."
    return f"{kind} ({value!r})" if kind != "null" else "null"


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """One dataclass field as the decoder and the schema see it."""

    name: str
    """Python attribute name."""
    key: str
    """YAML key."""
    type: Any
    """Resolved type hint, ``Annotated`` extras included."""
    field: dataclasses.Field[Any]
    """The dataclass field (default, metadata)."""

    @property
    def required(self) -> bool:
        """Whether the YAML must contain the key."""
        return (
            self.field.default is dataclasses.MISSING
            and self.field.default_factory is dataclasses.MISSING
        )

    def default(self) -> Any:
        """The field's default value (call only when not ``required``)."""
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return self.field.default


_FIELDS: dict[type[Any], tuple[FieldInfo, ...]] = {}


def fields_of(cls: type[Any]) -> tuple[FieldInfo, ...]:
    """The fields of a model dataclass, in declaration order."""
    cached = _FIELDS.get(cls)
    if cached is None:
        hints = get_type_hints(cls, include_extras=True)
        cached = tuple(
            FieldInfo(f.name, f.metadata.get(YAML_KEY, f.name), hints[f.name], f)
            for f in dataclasses.fields(cls)
        )
        _FIELDS[cls] = cached
    return cached


def unwrap(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    """Split ``Annotated[T, *markers]`` (possibly nested) into ``T`` and its markers."""
    markers: tuple[Any, ...] = ()
    while get_origin(tp) is Annotated:
        base, *extra = get_args(tp)
        markers = markers + tuple(extra)
        tp = base
    return tp, markers


def optional_arg(tp: Any) -> Any | None:
    """``T`` if ``tp`` is ``T | None``, else None."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(get_args(tp)) != 2:
            raise TypeError(f"unsupported union in the config model: {tp}")
        return args[0]
    return None


def _marker(markers: Iterable[Any], kind: type[Any]) -> Any:
    return next((m for m in markers if isinstance(m, kind)), None)


class Decoder:
    """Decodes one document; read ``issues``, ``lines``, ``kept`` and ``dropped`` afterwards."""

    def __init__(
        self,
        file: str,
        *,
        partial: Iterable[str] = (),
        lenient: Iterable[str] = (),
    ) -> None:
        self.file = file
        self.partial = frozenset(partial)
        self.lenient = frozenset(lenient)
        self.issues: list[ConfigIssue] = []
        #: dotted path -> line of every node decoded
        self.lines: dict[str, int] = {}
        #: partial list path -> original indices of the items kept, in order
        self.kept: dict[str, list[int]] = {}
        #: partial list path -> raw scalar fields (e.g. name) of each dropped item
        self.dropped: dict[str, list[dict[str, str]]] = {}

    def issue(self, line: int, path: str, message: str, hint: str = "") -> _Invalid:
        self.issues.append(ConfigIssue(self.file, line, path, message, hint))
        return INVALID

    def decode(self, node: yaml.Node, tp: Any, path: str) -> Any:
        """Decode ``node`` as ``tp``; record issues and return INVALID on failure."""
        self.lines.setdefault(path, node_line(node))
        base, markers = unwrap(tp)
        inner = optional_arg(base)
        if inner is not None:
            if _is_null(node):
                return None
            return self.decode(node, Annotated[(inner, *markers)] if markers else inner, path)
        if dataclasses.is_dataclass(base) and _marker(markers, ParseSpec) is None:
            return self._dataclass(node, base, path)  # type: ignore[arg-type]
        origin = get_origin(base)
        if origin is tuple:
            return self._list(node, get_args(base)[0], markers, path)
        if origin is Mapping:
            key_type, value_type = get_args(base)
            return self._mapping(node, key_type, value_type, path)
        if origin is Literal:
            return self._literal(node, get_args(base), path)
        return self._scalar(node, base, markers, path)

    # -- containers --------------------------------------------------------------------

    def _dataclass(self, node: yaml.Node, cls: type[Any], path: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            where = f" for {path}" if path else " at the top level"
            return self.issue(
                node_line(node), path, f"expected a mapping{where}, got {describe(node)}"
            )
        fields = fields_of(cls)
        by_key = {f.key: f for f in fields}
        values: dict[str, yaml.Node] = {}
        ok = True
        for key, value in self._keys(node, path):
            if key not in by_key:
                close = difflib.get_close_matches(key, list(by_key), n=1)
                hint = (
                    f"did you mean '{close[0]}'?" if close else "known keys: " + ", ".join(by_key)
                )
                ok = False
                self.issue(node_line(value[0]), join(path, key), f"unknown key '{key}'", hint)
                continue
            values[key] = value[1]
        kwargs: dict[str, Any] = {}
        for f in fields:
            fpath = join(path, f.key)
            if f.key not in values:
                if f.required:
                    ok = False
                    self.issue(
                        node_line(node), fpath, "required key is missing", f"add '{f.key}:' here"
                    )
                continue
            decoded = self.decode(values[f.key], f.type, fpath)
            if decoded is INVALID:
                if path in self.lenient and not f.required:
                    continue
                ok = False
                continue
            kwargs[f.name] = decoded
        if not ok and path not in self.lenient:
            return INVALID
        if not ok and any(f.required and f.name not in kwargs for f in fields):
            return INVALID
        return cls(**kwargs)

    def _keys(
        self, node: yaml.MappingNode, path: str
    ) -> Iterable[tuple[str, tuple[yaml.Node, yaml.Node]]]:
        """String keys of a mapping with their (key, value) nodes; reports duplicates."""
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _TAG + "merge":
                self.issue(
                    node_line(key_node),
                    path,
                    "YAML merge keys ('<<') are not supported",
                    "write the keys out; anchors and aliases of whole values are fine",
                )
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _TAG + "str":
                self.issue(
                    node_line(key_node),
                    path,
                    f"keys must be strings, got {describe(key_node)}",
                    "quote the key; YAML merge keys ('<<') and complex keys are not supported",
                )
                continue
            key = key_node.value
            if key in seen:
                self.issue(
                    node_line(key_node),
                    join(path, key),
                    f"duplicate key '{key}' (first at line {seen[key]})",
                    "remove one of them",
                )
                continue
            seen[key] = node_line(key_node)
            yield key, (key_node, value_node)

    def _list(self, node: yaml.Node, item_type: Any, markers: tuple[Any, ...], path: str) -> Any:
        if not isinstance(node, yaml.SequenceNode):
            return self.issue(node_line(node), path, f"expected a list, got {describe(node)}")
        partial = path in self.partial
        items: list[Any] = []
        kept: list[int] = []
        first_at: dict[Any, int] = {}
        spec: Items | None = _marker(markers, Items)
        ok = True
        for index, item_node in enumerate(node.value):
            ipath = f"{path}[{index}]"
            item = self.decode(item_node, item_type, ipath)
            if item is INVALID:
                if partial:
                    self.dropped.setdefault(path, []).append(_raw_scalars(item_node))
                else:
                    ok = False
                continue
            if spec is not None and spec.unique:
                hashable = _hashable(item)
                if hashable in first_at:
                    ok = False
                    self.issue(
                        node_line(item_node),
                        ipath,
                        f"duplicate entry {_show(item)} (also at {path}[{first_at[hashable]}])",
                        "list each entry once",
                    )
                    continue
                first_at[hashable] = index
            items.append(item)
            kept.append(index)
        if spec is not None and len(node.value) < spec.min_items:
            ok = False
            self.issue(
                node_line(node),
                path,
                f"needs at least {spec.min_items} entr{'y' if spec.min_items == 1 else 'ies'}",
            )
        if partial:
            self.kept[path] = kept
        return tuple(items) if ok else INVALID

    def _mapping(self, node: yaml.Node, key_type: Any, value_type: Any, path: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            return self.issue(node_line(node), path, f"expected a mapping, got {describe(node)}")
        result: dict[Any, Any] = {}
        ok = True
        for key, (key_node, value_node) in self._keys(node, path):
            kpath = join(path, key)
            decoded_key = self.decode(key_node, key_type, kpath)
            decoded_value = self.decode(value_node, value_type, kpath)
            if decoded_key is INVALID or decoded_value is INVALID:
                ok = False
                continue
            result[decoded_key] = decoded_value
        return types.MappingProxyType(result) if ok else INVALID

    # -- scalars -----------------------------------------------------------------------

    def _literal(self, node: yaml.Node, choices: tuple[Any, ...], path: str) -> Any:
        what = path.rsplit(".", 1)[-1].split("[", 1)[0].replace("_", " ") or "value"
        options = ", ".join(str(c) for c in choices)
        if not isinstance(node, yaml.ScalarNode):
            return self.issue(
                node_line(node), path, f"expected one of {options}, got {describe(node)}"
            )
        value = _CONSTRUCTOR.construct_object(node)
        for choice in choices:
            if type(value) is type(choice) and value == choice:
                return choice
        return self.issue(
            node_line(node), path, f"unknown {what} {value!r}", f"use one of {options}"
        )

    def _scalar(self, node: yaml.Node, base: Any, markers: tuple[Any, ...], path: str) -> Any:
        line = node_line(node)
        duration: DurationSpec | None = _marker(markers, DurationSpec)
        parse: ParseSpec | None = _marker(markers, ParseSpec)
        strspec: StrSpec | None = _marker(markers, StrSpec)
        if duration is not None:
            expected = "a duration such as '2s'"
        elif parse is not None:
            expected = parse.description
        elif base is bool:
            expected = "true or false"
        elif base is int:
            expected = "an integer"
        elif base is float:
            expected = "a number"
        elif base is str:
            expected = strspec.description if strspec else "a string"
        else:
            raise TypeError(f"unsupported type in the config model: {base!r} at {path}")
        if not isinstance(node, yaml.ScalarNode):
            return self.issue(line, path, f"expected {expected}, got {describe(node)}")
        tag = node.tag
        want_str = duration is not None or parse is not None or base is str
        if want_str and tag != _TAG + "str":
            hint = "quote it" if tag != _TAG + "null" else ""
            if duration is not None and tag in (_TAG + "int", _TAG + "float"):
                hint = f"add a unit, e.g. '{node.value}s' or '{node.value}ms'"
            return self.issue(line, path, f"expected {expected}, got {describe(node)}", hint)
        try:
            if duration is not None:
                seconds = parse_duration(node.value)
                if duration.positive and seconds <= 0:
                    raise BadValue(f"duration {node.value!r} must be greater than zero")
                return seconds
            if parse is not None:
                return parse.parse(node.value)
            if base is str:
                if strspec is not None:
                    strspec.check(node.value)
                return node.value
        except InvalidDuration as exc:
            return self.issue(
                line, path, str(exc), "use digits with units h, m, s, ms, e.g. '2s', '1h30m'"
            )
        except BadValue as exc:
            return self.issue(line, path, exc.message, exc.hint)
        if base is bool:
            if tag != _TAG + "bool":
                return self.issue(line, path, f"expected {expected}, got {describe(node)}")
            return _CONSTRUCTOR.construct_object(node)
        if tag not in (_TAG + "int",) + ((_TAG + "float",) if base is float else ()):
            return self.issue(line, path, f"expected {expected}, got {describe(node)}")
        number = _CONSTRUCTOR.construct_object(node)
        if base is float:
            number = float(number)
            if not math.isfinite(number):
                return self.issue(line, path, f"expected a finite number, got {node.value!r}")
        bounds: Range | None = _marker(markers, Range)
        if bounds is not None:
            low, high = bounds.minimum, bounds.maximum
            if (low is not None and number < low) or (high is not None and number > high):
                return self.issue(
                    line, path, f"{number!r} is out of range", f"use {_range_text(low, high)}"
                )
        return number


def _range_text(low: float | None, high: float | None) -> str:
    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    if low is not None and high is not None:
        return f"a value from {fmt(low)} to {fmt(high)}"
    if low is not None:
        return f"a value of at least {fmt(low)}"
    return f"a value of at most {fmt(high)}" if high is not None else "another value"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _TAG + "null"


def _raw_scalars(node: yaml.Node) -> dict[str, str]:
    """String scalar fields of a mapping node, for naming an item that failed to decode."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {
        k.value: v.value
        for k, v in node.value
        if isinstance(k, yaml.ScalarNode) and isinstance(v, yaml.ScalarNode)
    }


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str | int | float) else f"'{value}'"
