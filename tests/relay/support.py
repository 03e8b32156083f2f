"""Helpers for the relay tests: real loopback connections and read-to-EOF."""

from __future__ import annotations

import trio


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected loopback pair (client, server); the listener binds port 0 and is
    listening before the connect starts, so there is no readiness race."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []
    try:
        async with trio.open_nursery() as nursery:

            async def accept() -> None:
                accepted.append(await listener.accept())

            nursery.start_soon(accept)
            client = await trio.open_tcp_stream("127.0.0.1", port)
    finally:
        await listener.aclose()
    return client, accepted[0]


async def drain_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything ``stream`` yields until EOF."""
    out = bytearray()
    while data := await stream.receive_some(1 << 20):
        out += data
    return bytes(out)
