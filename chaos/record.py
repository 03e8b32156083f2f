"""What a drill run records: one :class:`RequestRecord` per request, one :class:`FaultRecord`
per applied fault, kept in memory as columns and appended to a JSONL file.

Times are seconds from the drill's start (t=0 when traffic starts), taken from the runner's
clock (``trio.current_time() - t0``), never wall-clock time.

The JSONL file has one JSON object per line, ``{"kind": "request", ...}`` or
``{"kind": "fault", ...}``, in the order recorded; :func:`read_records` loads it back and
refuses anything malformed with its line number, so a judge never works on half a file
without saying so.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any, Final, Literal, Self, get_args

Outcome = Literal["ok", "error"]
ParamValue = str | int | float | bool

_REQUEST_FIELDS: Final = (
    "t_start",
    "t_end",
    "source",
    "service",
    "outcome",
    "error_kind",
    "latency",
    "served_by_cluster",
    "served_by_zone",
    "served_by_workload",
)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request (tcp: one connection with one exchange) made by a traffic source."""

    t_start: float
    """When the request was due to start (its schedule, not when a slot freed up), so that
    queueing behind a stuck request counts as latency (no coordinated omission)."""
    t_end: float
    """When the response (or the error) arrived."""
    source: str
    """The traffic source, ``<cluster>/<workload>``."""
    service: str
    """The called service, ``<service>.<namespace>``."""
    outcome: Outcome
    """``ok`` or ``error``."""
    error_kind: str
    """Why it failed (``timeout``, ``reset``, ``refused``, ``5xx``, ...); '' when ok."""
    latency: float
    """``t_end - t_start``, in seconds."""
    served_by_cluster: str
    """Cluster of the workload that answered, as it reported itself; '' if unknown."""
    served_by_zone: str
    """Zone of the workload that answered; '' if unknown."""
    served_by_workload: str
    """The workload (and replica) that answered; '' if unknown."""

    def to_json(self) -> dict[str, Any]:
        """The JSONL object of this record."""
        return {"kind": "request", **{name: getattr(self, name) for name in _REQUEST_FIELDS}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """Build from a JSONL object; ValueError names the first bad field."""
        _exact_keys(data, ("kind", *_REQUEST_FIELDS))
        values: dict[str, Any] = {}
        for name in _REQUEST_FIELDS:
            value = data[name]
            if name in ("t_start", "t_end", "latency"):
                values[name] = _number(name, value)
            else:
                if not isinstance(value, str):
                    raise ValueError(f"{name}: expected a string, got {value!r}")
                values[name] = value
        if values["outcome"] not in get_args(Outcome):
            raise ValueError(f"outcome: expected ok or error, got {values['outcome']!r}")
        return cls(**values)


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One fault the runner applied (one timeline event, or one step of it)."""

    t: float
    """When the injector finished applying it."""
    fault: str
    """The fault kind, as in the drill (``kill``, ``latency``, ...)."""
    target: str
    """The target, in canonical form (``str(Target)``)."""
    params: Mapping[str, ParamValue] = field(default_factory=lambda: MappingProxyType({}))
    """The parameters used (seconds for durations)."""
    verified: bool = False
    """Whether the injector confirmed that the fault took effect (process gone, proxy status
    shows the fault, bundle refused, ...). An unverified fault fails the drill."""
    detail: str = ""
    """How it was verified, or why it could not be."""

    def to_json(self) -> dict[str, Any]:
        """The JSONL object of this record."""
        return {
            "kind": "fault",
            "t": self.t,
            "fault": self.fault,
            "target": self.target,
            "params": dict(self.params),
            "verified": self.verified,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """Build from a JSONL object; ValueError names the first bad field."""
        _exact_keys(data, ("kind", "t", "fault", "target", "params", "verified", "detail"))
        for name in ("fault", "target", "detail"):
            if not isinstance(data[name], str):
                raise ValueError(f"{name}: expected a string, got {data[name]!r}")
        if not isinstance(data["verified"], bool):
            raise ValueError(f"verified: expected true or false, got {data['verified']!r}")
        params = data["params"]
        if not isinstance(params, dict) or not all(
            isinstance(v, str | int | float | bool) for v in params.values()
        ):
            raise ValueError(f"params: expected a mapping of scalars, got {params!r}")
        return cls(
            _number("t", data["t"]),
            data["fault"],
            data["target"],
            MappingProxyType(dict(params)),
            data["verified"],
            data["detail"],
        )


def _exact_keys(data: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in data]
    extra = sorted(set(data) - set(keys))
    if missing or extra:
        raise ValueError(f"missing keys {missing}, unknown keys {extra}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    return float(value)


class _Strings:
    """A column of repetitive strings: one small code per row, each distinct value once."""

    __slots__ = ("codes", "index", "values")

    def __init__(self) -> None:
        self.codes = array("I")
        self.values: list[str] = []
        self.index: dict[str, int] = {}

    def append(self, value: str) -> None:
        code = self.index.get(value)
        if code is None:
            code = self.index[value] = len(self.values)
            self.values.append(value)
        self.codes.append(code)

    def __getitem__(self, row: int) -> str:
        return self.values[self.codes[row]]


class RequestLog:
    """Append-only request records, stored by column.

    Numbers live in ``array('d')`` and strings as codes into a per-column table, so a
    million records take tens of megabytes rather than the ~200 bytes per object of a list
    of dataclasses, and the judge scans one column at a time.
    """

    __slots__ = ("_ok", "_strings", "latency", "t_end", "t_start")

    def __init__(self, records: Iterable[RequestRecord] = ()) -> None:
        self.t_start = array("d")
        self.t_end = array("d")
        self.latency = array("d")
        self._ok = bytearray()
        self._strings = {
            name: _Strings()
            for name in (
                "source",
                "service",
                "error_kind",
                "served_by_cluster",
                "served_by_zone",
                "served_by_workload",
            )
        }
        for record in records:
            self.append(record)

    def append(self, record: RequestRecord) -> None:
        """Add one record at the end."""
        self.t_start.append(record.t_start)
        self.t_end.append(record.t_end)
        self.latency.append(record.latency)
        self._ok.append(record.outcome == "ok")
        for name, column in self._strings.items():
            column.append(getattr(record, name))

    def __len__(self) -> int:
        return len(self.t_start)

    def ok(self, row: int) -> bool:
        """Whether request ``row`` succeeded."""
        return bool(self._ok[row])

    def text(self, name: str, row: int) -> str:
        """String field ``name`` (``source``, ``served_by_zone``, ...) of request ``row``."""
        return self._strings[name][row]

    def __getitem__(self, row: int) -> RequestRecord:
        return RequestRecord(
            t_start=self.t_start[row],
            t_end=self.t_end[row],
            source=self.text("source", row),
            service=self.text("service", row),
            outcome="ok" if self._ok[row] else "error",
            error_kind=self.text("error_kind", row),
            latency=self.latency[row],
            served_by_cluster=self.text("served_by_cluster", row),
            served_by_zone=self.text("served_by_zone", row),
            served_by_workload=self.text("served_by_workload", row),
        )

    def __iter__(self) -> Iterator[RequestRecord]:
        return (self[row] for row in range(len(self)))

    def by_start(self) -> list[int]:
        """Row numbers ordered by ``t_start`` (then by row: stable for equal times)."""
        starts = self.t_start
        return sorted(range(len(self)), key=starts.__getitem__)


class Recorder:
    """The runner's recording seam: keeps every record in memory and, if given a file,
    appends it there as one JSONL line (flushed by :meth:`flush` and :meth:`close`)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.requests = RequestLog()
        self.faults: list[FaultRecord] = []
        self._file: IO[str] | None = open(path, "w", encoding="utf-8") if path else None  # noqa: SIM115  # closed by close()

    def request(self, record: RequestRecord) -> None:
        """Record one finished request."""
        self.requests.append(record)
        self._write(record.to_json())

    def fault(self, record: FaultRecord) -> None:
        """Record one applied (or failed) fault."""
        self.faults.append(record)
        self._write(record.to_json())

    def _write(self, data: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(data, separators=(",", ":"), sort_keys=True) + "\n")

    def flush(self) -> None:
        """Push buffered lines to the file."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file; records stay available in memory."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: str | os.PathLike[str]) -> tuple[RequestLog, tuple[FaultRecord, ...]]:
    """Load a JSONL record file; ValueError names the file and line of the first bad line."""
    log = RequestLog()
    faults: list[FaultRecord] = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object")
                kind = data.get("kind")
                if kind == "request":
                    log.append(RequestRecord.from_json(data))
                elif kind == "fault":
                    faults.append(FaultRecord.from_json(data))
                else:
                    raise ValueError(f"kind must be request or fault, got {kind!r}")
            except ValueError as exc:
                raise ValueError(f"{os.fspath(path)}:{number}: {exc}") from None
    return log, tuple(faults)
