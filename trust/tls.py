"""TLS for trio: SSL contexts from an SVID and bundles, and a handshake that checks SPIFFE rules.

Two layers of checking, both required:

1. OpenSSL, inside the handshake, verifies the peer chain against the UNION of
   every trusted domain's roots (``ssl`` has no per-domain root selection and
   no verify callback). That rejects strangers, expired chains and non-CA
   issuers early, but would let domain B's CA vouch for ``spiffe://domain-a/...``.
2. :func:`handshake_and_verify` then runs :func:`trust.validate.verify_peer` on
   the chain the peer sent: bundle chosen by the SVID's trust domain, SPIFFE
   leaf rules, revocation, expected identity. Only after it passes may the
   caller read or write application bytes; on refusal the stream is closed.

Where the peer chain comes from: Python 3.13 has ``SSLObject.get_unverified_chain()``;
3.10-3.12 have the same method on the private ``_sslobj``. meshfed uses whichever
exists and falls back to the leaf alone (``getpeercert(binary_form=True)``), which
is enough for root-only CAs (the leaf is signed directly by a bundle root) but
not for CAs with intermediates. The chain is untrusted input either way: only
roots anchor it.

TLS 1.3 only; hostname checks are off (SVIDs carry no DNS names; the SPIFFE ID
check replaces them) but clients still send SNI, which the data path routes on.
Server contexts issue no session tickets, so every handshake is a full one and
its client certificate is validated again (revocations and rotations apply).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import ssl
import tempfile
from collections.abc import Callable, Set
from pathlib import Path
from typing import Literal, TypeVar

import trio
from cryptography.hazmat.primitives import serialization

from trust.errors import HandshakeReason, HandshakeRefused, TlsConfigError, ValidationError
from trust.revocation import RevocationSet
from trust.spiffe import SpiffeId
from trust.svid import Svid
from trust.validate import TrustBundleSet, VerifiedPeer, verify_peer

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "TlsContextHolder",
    "bootstrap_client_context",
    "client_context",
    "handshake_and_verify",
    "handshake_and_verify_optional",
    "peer_chain_der",
    "server_context",
]

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a peer gets to complete the handshake before the stream is closed."""

_DER = 2  # _ssl.ENCODING_DER, for the private Certificate.public_bytes on 3.10-3.12

StreamT = TypeVar("StreamT", bound=trio.abc.Stream)


def _load_svid(ctx: ssl.SSLContext, svid: Svid) -> None:
    """Load the SVID into ``ctx``; ``ssl`` only loads from files, so be careful with them.

    The key is written encrypted under a one-time random password, in a fresh
    0700 directory, to files created 0600 with O_EXCL, and everything is removed
    before returning: the plaintext key never touches the disk.
    """
    password = secrets.token_bytes(32)
    key_pem = svid.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    with tempfile.TemporaryDirectory(prefix="meshfed-svid-") as tmp:
        cert_path, key_path = Path(tmp) / "svid.crt", Path(tmp) / "svid.key"
        for path, data in ((cert_path, svid.chain_pem()), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            ctx.load_cert_chain(cert_path, key_path, password=password)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"OpenSSL refused the SVID: {exc}") from None


def _context(protocol: int, svid: Svid | None, bundles: TrustBundleSet) -> ssl.SSLContext:
    roots = bundles.all_roots()
    if not roots:
        raise TlsConfigError("no trusted roots: at least one trust bundle is needed")
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if protocol == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(
        cadata="".join(r.public_bytes(serialization.Encoding.PEM).decode() for r in roots)
    )
    if svid is not None:
        _load_svid(ctx, svid)
    return ctx


def server_context(
    svid: Svid,
    bundles: TrustBundleSet,
    *,
    client_cert: Literal["required", "optional"] = "required",
) -> ssl.SSLContext:
    """A TLS 1.3 server context that asks for a client certificate from any trusted domain.

    ``client_cert="optional"`` is for a server with an endpoint that admits anonymous
    clients (the agent's bootstrap CSR path, authorised by a join token): a client
    certificate that *is* sent is still verified by OpenSSL, but a client may send
    none, so such a server must use :func:`handshake_and_verify_optional` and decide
    per request what an anonymous peer may do.
    """
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, svid, bundles)
    if client_cert == "optional":
        ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.num_tickets = 0
    return ctx


def client_context(svid: Svid, bundles: TrustBundleSet) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting ``svid``; no hostname check (SPIFFE ID check instead)."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, svid, bundles)


