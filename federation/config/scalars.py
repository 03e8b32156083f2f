"""Value types and constraints of the config model, shared by the parser and the schema.

A model field's type says everything both need to know: ``Annotated`` markers
from this module carry the constraint (a range, a duration bound, a string
check with its JSON Schema pattern), so the parser and the JSON Schema
generator read one source of truth.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from federation.names import MAX_LABEL_LEN, InvalidName, check_dns_label


class BadValue(ValueError):
    """A scalar that has the right type but a value the model refuses."""

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


# -- markers read by the parser and the schema generator --------------------------------


@dataclass(frozen=True, slots=True)
class Range:
    """Inclusive numeric bounds for an int or float field."""

    minimum: float | None = None
    """Smallest allowed value, or None for unbounded."""
    maximum: float | None = None
    """Largest allowed value, or None for unbounded."""


@dataclass(frozen=True, slots=True)
class Items:
    """Constraints on a list field."""

    min_items: int = 0
    """Fewest entries allowed."""
    unique: bool = False
    """Whether two equal entries are an error."""


@dataclass(frozen=True, slots=True)
class DurationSpec:
    """Marks a float field written as a duration string (``'2s'``); the value is seconds."""

    positive: bool = False
    """Whether ``0s`` is refused."""


@dataclass(frozen=True, slots=True)
class StrSpec:
    """A string field checked by ``check``, which raises BadValue."""

    check: Callable[[str], None]
    """Raises BadValue naming what is wrong and how to fix it."""
    pattern: str | None
    """ECMA-262 regex for the JSON Schema; looser than ``check`` when the rule is not regular."""
    description: str
    """Short name of the format, used in type errors and the schema."""


@dataclass(frozen=True, slots=True)
class ParseSpec:
    """A field whose YAML form is a string parsed into a structured value by ``parse``."""

    parse: Callable[[str], Any]
    """Converts the string or raises BadValue."""
    pattern: str | None
    """ECMA-262 regex for the JSON Schema."""
    description: str
    """Short name of the format, used in type errors and the schema."""


# -- names ---------------------------------------------------------------------------------

LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


def check_name(value: str) -> None:
    """Accept an RFC 1123 label (federation.names rules); raise BadValue otherwise."""
    try:
        check_dns_label(value)
    except InvalidName as exc:
        shown = value if len(value) <= 40 else value[:40] + "..."
        hint = exc.hint or "use 1-63 lower-case letters, digits and '-', alphanumeric at both ends"
        raise BadValue(f"invalid name {shown!r}: {exc.reason}", hint) from None


TRUST_DOMAIN_PATTERN = r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$"
_TRUST_DOMAIN_RE = re.compile(TRUST_DOMAIN_PATTERN)
MAX_TRUST_DOMAIN_LEN = 255


def check_trust_domain(value: str) -> None:
    """Accept a SPIFFE trust domain name: ``[a-z0-9._-]``, no port, no empty labels."""
    hint = "use lower-case letters, digits, '.', '-' and '_' only, e.g. 'aws-use1.acme.mesh'"
    if value == "":
        raise BadValue("empty trust domain", hint)
    if ":" in value:
        raise BadValue(f"trust domain {value!r} contains a port or scheme", hint)
    if len(value) > MAX_TRUST_DOMAIN_LEN:
        raise BadValue(f"trust domain is longer than {MAX_TRUST_DOMAIN_LEN} characters", hint)
    if value.lower() != value:
        raise BadValue(f"trust domain {value!r} has upper-case letters", hint)
    if not _TRUST_DOMAIN_RE.match(value):
        raise BadValue(f"invalid trust domain {value!r}", hint)


_HOSTNAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
HOST_PATTERN = r"^[0-9a-zA-Z.:_-]+$"


def check_host(value: str) -> None:
    """Accept an IPv4/IPv6 literal (no brackets) or a lower-case DNS host name."""
    hint = "use an IP address such as '127.0.0.2' or a host name such as 'gw.aws-use1.example'"
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    labels = value.split(".")
    if (
        not value
        or len(value) > 253
        or any(len(label) > MAX_LABEL_LEN for label in labels)
        or not _HOSTNAME_RE.match(value)
    ):
        raise BadValue(f"invalid host {value!r}", hint)


SPIFFE_ID_PATTERN = r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+$"
_SPIFFE_PATH_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_SPIFFE_ID_LEN = 2048


def check_spiffe_id(value: str) -> None:
    """Accept a workload SPIFFE ID (``spiffe://<trust-domain>/<path>``) per the SPIFFE spec."""
    hint = "use spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    if len(value.encode()) > MAX_SPIFFE_ID_LEN:
        raise BadValue(f"SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes", hint)
    if not value.startswith("spiffe://"):
        raise BadValue(f"SPIFFE ID {value!r} does not start with 'spiffe://'", hint)
    domain, sep, path = value[len("spiffe://") :].partition("/")
    try:
        check_trust_domain(domain)
    except BadValue as exc:
        raise BadValue(f"SPIFFE ID {value!r}: {exc.message}", hint) from None
    if not sep or not path:
        raise BadValue(f"SPIFFE ID {value!r} has no path", hint)
    for segment in path.split("/"):
        if segment in ("", ".", "..") or not _SPIFFE_PATH_SEGMENT_RE.match(segment):
            raise BadValue(f"SPIFFE ID {value!r} has an invalid path segment {segment!r}", hint)


def spiffe_trust_domain(spiffe_id: str) -> str:
    """The trust domain of an already-checked SPIFFE ID."""
    return spiffe_id[len("spiffe://") :].partition("/")[0]


LABEL_KEY_PATTERN = r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$"
_LABEL_KEY_RE = re.compile(LABEL_KEY_PATTERN)
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
_LABEL_VALUE_RE = re.compile(LABEL_VALUE_PATTERN)


def check_label_key(value: str) -> None:
    """Accept a workload label key: lower-case, 1-63 of ``[a-z0-9._-]``, alphanumeric ends."""
    if not _LABEL_KEY_RE.match(value):
        raise BadValue(
            f"invalid label key {value!r}",
            "use 1-63 lower-case letters, digits, '-', '_' and '.', e.g. 'version'",
        )


def check_label_value(value: str) -> None:
    """Accept a workload label value: 1-63 of ``[A-Za-z0-9._-]``, alphanumeric ends."""
    if not _LABEL_VALUE_RE.match(value):
        raise BadValue(
            f"invalid label value {value!r}",
            "use 1-63 letters, digits, '-', '_' and '.', e.g. 'v2'",
        )


EXPORT_TARGET_PATTERN = r"^(\*|[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)$"


def check_export_target(value: str) -> None:
    """Accept a cluster name or ``*`` (every cluster)."""
    if value != "*":
        check_name(value)


HTTP_PATH_PATTERN = r"^/[\x21-\x7e]*$"
_HTTP_PATH_RE = re.compile(HTTP_PATH_PATTERN)


def check_http_path(value: str) -> None:
    """Accept an HTTP path for route matching: starts with '/', visible ASCII only."""
    if not _HTTP_PATH_RE.match(value):
        raise BadValue(
            f"invalid HTTP path {value!r}", "start with '/' and use visible ASCII without spaces"
        )


HEADER_NAME_PATTERN = r"^[a-z0-9!#$%&'*+.^_`|~-]+$"
_HEADER_NAME_RE = re.compile(HEADER_NAME_PATTERN)


def check_header_name(value: str) -> None:
    """Accept a lower-case HTTP header field name (HTTP/2 forbids upper case)."""
    if not _HEADER_NAME_RE.match(value):
        raise BadValue(
            f"invalid header name {value!r}", "use a lower-case token such as 'x-canary'"
        )


# -- structured scalars --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class HostPort:
    """A socket address written ``host:port`` (``[v6]:port`` for IPv6)."""

    host: str
    """IP literal (without brackets) or DNS host name."""
    port: int
    """TCP port, 1-65535."""

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


HOST_PORT_PATTERN = r"^(\[[0-9a-fA-F:.]+\]|[0-9a-zA-Z._-]+):[0-9]{1,5}$"


def parse_host_port(text: str) -> HostPort:
    """Parse ``host:port``; raise BadValue naming the broken part."""
    hint = "write host:port, e.g. '127.0.0.1:9001' or '[::1]:9001'"
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise BadValue(f"address {text!r} has no port", hint)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise BadValue(f"address {text!r}: brackets are only for IPv6", hint)
    elif ":" in host:
        raise BadValue(f"address {text!r}: put an IPv6 host in brackets", hint)
    try:
        check_host(host)
    except BadValue as exc:
        raise BadValue(f"address {text!r}: {exc.message}", hint) from None
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise BadValue(f"address {text!r}: port must be 1-65535", hint)
    return HostPort(host, int(port_text))


@dataclass(frozen=True, slots=True, order=True)
class ServiceRef:
    """A service named ``<name>.<namespace>``, e.g. ``payments.shop``."""

    name: str
    """Service name (RFC 1123 label)."""
    namespace: str
    """Namespace (RFC 1123 label)."""

    def __str__(self) -> str:
        return f"{self.name}.{self.namespace}"


SERVICE_REF_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


def parse_service_ref(text: str) -> ServiceRef:
    """Parse ``<name>.<namespace>``; raise BadValue if either part is not a valid name."""
    hint = "write <service>.<namespace>, e.g. 'payments.shop'"
    name, sep, namespace = text.partition(".")
    if not sep:
        raise BadValue(f"service reference {text!r} has no namespace", hint)
    for part in (name, namespace):
        try:
            check_name(part)
        except BadValue as exc:
            raise BadValue(f"service reference {text!r}: {exc.message}", hint) from None
    return ServiceRef(name, namespace)


# -- the aliases the model uses ------------------------------------------------------------

Name = Annotated[str, StrSpec(check_name, LABEL_PATTERN, "name (RFC 1123 label)")]
TrustDomain = Annotated[str, StrSpec(check_trust_domain, TRUST_DOMAIN_PATTERN, "trust domain")]
ExportTarget = Annotated[
    str, StrSpec(check_export_target, EXPORT_TARGET_PATTERN, "cluster name or '*'")
]
Host = Annotated[str, StrSpec(check_host, HOST_PATTERN, "host (IP address or DNS name)")]
SpiffeId = Annotated[str, StrSpec(check_spiffe_id, SPIFFE_ID_PATTERN, "SPIFFE ID")]
LabelKey = Annotated[str, StrSpec(check_label_key, LABEL_KEY_PATTERN, "label key")]
LabelValue = Annotated[str, StrSpec(check_label_value, LABEL_VALUE_PATTERN, "label value")]
HttpPath = Annotated[str, StrSpec(check_http_path, HTTP_PATH_PATTERN, "HTTP path")]
HeaderName = Annotated[str, StrSpec(check_header_name, HEADER_NAME_PATTERN, "header name")]
Port = Annotated[int, Range(1, 65535)]
Percent = Annotated[float, Range(0, 100)]
Duration = Annotated[float, DurationSpec()]
PositiveDuration = Annotated[float, DurationSpec(positive=True)]
Address = Annotated[HostPort, ParseSpec(parse_host_port, HOST_PORT_PATTERN, "host:port")]
ServiceName = Annotated[
    ServiceRef, ParseSpec(parse_service_ref, SERVICE_REF_PATTERN, "<service>.<namespace>")
]
