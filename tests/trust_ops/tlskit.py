"""In-memory mutual TLS exchanges for the trust operations tests."""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import trio
import trio.testing

from trust.errors import HandshakeRefused
from trust.revocation import RevocationSet
from trust.tls import handshake_and_verify
from trust.validate import TrustBundleSet, VerifiedPeer


def real_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Exchange:
    """Outcome of one handshake plus a ping/pong: each side's peer or its error."""

    server: VerifiedPeer | BaseException
    client: VerifiedPeer | BaseException

    @property
    def ok(self) -> bool:
        return isinstance(self.server, VerifiedPeer) and isinstance(self.client, VerifiedPeer)


FAILURES = (HandshakeRefused, trio.BrokenResourceError, trio.ClosedResourceError, EOFError)


async def exchange(
    server_ctx: ssl.SSLContext,
    server_bundles: TrustBundleSet,
    client_ctx: ssl.SSLContext,
    client_bundles: TrustBundleSet,
    now_fn: Callable[[], dt.datetime] = real_now,
    *,
    revoked: RevocationSet | None = None,
) -> Exchange:
    """Handshake both ends over a memory stream pair and exchange one message.

    The message matters: in TLS 1.3 a client learns that the server refused its
    certificate only when it reads.
    """
    a, b = trio.testing.memory_stream_pair()
    srv = trio.SSLStream(a, server_ctx, server_side=True)
    cli = trio.SSLStream(b, client_ctx, server_hostname="svc.mesh")
    out: dict[str, VerifiedPeer | BaseException] = {}

    async def server() -> None:
        try:
            peer = await handshake_and_verify(srv, server_bundles, now_fn, revoked=revoked)
            data = await srv.receive_some(16)
            if not data:
                raise EOFError("client went away")
            await srv.send_all(data.upper())
            out["server"] = peer
        except FAILURES as exc:
            out["server"] = exc
        finally:
            await trio.aclose_forcefully(srv)

    async def client() -> None:
        try:
            peer = await handshake_and_verify(cli, client_bundles, now_fn)
            await cli.send_all(b"ping")
            if await cli.receive_some(16) != b"PING":
                raise EOFError("no pong")
            out["client"] = peer
        except FAILURES as exc:
            out["client"] = exc
        finally:
            await trio.aclose_forcefully(cli)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        nursery.start_soon(client)
    return Exchange(out["server"], out["client"])
