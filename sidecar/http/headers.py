"""Header lists as both h11 and h2 (``header_encoding=None``) hand them over: bytes pairs.

Only the hop-by-hop rule lives here, because HTTP/1.1 and HTTP/2 forwarding share it
(RFC 9110 section 7.6.1): a proxy removes the fixed connection-specific fields and every
field named in ``Connection`` before forwarding, so a client cannot make the sidecar
forward ``Connection: close, x-meshfed-...`` style instructions to the next hop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

Header = tuple[bytes, bytes]
"""One field line: lower-case name, value (h11 and h2 both lower-case names)."""

HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Fields that describe one connection, never the message (RFC 9110 7.6.1, plus the
legacy ``proxy-connection`` and ``keep-alive``). ``content-length`` is not here: it
describes the message, and the framing layer re-derives or re-checks it."""


def get_all(headers: Iterable[Header], name: bytes) -> list[bytes]:
    """Every value of ``name`` (lower-case), in order."""
    return [v for n, v in headers if n == name]


def connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    """Field names listed in ``Connection`` (all lines, comma lists, case-folded)."""
    tokens: set[bytes] = set()
    for value in get_all(headers, b"connection"):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def strip_hop_by_hop(headers: Sequence[Header], *, keep_te_trailers: bool = False) -> list[Header]:
    """``headers`` without hop-by-hop fields and without fields named in ``Connection``.

    ``keep_te_trailers`` keeps ``te: trailers`` (the only ``te`` HTTP/2 allows, and the
    one gRPC requires end to end); any other ``te`` value is still removed.
    """
    named = connection_tokens(headers)
    out: list[Header] = []
    for name, value in headers:
        if name == b"te" and keep_te_trailers and value.strip().lower() == b"trailers":
            out.append((name, b"trailers"))
            continue
        if name in HOP_BY_HOP or name in named:
            continue
        out.append((name, value))
    return out


__all__ = ["HOP_BY_HOP", "Header", "connection_tokens", "get_all", "strip_hop_by_hop"]
