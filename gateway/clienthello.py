"""Incremental, bounds-checked parser for the first TLS ClientHello on a connection.

The passthrough gateway never decrypts: it reads the caller's ClientHello, takes the
SNI (and ALPN) from it, picks an upstream, replays every byte it read, then copies
bytes both ways. This module is the sans-IO part: bytes in, one of three outcomes out.

Contract:

* ``ClientHelloParser.feed(data)`` returns :class:`Incomplete` until the whole
  ClientHello has arrived, then a :class:`ClientHelloInfo` whose ``raw`` holds every
  byte fed so far (the adapter must forward exactly ``raw`` upstream, then continue
  copying). It raises :class:`NotTls` or :class:`BadClientHello`, each with a stable
  ``reason`` usable as a metric label. Errors are sticky; feeding after an outcome is
  a caller bug (``RuntimeError``).
* The outcome does not depend on how the bytes were split into reads: every check
  is decided by a prefix of the stream (tests feed byte by byte and at every split).
* Memory is bounded by ``max_bytes`` (default 16 KiB): a hello whose records would
  not fit is refused with ``too_large`` as soon as a length field says so.
* **The adapter must apply a deadline.** A peer that sends half a hello and stops
  costs a buffer and a task forever otherwise; this core has no clock by design.
  Typical: 5-10 s from accept to a complete hello, then close without a reply.

Wire format (RFC 8446 section 5.1 record layer, section 4 handshake, 4.1.2
ClientHello, 4.2 extensions; RFC 6066 section 3 server_name; RFC 7301 ALPN):

* records: ``type(1)=22 legacy_version(2)=0x0301..0x0303 length(2)=1..2^14 fragment``;
  zero-length handshake fragments are forbidden (RFC 8446 5.1), the hello may span
  several records, and the record carrying its last byte must end with it (anything
  else is a coalesced message a client never sends first).
* handshake: ``msg_type(1)=1 length(3) body``.
* body: ``legacy_version(2) random(32) session_id<0..32> cipher_suites<2..2^16-2>
  compression_methods<1..2^8-1> [extensions<0..2^16-1>]``; extensions are optional
  only for pre-1.3 clients; a type may appear once (RFC 8446 4.2).
* server_name: ``ServerNameList<1..2^16-1>`` of ``name_type(1) HostName<1..2^16-1>``;
  we accept exactly one entry, of type host_name(0), printable ASCII, <= 253 bytes.
  Whether the name is a valid meshfed SNI is decided later by ``sidecar.sni``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

RECORD_HANDSHAKE: Final = 22
HANDSHAKE_CLIENT_HELLO: Final = 1
MAX_FRAGMENT: Final = 2**14
"""RFC 8446 5.1: a TLSPlaintext fragment is at most 2^14 bytes."""

EXT_SERVER_NAME: Final = 0
EXT_ALPN: Final = 16
EXT_SUPPORTED_VERSIONS: Final = 43

_RECORD_HEADER: Final = 5
_HANDSHAKE_HEADER: Final = 4
# version(2) random(32) session_id len(1) suites len(2) + one suite(2) methods len(1) + one(1)
_MIN_HELLO_BODY: Final = 2 + 32 + 1 + 2 + 2 + 1 + 1
_MAX_HOST_NAME: Final = 253

HelloReason = Literal[
    "not_tls",
    "sslv2",
    "bad_record_version",
    "bad_version",
    "not_client_hello",
    "too_large",
    "malformed",
    "duplicate_extension",
    "bad_sni",
    "no_sni",
]


class ClientHelloError(ValueError):
    """The connection did not start with an acceptable TLS ClientHello.

    ``reason`` is one of :data:`HelloReason` (a stable metric label); the message
    adds a human detail.
    """

    def __init__(self, reason: HelloReason, detail: str = "") -> None:
        self.reason: HelloReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class NotTls(ClientHelloError):
    """The peer is not speaking TLS at all (plain HTTP, SSLv2, another protocol)."""


class BadClientHello(ClientHelloError):
    """The peer speaks TLS, but its ClientHello is malformed, oversized or unusable."""


@dataclass(frozen=True, slots=True)
class Incomplete:
    """More bytes are needed before the ClientHello can be judged."""

    buffered: int
    """Bytes held by the parser so far (all of them will be in ``raw``)."""


@dataclass(frozen=True, slots=True)
class ClientHelloInfo:
    """What a passthrough gateway may learn from a ClientHello without decrypting."""

    sni: str | None
    """The single host_name from server_name, or None if the extension is absent."""

    alpn: tuple[str, ...]
    """ALPN protocol names in the client's order (bytes decoded as latin-1, lossless)."""

    supported_versions: tuple[int, ...]
    """The supported_versions list as sent (GREASE included); empty if absent."""

    legacy_version: int
    """ClientHello.legacy_version (0x0303 for TLS 1.2 and 1.3 clients)."""

    raw: bytes = field(repr=False)
    """Every byte fed to the parser, in order: replay exactly these upstream."""

    hello_end: int = field(repr=False)
    """Length of the prefix of ``raw`` made of the records carrying the ClientHello;
    bytes after it (if any) arrived in the same reads and must be replayed too."""

    def require_sni(self) -> str:
        """The SNI, or :class:`BadClientHello` ``no_sni``: the mesh never default-routes."""
        if self.sni is None:
            raise BadClientHello("no_sni", "ClientHello has no server_name extension")
        return self.sni


