"""The meshfed SNI: one strictly parsed host name that names where a connection goes.

Form (six DNS labels, lower-case, no trailing dot)::

    <service>.<namespace>.<port>.<target-cluster>.<source-cluster>.meshfed

for example ``payments.shop.8443.aws-use1.gcp-euw1.meshfed``: the caller in cluster
``gcp-euw1`` wants port 8443 of service ``payments`` in namespace ``shop``, served by
cluster ``aws-use1``.

Why each piece is there (docs/sni.md has the full story):

* service, namespace, port and target cluster are what a passthrough gateway needs to
  pick an upstream without decrypting.
* the source cluster lets that gateway enforce "route only to services the target
  cluster exports to the caller's cluster" before any byte reaches a workload. The
  claim is not trusted: the destination sidecar checks that the caller's SVID trust
  domain belongs to the claimed source cluster, so lying only gets a refusal.
* the fixed last label ``meshfed`` marks the form. A future form gets a new suffix
  (``meshfed2``), so both can be parsed side by side without a version label.

Invariants: every :class:`MeshSni` instance formats to a valid DNS name of at most
253 bytes, and ``MeshSni.parse(x.format()) == x``. :meth:`MeshSni.parse` accepts
exactly the strings that :meth:`MeshSni.format` can produce; anything else raises
:class:`BadSni` with a stable ``reason``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from federation.names import InvalidName, check_dns_label

SUFFIX: Final = "meshfed"
"""The last label of every meshfed SNI."""

MAX_NAME_LEN: Final = 253
"""RFC 1035 limit on a host name in text form (without the trailing dot)."""

LABEL_COUNT: Final = 6

# No leading zeros, no sign, used with fullmatch (``$`` would allow a
# trailing newline): one spelling per port, so the gateway's route key
# and the destination's check can never disagree about which port was named.
_PORT_RE: Final = re.compile(r"[1-9][0-9]{0,4}")

SniReason = Literal[
    "not_a_string",
    "empty",
    "too_long",
    "not_ascii",
    "not_lowercase",
    "trailing_dot",
    "wrong_label_count",
    "wrong_suffix",
    "bad_service",
    "bad_namespace",
    "bad_port",
    "bad_target_cluster",
    "bad_source_cluster",
]


class BadSni(ValueError):
    """A server name that is not a meshfed SNI.

    ``reason`` is one of :data:`SniReason`, stable and usable as a metric label;
    ``value`` is the offending input, truncated for logs.
    """

    def __init__(self, reason: SniReason, value: object, detail: str = "") -> None:
        self.reason: SniReason = reason
        text = value if isinstance(value, str) else repr(value)
        self.value = text if len(text) <= 80 else text[:77] + "..."
        msg = f"bad meshfed SNI {self.value!r}: {reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


def _check_label(value: object, reason: SniReason, what: str) -> str:
    if not isinstance(value, str):
        raise BadSni(reason, value, f"{what} must be a string")
    try:
        return check_dns_label(value, what)
    except InvalidName as e:
        raise BadSni(reason, value, e.reason) from None


@dataclass(frozen=True, slots=True)
class MeshSni:
    """The destination of one mesh connection, and the cluster the caller claims to be in."""

    service: str
    """Destination service name (RFC 1123 label)."""

    namespace: str
    """Namespace of the destination service (RFC 1123 label)."""

    port: int
    """Destination service port, 1-65535."""

    target_cluster: str
    """Cluster that serves the connection (RFC 1123 label)."""

    source_cluster: str
    """Cluster the caller says it is in; verified against the caller's SVID at the destination."""

    def __post_init__(self) -> None:
        # Validate on construction so that format() cannot fail and no invalid
        # instance ever exists to be routed on.
        _check_label(self.service, "bad_service", "service")
        _check_label(self.namespace, "bad_namespace", "namespace")
        if (
            not isinstance(self.port, int)
            or isinstance(self.port, bool)
            or not 1 <= self.port <= 65535
        ):
            raise BadSni("bad_port", self.port, "port must be an int in 1-65535")
        _check_label(self.target_cluster, "bad_target_cluster", "target cluster")
        _check_label(self.source_cluster, "bad_source_cluster", "source cluster")
        name = self._join()
        if len(name) > MAX_NAME_LEN:
            raise BadSni("too_long", name, f"{len(name)} > {MAX_NAME_LEN} bytes")

    def _join(self) -> str:
        return ".".join(
            (
                self.service,
                self.namespace,
                str(self.port),
                self.target_cluster,
                self.source_cluster,
                SUFFIX,
            )
        )

    def format(self) -> str:
        """The SNI host name for this destination (always valid, at most 253 bytes)."""
        return self._join()

    @classmethod
    def parse(cls, s: object) -> MeshSni:
        """Parse a meshfed SNI strictly; raise :class:`BadSni` for anything else.

        Accepted: exactly six dot-separated labels, all lower-case RFC 1123 labels,
        the fourth-from-last a port 1-65535 without leading zeros, the last
        ``meshfed``, no trailing dot, at most 253 bytes. There is no normalisation:
        upper-case is refused rather than folded, so one destination has exactly
        one spelling.
        """
        if not isinstance(s, str):
            raise BadSni("not_a_string", s)
        if s == "":
            raise BadSni("empty", s)
        # Length first: everything after is linear in it, and junk of any size is cheap.
        if len(s) > MAX_NAME_LEN:
            raise BadSni("too_long", s, f"{len(s)} > {MAX_NAME_LEN} bytes")
        if not s.isascii():
            raise BadSni("not_ascii", s)
        if s != s.lower():
            raise BadSni("not_lowercase", s)
        if s.endswith("."):
            raise BadSni("trailing_dot", s)
        labels = s.split(".")
        if len(labels) != LABEL_COUNT:
            raise BadSni("wrong_label_count", s, f"{len(labels)} labels, want {LABEL_COUNT}")
        service, namespace, port, target, source, suffix = labels
        if suffix != SUFFIX:
            raise BadSni("wrong_suffix", s, f"last label must be {SUFFIX!r}")
        _check_label(service, "bad_service", "service")
        _check_label(namespace, "bad_namespace", "namespace")
        if not _PORT_RE.fullmatch(port) or int(port) > 65535:
            raise BadSni("bad_port", s, "port must be 1-65535 without leading zeros")
        _check_label(target, "bad_target_cluster", "target cluster")
        _check_label(source, "bad_source_cluster", "source cluster")
        return cls(service, namespace, int(port), target, source)

    def __str__(self) -> str:
        return self.format()
