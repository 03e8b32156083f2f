"""Request-target normalisation: one canonical path before route and policy matching.

A route or policy written for ``/admin`` must hold for every spelling of ``/admin`` an
attacker can send (``/%61dmin``, ``//admin``, ``/x/../admin``, ``/./admin``,
``/%2e%2e/admin``). So every request path goes through :func:`normalize_path` once,
the result is what routes match, what the access log records, and what is forwarded
upstream (so the upstream never interprets a different path than the one matched).

Steps, in order (Envoy's ``normalize_path`` + ``merge_slashes`` +
``path_with_escaped_slashes_action``):

1. Split the query off at the first ``?``; the query is kept byte for byte. A ``#``
   (fragment) or any byte outside visible ASCII refuses the request.
2. Percent-decoding: escapes of unreserved characters (``A-Z a-z 0-9 - . _ ~``) are
   decoded (RFC 3986 6.2.2.2); other escapes are kept, upper-cased. Malformed escapes
   (``%4``, ``%zz``) and escapes of control characters (``%00``-``%1F``, ``%7F``) refuse.
3. Encoded separators ``%2F`` and ``%5C`` and a raw ``\\`` refuse by default
   (:attr:`SlashAction.REJECT`): decoding them changes the segment structure, and
   leaving them lets a Windows or decoding backend see ``/admin`` where we saw one
   segment ``..%2Fadmin``. :attr:`SlashAction.DECODE` instead turns all three into
   ``/`` before the next steps.
4. Empty segments are merged (``//`` -> ``/``).
5. Dot segments are removed (RFC 3986 5.2.4). ``..`` above the root is clamped at
   the root (``/../a`` -> ``/a``), as RFC 3986, Envoy and browsers do. Clamping is
   safe here because the clamped path is the one matched *and* forwarded.

A trailing ``/`` is kept (``/a/`` and ``/a`` are distinct resources). Matching is
case-sensitive (RFC 3986 paths are). The result is idempotent: normalising a
normalised path returns it unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Final

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
MAX_TARGET_LENGTH: Final = 8192
"""Longest request target accepted (bytes); longer answers 414."""


class SlashAction(enum.Enum):
    """What to do with ``%2F``, ``%5C`` and ``\\`` in a path."""

    REJECT = "reject"
    """Refuse the request with 400 (the default)."""
    DECODE = "decode"
    """Treat each as ``/``, then merge and resolve dot segments."""


class BadPath(ValueError):
    """The request target cannot be normalised safely; answer ``status``."""

    status: ClassVar[int] = 400

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        """Stable metric label (``bad_escape``, ``escaped_slash``, ...)."""


class PathTooLong(BadPath):
    """The request target exceeds :data:`MAX_TARGET_LENGTH`."""

    status: ClassVar[int] = 414


@dataclass(frozen=True, slots=True)
class RequestPath:
    """A normalised origin-form request target."""

    path: str
    """Canonical path: starts with ``/``; no ``//``, ``/./``, ``/../``; only needed escapes."""
    query: str | None
    """Everything after the first ``?``, untouched; None when there was no ``?``."""

    @property
    def target(self) -> str:
        """The request target to forward upstream."""
        return self.path if self.query is None else f"{self.path}?{self.query}"


def _decode(raw: str, slashes: SlashAction) -> str:
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == "%":
            hexpair = raw[i + 1 : i + 3]
            if len(hexpair) != 2 or not set(hexpair) <= _HEX:
                raise BadPath("bad_escape", repr(raw[i : i + 3]))
            ch = chr(int(hexpair, 16))
            if ch in _UNRESERVED:
                out.append(ch)
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                raise BadPath("control_character", f"%{hexpair}")
            elif ch in "/\\":
                if slashes is SlashAction.REJECT:
                    raise BadPath("escaped_slash", f"%{hexpair}")
                out.append("/")
            else:
                out.append("%" + hexpair.upper())
            i += 3
            continue
        if c == "\\":
            if slashes is SlashAction.REJECT:
                raise BadPath("backslash")
            out.append("/")
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")[1:]
    out: list[str] = []
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg not in ("", "."):
            out.append(seg)
    # The last segment decides the trailing slash: "/a/" and "/a/." and "/a/b/.." all
    # name a directory-like resource, as in RFC 3986's algorithm.
    trailing = segments[-1] in ("", ".", "..") and bool(out)
    return "/" + "/".join(out) + ("/" if trailing else "")


def normalize_path(target: str | bytes, slashes: SlashAction = SlashAction.REJECT) -> RequestPath:
    """The canonical form of an origin-form request target (``/path?query``).

    Raises :class:`BadPath` (400) or :class:`PathTooLong` (414) with a stable ``reason``.
    Absolute-form targets must be reduced to origin form by the framing layer first.
    """
    if isinstance(target, bytes):
        try:
            target = target.decode("ascii")
        except UnicodeDecodeError:
            raise BadPath("non_ascii") from None
    if len(target) > MAX_TARGET_LENGTH:
        raise PathTooLong("too_long", f"{len(target)} bytes")
    if not target.startswith("/"):
        raise BadPath("not_origin_form", repr(target[:32]))
    for c in target:
        if not "\x21" <= c <= "\x7e":
            raise BadPath("control_character" if c < "\x21" or c == "\x7f" else "non_ascii")
    if "#" in target:
        raise BadPath("fragment")
    raw_path, sep, query = target.partition("?")
    path = _remove_dot_segments(_decode(raw_path, slashes))
    return RequestPath(path, query if sep else None)


def is_normalized(path: str) -> bool:
    """Whether ``path`` is already canonical (what config paths must be to match)."""
    try:
        return normalize_path(path).target == path
    except BadPath:
        return False


__all__ = [
    "MAX_TARGET_LENGTH",
    "BadPath",
    "PathTooLong",
    "RequestPath",
    "SlashAction",
    "is_normalized",
    "normalize_path",
]