class _Reader:
    """Bounds-checked cursor over one length-delimited region of the hello."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = start
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def _need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise BadClientHello("malformed", f"{what}: need {n} bytes, {self.remaining} left")

    def u8(self, what: str) -> int:
        self._need(1, what)
        v = self._data[self._pos]
        self._pos += 1
        return v

    def u16(self, what: str) -> int:
        self._need(2, what)
        v = int.from_bytes(self._data[self._pos : self._pos + 2], "big")
        self._pos += 2
        return v

    def take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        v = self._data[self._pos : self._pos + n]
        self._pos += n
        return v

    def sub(self, n: int, what: str) -> _Reader:
        """A reader over the next ``n`` bytes; this reader skips past them."""
        self._need(n, what)
        r = _Reader(self._data, self._pos, self._pos + n)
        self._pos += n
        return r

    def vec8(self, what: str) -> _Reader:
        return self.sub(self.u8(what + " length"), what)

    def vec16(self, what: str) -> _Reader:
        return self.sub(self.u16(what + " length"), what)

    def expect_end(self, what: str) -> None:
        if self.remaining:
            raise BadClientHello("malformed", f"{what}: {self.remaining} trailing bytes")


class ClientHelloParser:
    """Feed the first bytes of a connection; learn its SNI, ALPN and versions.

    ``max_bytes`` bounds everything buffered before the hello completes (record
    headers included). 16 KiB holds any real hello today, including post-quantum
    key shares (~1.8 KiB) and large session tickets.
    """

    def __init__(self, max_bytes: int = 16384) -> None:
        if max_bytes < _RECORD_HEADER + _HANDSHAKE_HEADER + _MIN_HELLO_BODY:
            raise ValueError(f"max_bytes={max_bytes} cannot hold any ClientHello")
        self._max = max_bytes
        self._buf = bytearray()
        self._pos = 0  # start of the next unparsed record in _buf
        self._hs = bytearray()  # handshake bytes reassembled from record fragments
        self._hs_total: int | None = None  # 4 + declared handshake length, once known
        self._error: ClientHelloError | None = None
        self._done = False

    @property
    def buffered(self) -> int:
        """Bytes held so far."""
        return len(self._buf)

    def feed(self, data: bytes) -> Incomplete | ClientHelloInfo:
        """Add bytes read from the peer; see the module docstring for the contract."""
        if self._done:
            raise RuntimeError("ClientHelloParser already produced its result")
        if self._error is not None:
            raise self._error
        self._buf += data
        try:
            return self._advance()
        except ClientHelloError as e:
            self._error = e
            raise

    def _advance(self) -> Incomplete | ClientHelloInfo:
        buf = self._buf
        if self._pos == 0:
            self._sniff(buf)
        while len(buf) - self._pos >= _RECORD_HEADER:
            p = self._pos
            ctype, major, minor = buf[p], buf[p + 1], buf[p + 2]
            length = int.from_bytes(buf[p + 3 : p + 5], "big")
            if ctype != RECORD_HANDSHAKE:
                # Only the first record can be "not TLS"; later ones are a broken hello.
                raise BadClientHello("malformed", f"record type {ctype} inside the ClientHello")
            if major != 3 or not 1 <= minor <= 3:
                raise BadClientHello("bad_record_version", f"record version {major}.{minor}")
            if length == 0:
                raise BadClientHello("malformed", "zero-length handshake record")
            if length > MAX_FRAGMENT:
                raise BadClientHello("malformed", f"record length {length} > 2^14")
            if p + _RECORD_HEADER + length > self._max:
                raise BadClientHello("too_large", f"records exceed {self._max} bytes")
            if len(buf) < p + _RECORD_HEADER + length:
                break
            self._hs += buf[p + _RECORD_HEADER : p + _RECORD_HEADER + length]
            self._pos = p + _RECORD_HEADER + length
            info = self._check_handshake()
            if info is not None:
                return info
        if self._pos + _RECORD_HEADER > self._max:
            # No room for the next record header: decided before the header is
            # complete, so the outcome does not depend on how reads were split.
            raise BadClientHello("too_large", f"more than {self._max} bytes without a hello")
        return Incomplete(len(buf))

    def _sniff(self, buf: bytearray) -> None:
        """Decide 'is this TLS at all' from the first bytes, before a full header."""
        if not buf:
            return
        first = buf[0]
        if first != RECORD_HANDSHAKE:
            # An SSLv2-compatible hello has a 2-byte header with the high bit set.
            raise NotTls("sslv2" if first & 0x80 else "not_tls", f"first byte 0x{first:02x}")
        if len(buf) >= 2 and buf[1] != 3:
            raise NotTls("not_tls", f"record major version {buf[1]}")

    def _check_handshake(self) -> ClientHelloInfo | None:
        hs = self._hs
        if self._hs_total is None:
            if len(hs) < _HANDSHAKE_HEADER:
                return None
            if hs[0] != HANDSHAKE_CLIENT_HELLO:
                raise BadClientHello("not_client_hello", f"handshake type {hs[0]}")
            body_len = int.from_bytes(hs[1:4], "big")
            if body_len < _MIN_HELLO_BODY:
                raise BadClientHello("malformed", f"ClientHello length {body_len} too short")
            # The fewest bytes on the wire: one record header per 2^14 of handshake.
            total = _HANDSHAKE_HEADER + body_len
            records = -(-total // MAX_FRAGMENT)
            if total + records * _RECORD_HEADER > self._max:
                raise BadClientHello("too_large", f"ClientHello of {body_len} bytes")
            self._hs_total = total
        if len(hs) < self._hs_total:
            return None
        if len(hs) > self._hs_total:
            raise BadClientHello("malformed", "record continues past the ClientHello")
        sni, alpn, versions, legacy = _parse_body(bytes(hs[_HANDSHAKE_HEADER:]))
        self._done = True
        return ClientHelloInfo(
            sni=sni,
            alpn=alpn,
            supported_versions=versions,
            legacy_version=legacy,
            raw=bytes(self._buf),
            hello_end=self._pos,
        )


def _parse_body(body: bytes) -> tuple[str | None, tuple[str, ...], tuple[int, ...], int]:
    r = _Reader(body)
    legacy = r.u16("legacy_version")
    if legacy >> 8 != 3 or not 1 <= (legacy & 0xFF) <= 3:
        raise BadClientHello("bad_version", f"legacy_version 0x{legacy:04x}")
    r.take(32, "random")
    session_id = r.vec8("legacy_session_id")
    if session_id.remaining > 32:
        raise BadClientHello("malformed", "legacy_session_id longer than 32")
    suites = r.vec16("cipher_suites")
    if suites.remaining < 2 or suites.remaining % 2:
        raise BadClientHello("malformed", "cipher_suites length must be even and >= 2")
    methods = r.vec8("legacy_compression_methods")
    if methods.remaining < 1:
        raise BadClientHello("malformed", "no compression methods")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    if r.remaining == 0:
        # Pre-TLS-1.3 hellos may omit extensions entirely (RFC 5246 7.4.1.2).
        return sni, alpn, versions, legacy
    exts = r.vec16("extensions")
    r.expect_end("ClientHello")
    seen: set[int] = set()
    while exts.remaining:
        ext_type = exts.u16("extension type")
        ext = exts.vec16(f"extension {ext_type}")
        if ext_type in seen:
            raise BadClientHello("duplicate_extension", f"extension {ext_type} twice")
        seen.add(ext_type)
        if ext_type == EXT_SERVER_NAME:
            sni = _parse_server_name(ext)
        elif ext_type == EXT_ALPN:
            alpn = _parse_alpn(ext)
        elif ext_type == EXT_SUPPORTED_VERSIONS:
            versions = _parse_supported_versions(ext)
    return sni, alpn, versions, legacy


def _parse_server_name(ext: _Reader) -> str:
    try:
        names = ext.vec16("server_name_list")
        ext.expect_end("server_name")
        name_type = names.u8("name_type")
        host = names.vec16("host_name")
        names.expect_end("server_name_list")
    except BadClientHello as e:
        raise BadClientHello("bad_sni", e.detail) from None
    if name_type != 0:
        raise BadClientHello("bad_sni", f"name_type {name_type}, want host_name(0) only")
    value = host.take(host.remaining, "host_name")
    if not 1 <= len(value) <= _MAX_HOST_NAME:
        raise BadClientHello("bad_sni", f"host_name of {len(value)} bytes")
    # Printable ASCII without spaces: the name ends up in logs and metric labels.
    if any(b < 0x21 or b > 0x7E for b in value):
        raise BadClientHello("bad_sni", "host_name is not printable ASCII")
    return value.decode("ascii")


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    names = ext.vec16("alpn protocol_name_list")
    ext.expect_end("alpn")
    if names.remaining < 2:
        raise BadClientHello("malformed", "empty ALPN list")
    out: list[str] = []
    while names.remaining:
        name = names.vec8("alpn protocol name")
        if name.remaining == 0:
            raise BadClientHello("malformed", "empty ALPN protocol name")
        out.append(name.take(name.remaining, "alpn protocol name").decode("latin-1"))
    return tuple(out)


def _parse_supported_versions(ext: _Reader) -> tuple[int, ...]:
    versions = ext.vec8("supported_versions")
    ext.expect_end("supported_versions")
    if versions.remaining < 2 or versions.remaining % 2:
        raise BadClientHello("malformed", "supported_versions length must be even and >= 2")
    out: list[int] = []
    while versions.remaining:
        out.append(versions.u16("version"))
    return tuple(out)