def bootstrap_client_context(bundles: TrustBundleSet) -> ssl.SSLContext:
    """A TLS 1.3 client context that presents no certificate (a workload without an SVID
    yet, asking its agent for the first one); the server is still verified."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, None, bundles)


def peer_chain_der(stream: trio.SSLStream[StreamT]) -> list[bytes]:
    """The certificates the peer sent, leaf first, as DER (see the module docstring)."""
    ssl_object = getattr(stream, "_ssl_object", None)
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    leaf = stream.getpeercert(binary_form=True)
    if leaf is None:
        # No certificate (a client of a CERT_OPTIONAL server); the unverified chain
        # may then hold None entries, so do not read it.
        return []
    chain: list[bytes] = []
    if getter is not None:
        for cert in getter() or ():
            if cert is not None:
                chain.append(cert if isinstance(cert, bytes) else cert.public_bytes(_DER))
    # OpenSSL leaves the leaf out of the server-side peer chain on some versions.
    if not chain or chain[0] != leaf:
        chain.insert(0, leaf)
    return chain


_VERIFY_CODES: dict[int, HandshakeReason] = {
    9: "not_yet_valid",  # X509_V_ERR_CERT_NOT_YET_VALID
    10: "expired",  # X509_V_ERR_CERT_HAS_EXPIRED
    26: "bad_eku",  # X509_V_ERR_INVALID_PURPOSE
}


def _classify(exc: BaseException) -> tuple[HandshakeReason, str]:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        code = cause.verify_code
        return _VERIFY_CODES.get(code, "bad_chain"), f"OpenSSL: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        if cause.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_peer_certificate", "peer sent no certificate"
        return "handshake_failed", f"TLS: {cause.reason or cause}"
    return "handshake_failed", f"transport broke during the handshake: {exc!r}"


async def handshake_and_verify(
    stream: trio.SSLStream[StreamT],
    bundles: TrustBundleSet,
    now_fn: Callable[[], dt.datetime],
    *,
    expected: Set[SpiffeId] | None = None,
    revoked: RevocationSet | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> VerifiedPeer:
    """Complete the handshake and validate the peer; on any failure close and raise.

    Raises :class:`HandshakeRefused` with a stable ``reason``; the stream is
    closed by then. ``now_fn`` gives the validation time (UTC); ``handshake_timeout``
    (trio time, so MockClock drives it) bounds a stalled or trickling peer.

    TLS 1.3 note: a client finishes its handshake before the server has looked
    at the client certificate, so a client learns of its own refusal only on
    its first read.
    """
    peer = await handshake_and_verify_optional(
        stream,
        bundles,
        now_fn,
        expected=expected,
        revoked=revoked,
        handshake_timeout=handshake_timeout,
    )
    if peer is None:
        await trio.aclose_forcefully(stream)
        raise HandshakeRefused("no_peer_certificate", "peer sent no certificate")
    return peer


async def handshake_and_verify_optional(
    stream: trio.SSLStream[StreamT],
    bundles: TrustBundleSet,
    now_fn: Callable[[], dt.datetime],
    *,
    expected: Set[SpiffeId] | None = None,
    revoked: RevocationSet | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> VerifiedPeer | None:
    """As :func:`handshake_and_verify`, but a peer that sent no certificate gives None
    (the stream stays open) instead of a refusal. A certificate that was sent is
    validated exactly as there. For servers built with ``client_cert="optional"``."""
    try:
        with trio.fail_after(handshake_timeout):
            await stream.do_handshake()
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise HandshakeRefused(
            "handshake_timeout", f"handshake not complete within {handshake_timeout} s"
        ) from None
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        reason, detail = _classify(exc)
        raise HandshakeRefused(reason, detail) from exc
    chain = peer_chain_der(stream)
    if not chain:
        return None
    try:
        return verify_peer(chain, bundles, now_fn(), expected, revoked)
    except ValidationError as exc:
        await trio.aclose_forcefully(stream)
        raise HandshakeRefused(exc.reason, exc.detail) from exc


class TlsContextHolder:
    """The current server and client contexts; rebuilt when the SVID or bundles change.

    New handshakes use the contexts current when they are wrapped; existing
    connections keep the context they were made with (an ``ssl`` object holds
    its context). ``update`` builds the new contexts before swapping, so a bad
    SVID or empty bundle set raises and leaves the old ones in force.
    """

    def __init__(self, svid: Svid, bundles: TrustBundleSet) -> None:
        self._svid = svid
        self._bundles = bundles
        self._server = server_context(svid, bundles)
        self._client = client_context(svid, bundles)
        self._generation = 1

    @property
    def svid(self) -> Svid:
        """The SVID presented in new handshakes."""
        return self._svid

    @property
    def bundles(self) -> TrustBundleSet:
        """The bundles new handshakes are validated against."""
        return self._bundles

    @property
    def generation(self) -> int:
        """Bumped on every update; 1 for the first contexts."""
        return self._generation

    @property
    def server(self) -> ssl.SSLContext:
        """The current server context."""
        return self._server

    @property
    def client(self) -> ssl.SSLContext:
        """The current client context."""
        return self._client

    def update(self, *, svid: Svid | None = None, bundles: TrustBundleSet | None = None) -> None:
        """Replace the SVID and/or bundles for new handshakes."""
        new_svid = self._svid if svid is None else svid
        new_bundles = self._bundles if bundles is None else bundles
        server = server_context(new_svid, new_bundles)
        client = client_context(new_svid, new_bundles)
        self._svid, self._bundles = new_svid, new_bundles
        self._server, self._client = server, client
        self._generation += 1

    def wrap_server(self, transport: StreamT) -> trio.SSLStream[StreamT]:
        """Server side TLS over ``transport`` with the current context (no I/O yet)."""
        return trio.SSLStream(transport, self._server, server_side=True)

    def wrap_client(self, transport: StreamT, server_name: str) -> trio.SSLStream[StreamT]:
        """Client side TLS over ``transport``; ``server_name`` is sent as SNI (not checked)."""
        return trio.SSLStream(transport, self._client, server_hostname=server_name)

    def __repr__(self) -> str:
        return (
            f"<TlsContextHolder gen={self._generation} svid={self._svid.spiffe_id} "
            f"domains={sorted(td.name for td in self._bundles)}>"
        )
