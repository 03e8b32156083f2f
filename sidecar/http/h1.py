"""HTTP/1.1 framing for the sidecar, over h11, with request-smuggling defences.

Sans-IO, like h11 itself: ``receive_data(bytes)`` then ``next_event()`` until
:data:`NEED_DATA`; ``send_*`` return the bytes to write. Bodies stream as
:class:`BodyData` events in and ``send_data`` bytes out; nothing buffers a body.

**Smuggling defences.** A proxy and the server behind it must agree on where each
message ends. h11 is strict about most framing, but (tested against h11 0.16 with raw
bytes in tests/sidecar_http/test_h1.py) it *accepts* several inputs that desynchronise
a chain of parsers, so every head (request or response) is checked on its raw bytes
before h11 sees it, by :func:`check_head`:

===============================================  ==========  ============================
input                                            h11 alone   here
===============================================  ==========  ============================
``Content-Length`` and ``Transfer-Encoding``     accepted    400 ``cl_and_te``
two ``Content-Length`` lines, equal values       merged      400 ``duplicate_content_length``
``Content-Length: 5, 5``                         merged      400 ``bad_content_length``
``Content-Length: 5`` / ``6`` (conflicting)      400         400 ``duplicate_content_length``
``Transfer-Encoding`` on an HTTP/1.0 message     accepted    400 ``te_in_http10``
TE not ending in ``chunked`` (``identity``,      501         400 ``te_not_chunked`` (RFC
``xchunked``, ``gzip``)                                      9112 6.3: length unknowable)
``chunked`` applied twice                        501         400 ``te_not_chunked``
``gzip, chunked``                                501         501 ``te_unsupported``
obs-fold (a line starting with SP/HTAB)          unfolded    400 ``obs_fold``
bare LF line ends                                accepted    400 ``bare_lf``
control characters in a value (``\\x01``)         accepted    400 ``bad_header_value``
a head bigger than ``max_head_bytes``            only if     431 ``head_too_large``
                                                 incomplete
more than ``max_headers`` fields                 accepted    431 ``too_many_headers``
===============================================  ==========  ============================

h11 itself refuses (400) what the checker lets through: NUL in values, spaces before
the colon or inside names, bare CR, a missing or repeated ``Host``, bad chunk sizes.

**Re-framing.** The framing headers of an incoming message are never forwarded: the
head events carry ``content_length`` / ``chunked`` and the headers without
``content-length``, ``transfer-encoding`` and every hop-by-hop field
(:func:`~sidecar.http.headers.strip_hop_by_hop`); ``send_*`` re-derive framing through
h11. So whatever two parsers might disagree on never reaches the next hop.

One h11 connection is used per message exchange; bytes past the end of a message
(pipelined requests) carry over into the next exchange, where they are checked again.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final, Literal

import h11

from sidecar.http.headers import Header, connection_tokens, strip_hop_by_hop
from sidecar.http.paths import BadPath, RequestPath, SlashAction, normalize_path

_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_ABSOLUTE: Final = re.compile(rb"https?://[^/?#]+([/?].*)?", re.IGNORECASE)
_BARE_LF: Final = re.compile(rb"(?:^|[^\r])\n")
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})


@dataclass(frozen=True, slots=True)
class H1Limits:
    """Size limits for one HTTP/1.1 connection."""

    max_head_bytes: int = 16 * 1024
    """Start line plus fields plus the blank line; above it: 431 (Envoy's 60 KiB is
    for edge proxies; apps in the mesh send small heads)."""
    max_headers: int = 100
    """Field lines per head (Envoy's default); above it: 431."""
    slashes: SlashAction = SlashAction.REJECT
    """What ``%2F``/``%5C``/``\\`` in a request path mean (see paths.py)."""

    def __post_init__(self) -> None:
        if self.max_head_bytes < 64 or self.max_headers < 1:
            raise ValueError("max_head_bytes must be >= 64 and max_headers >= 1")


class Refusal(Exception):
    """A message the sidecar will not forward. For requests answer ``status`` and close;
    for upstream responses answer 502 to the caller and discard the connection."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{status} {reason}" + (f": {detail}" if detail else ""))
        self.status = status
        """HTTP status to answer (400, 414, 431, 501, or 502 for a bad upstream)."""
        self.reason = reason
        """Stable metric label."""


@dataclass(frozen=True, slots=True)
class Framing:
    """How a checked head says its body is delimited."""

    content_length: int | None
    """Exact body length, or None."""
    chunked: bool
    """Chunked transfer coding."""


def check_head(head: bytes, limits: H1Limits, *, is_request: bool = True) -> Framing:
    """Check one raw head (start line through the blank line, CRLF-terminated).

    Raises :class:`Refusal`. Pure: the tests call it on raw bytes directly.
    """
    if len(head) > limits.max_head_bytes:
        raise Refusal(431, "head_too_large", f"{len(head)} bytes")
    body = head[:-4] if head.endswith(b"\r\n\r\n") else head
    if b"\n" in body.replace(b"\r\n", b""):
        raise Refusal(400, "bare_lf")
    lines = body.split(b"\r\n")
    start, fields = lines[0], lines[1:]
    if len(fields) > limits.max_headers:
        raise Refusal(431, "too_many_headers", f"{len(fields)} fields")
    http10 = start.endswith(b" HTTP/1.0") if is_request else start.startswith(b"HTTP/1.0 ")
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for line in fields:
        if line[:1] in (b" ", b"\t"):
            raise Refusal(400, "obs_fold")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise Refusal(400, "bad_header_name", repr(name[:40]))
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise Refusal(400, "bad_header_value", name.decode("ascii"))
        lname = name.lower()
        if lname == b"content-length":
            lengths.append(value)
        elif lname == b"transfer-encoding":
            codings.extend(c.strip(b" \t").lower() for c in value.split(b","))
    if len(lengths) > 1:
        raise Refusal(400, "duplicate_content_length")
    if lengths and not (lengths[0].isdigit() and len(lengths[0]) <= 18):
        raise Refusal(400, "bad_content_length", repr(lengths[0][:20]))
    if not codings:
        return Framing(int(lengths[0]) if lengths else None, chunked=False)
    if http10:
        raise Refusal(400, "te_in_http10")
    if lengths:
        raise Refusal(400, "cl_and_te")
    if codings[-1] != b"chunked" or codings.count(b"chunked") != 1 or b"" in codings:
        raise Refusal(400, "te_not_chunked", b", ".join(codings).decode("latin-1"))
    if len(codings) > 1:
        # Understood framing, but a coding we would have to decode to re-frame.
        raise Refusal(501, "te_unsupported", b", ".join(codings).decode("latin-1"))
    return Framing(None, chunked=True)


class _Need(enum.Enum):
    NEED_DATA = "need_data"
    PAUSED = "paused"


NEED_DATA: Final = _Need.NEED_DATA
"""Feed more bytes (``receive_data``) before calling ``next_event`` again."""
PAUSED: Final = _Need.PAUSED
"""The message is complete; finish the exchange (send/receive the other side) first."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A checked request head, ready to route."""

    method: str
    """Upper-case method."""
    path: RequestPath
    """Normalised path and untouched query: match on ``path.path``, forward ``path.target``."""
    authority: bytes
    """``Host`` (or the absolute-form authority)."""
    headers: list[Header]
    """Lower-case fields without framing and hop-by-hop fields (``host`` kept)."""
    framing: Framing
    """Body delimitation as received."""
    http_version: Literal["1.0", "1.1"]
    """Protocol version of the request."""
    keep_alive: bool
    """Whether the client may send another request on this connection."""
    expect_continue: bool
    """The client waits for ``100 Continue`` before sending the body."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A checked response head from upstream (final or 1xx)."""

    status: int
    """Status code."""
    headers: list[Header]
    """Lower-case fields without framing and hop-by-hop fields."""
    framing: Framing
    """Body delimitation as received (``content_length`` None and not chunked:
    delimited by close)."""


@dataclass(frozen=True, slots=True)
class BodyData:
    """A piece of body, in arrival order."""

    data: bytes
    """The bytes (never empty)."""


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The message is complete."""

    trailers: list[Header] = field(default_factory=list)
    """Trailer fields (chunked only), hop-by-hop ones removed."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection cleanly between messages."""


Event = RequestHead | ResponseHead | BodyData | MessageEnd | ConnectionClosed | _Need


def _forwardable(headers: Sequence[Header]) -> list[Header]:
    kept = strip_hop_by_hop(headers)
    return [(n, v) for n, v in kept if n not in _FRAMING]


def _find_head_end(buf: bytearray) -> int:
    """Index just past the blank line ending the head, or -1."""
    i = buf.find(b"\r\n\r\n")
    return -1 if i < 0 else i + 4


class _H1Base:
    role: type[h11._util.Sentinel]

    def __init__(self, limits: H1Limits | None = None) -> None:
        self.limits = limits if limits is not None else H1Limits()
        self._buf = bytearray()
        self._eof = False
        self._conn = self._new_conn()
        self._in_head = True
        self._refusal: Refusal | None = None

    def _new_conn(self) -> h11.Connection:
        return h11.Connection(self.role, max_incomplete_event_size=self.limits.max_head_bytes)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means the peer closed its sending side."""
        if not data:
            self._eof = True
        if self._in_head:
            self._buf += data
        else:
            self._conn.receive_data(data)

    def _take_head(self) -> bytes | None:
        """The next raw head from the buffer, checked for size; None if incomplete."""
        # RFC 9112 2.2: ignore empty lines before a request line (bounded by the size check).
        while self._buf.startswith(b"\r\n"):
            del self._buf[:2]
        end = _find_head_end(self._buf)
        if end < 0:
            # A head that only uses bare LFs never shows CRLFCRLF: refuse it now rather
            # than wait for the size limit.
            if _BARE_LF.search(self._buf):
                raise Refusal(400, "bare_lf")
            if len(self._buf) > self.limits.max_head_bytes:
                raise Refusal(431, "head_too_large", f"over {self.limits.max_head_bytes} bytes")
            return None
        head = bytes(self._buf[:end])
        del self._buf[:end]
        return head

    def _h11_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise Refusal(exc.error_status_hint, "malformed", str(exc)) from None

    def _body_event(self) -> Event:
        ev = self._h11_event()
        if isinstance(ev, h11.Data):
            return BodyData(bytes(ev.data)) if ev.data else self._body_event()
        if isinstance(ev, h11.EndOfMessage):
            return MessageEnd(_forwardable(list(ev.headers)))
        if ev is h11.PAUSED:
            return PAUSED
        if ev is h11.NEED_DATA:
            return NEED_DATA
        raise Refusal(400, "malformed", f"unexpected {type(ev).__name__}")

    def _carry_over(self) -> None:
        """Start a fresh h11 exchange, keeping unparsed bytes for the next head check."""
        trailing, closed = self._conn.trailing_data
        self._buf = bytearray(trailing) + self._buf
        self._eof = self._eof or closed
        self._conn = self._new_conn()
        self._in_head = True


class H1ServerConnection(_H1Base):
    """The side facing an HTTP/1.1 client (the local app, outbound): requests in,
    responses out. A :class:`Refusal` from :meth:`next_event` is final: write
    :func:`refusal_response` and close."""

    role = h11.SERVER

    def next_event(self) -> Event:
        """The next event; raises :class:`Refusal` for a request not to be forwarded."""
        if self._refusal is not None:
            raise self._refusal
        try:
            return self._next()
        except Refusal as refusal:
            self._refusal = refusal
            raise

    def _next(self) -> Event:
        if not self._in_head:
            return self._body_event()
        if self._conn.our_state is not h11.IDLE:
            return PAUSED
        head = self._take_head()
        if head is None:
            if self._eof:
                if self._buf:
                    raise Refusal(400, "truncated_head")
                return ConnectionClosed()
            return NEED_DATA
        framing = check_head(head, self.limits, is_request=True)
        self._conn.receive_data(head)
        ev = self._h11_event()
        if not isinstance(ev, h11.Request):  # a complete, checked head always parses
            raise Refusal(400, "malformed", type(ev).__name__)
        self._in_head = False
        if self._buf or self._eof:
            rest, self._buf = bytes(self._buf), bytearray()
            self._conn.receive_data(rest)
            if self._eof:
                self._conn.receive_data(b"")
        return self._request_head(ev, framing)

    def _request_head(self, ev: h11.Request, framing: Framing) -> RequestHead:
        method = ev.method.decode("ascii")
        if method == "CONNECT":
            raise Refusal(405, "connect_not_supported")
        target = bytes(ev.target)
        headers = list(ev.headers)
        authority = next((v for n, v in headers if n == b"host"), b"")
        m = _ABSOLUTE.fullmatch(target)
        if m is not None:
            # Absolute form (an app configured to use us as its proxy): RFC 9112 3.2.2
            # says the target's authority wins over Host.
            authority = target.split(b"/", 3)[2]
            target = m.group(1) or b"/"
            if target.startswith(b"?"):
                target = b"/" + target
            headers = [(n, v) for n, v in headers if n != b"host"] + [(b"host", authority)]
        try:
            path = normalize_path(target, self.limits.slashes)
        except BadPath as exc:
            raise Refusal(exc.status, f"path_{exc.reason}", str(exc)) from None
        return RequestHead(
            method=method,
            path=path,
            authority=authority,
            headers=_forwardable(headers),
            framing=framing,
            http_version="1.0" if ev.http_version == b"1.0" else "1.1",
            keep_alive=ev.http_version == b"1.1" and b"close" not in connection_tokens(ev.headers),
            expect_continue=self._conn.they_are_waiting_for_100_continue,
        )

    def send_continue(self) -> bytes:
        """``100 Continue`` (send it when the upstream is ready for the body)."""
        return self._conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""

    def send_response(
        self,
        status: int,
        headers: Sequence[Header],
        content_length: int | None = None,
        *,
        close: bool = False,
    ) -> bytes:
        """The response head; without ``content_length`` h11 chunks (HTTP/1.1 clients)
        or delimits by close (HTTP/1.0). Framing and hop-by-hop fields in ``headers``
        are dropped. ``close`` adds ``Connection: close`` (a draining server): the
        exchange then ends the connection (:attr:`reusable` is False)."""
        out = _forwardable(headers)
        if content_length is not None:
            out.append((b"content-length", str(content_length).encode("ascii")))
        if close:
            out.append((b"connection", b"close"))
        # A reason phrase, though RFC 9112 lets it be empty: some clients' parsers
        # (nghttp2's h2load, older http-parser users) never report an empty one.
        return (
            self._conn.send(h11.Response(status_code=status, headers=out, reason=_phrase(status)))
            or b""
        )

    def send_data(self, data: bytes) -> bytes:
        """Body bytes framed for the wire."""
        return self._conn.send(h11.Data(data=data)) or b""

    def send_end(self, trailers: Sequence[Header] = ()) -> bytes:
        """End of the response (trailers only go out on a chunked response)."""
        return self._conn.send(h11.EndOfMessage(headers=_forwardable(trailers))) or b""

    @property
    def reusable(self) -> bool:
        """Whether both messages completed and the connection can carry another exchange."""
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        """After a complete exchange (:attr:`reusable`): expect the next request."""
        if not self.reusable:
            raise RuntimeError("exchange not complete; close the connection instead")
        self._carry_over()


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def refusal_response(refusal: Refusal) -> bytes:
    """The bytes answering a refused request: a bodiless response that closes."""
    try:
        phrase = HTTPStatus(refusal.status).phrase
    except ValueError:
        phrase = ""
    return (
        f"HTTP/1.1 {refusal.status} {phrase}\r\n"
        f"content-length: 0\r\nconnection: close\r\n"
        f"x-meshfed-refused: {refusal.reason}\r\n\r\n"
    ).encode("ascii")


class H1ClientConnection(_H1Base):
    """The side facing an HTTP/1.1 server (the local app, inbound; or an HTTP/1.1
    upstream): requests out, responses in. A :class:`Refusal` means a response not
    to be trusted: answer 502 to the caller and discard the connection."""

    role = h11.CLIENT

    def send_request(
        self,
        method: str,
        target: str,
        headers: Sequence[Header],
        content_length: int | None = None,
    ) -> bytes:
        """The request head (``headers`` must include ``host``). Without
        ``content_length`` a request with a body is chunked; pass 0 for none."""
        out = _forwardable(headers)
        if content_length is not None:
            out.append((b"content-length", str(content_length).encode("ascii")))
        elif method in ("GET", "HEAD", "DELETE", "OPTIONS"):
            # Bodiless by default for these; h11 would otherwise chunk an empty body.
            out.append((b"content-length", b"0"))
        else:
            # h11 frames a request with neither field as bodiless (it only chunks
            # responses by itself), so say chunked explicitly.
            out.append((b"transfer-encoding", b"chunked"))
        return self._conn.send(h11.Request(method=method, target=target, headers=out)) or b""

    def send_data(self, data: bytes) -> bytes:
        """Request body bytes framed for the wire."""
        return self._conn.send(h11.Data(data=data)) or b""

    def send_end(self, trailers: Sequence[Header] = ()) -> bytes:
        """End of the request."""
        return self._conn.send(h11.EndOfMessage(headers=_forwardable(trailers))) or b""

    def next_event(self) -> Event:
        """The next response event; raises :class:`Refusal` (502) for a bad response."""
        if self._refusal is not None:
            raise self._refusal
        try:
            return self._next()
        except Refusal as refusal:
            bad = Refusal(502, f"upstream_{refusal.reason}", str(refusal))
            self._refusal = bad
            raise bad from None

    def _next(self) -> Event:
        if not self._in_head:
            return self._body_event()
        head = self._take_head()
        if head is None:
            if self._eof:
                raise Refusal(502, "truncated_head" if self._buf else "closed_before_response")
            return NEED_DATA
        framing = check_head(head, self.limits, is_request=False)
        self._conn.receive_data(head)
        ev = self._h11_event()
        if isinstance(ev, h11.InformationalResponse):
            return ResponseHead(ev.status_code, _forwardable(list(ev.headers)), framing)
        if not isinstance(ev, h11.Response):
            raise Refusal(502, "malformed", type(ev).__name__)
        self._in_head = False
        rest, self._buf = bytes(self._buf), bytearray()
        if rest:  # h11 takes b"" for EOF: a head that arrived alone must not end the body
            self._conn.receive_data(rest)
        if self._eof:
            self._conn.receive_data(b"")
        return ResponseHead(ev.status_code, _forwardable(list(ev.headers)), framing)

    @property
    def reusable(self) -> bool:
        """Whether the exchange completed cleanly and the connection can be pooled."""
        trailing, closed = self._conn.trailing_data
        return (
            self._conn.our_state is h11.DONE
            and self._conn.their_state is h11.DONE
            and not trailing
            and not closed
            and not self._eof
        )

    def start_next_cycle(self) -> None:
        """Reuse the connection for another request (only when :attr:`reusable`)."""
        if not self.reusable:
            raise RuntimeError("connection not reusable; close it")
        self._carry_over()


__all__ = [
    "NEED_DATA",
    "PAUSED",
    "BodyData",
    "ConnectionClosed",
    "Event",
    "Framing",
    "H1ClientConnection",
    "H1Limits",
    "H1ServerConnection",
    "MessageEnd",
    "Refusal",
    "RequestHead",
    "ResponseHead",
    "check_head",
    "refusal_response",
]
