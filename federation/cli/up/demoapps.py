"""Demo workloads behind the sidecars: each answers with who served the call.

* ``http``: HTTP/1.1 (h11), any path: JSON ``{"workload","cluster","zone","path"}``.
* ``http2``: HTTP/2 cleartext with prior knowledge (h2), the same JSON; a request
  with ``content-type: application/grpc`` gets a gRPC-style unary answer (one
  length-prefixed message, ``grpc-status: 0`` trailer) whose message is that JSON.
* ``tcp``: line echo; each line comes back as ``<workload> <cluster> <zone>: <line>``.

The protocol cores (``answer``, ``echo_line``, ``grpc_frame``) are pure; the
servers are thin trio loops around them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Literal

import h2.config
import h2.connection
import h2.events
import h11
import trio

__all__ = ["Identity", "answer", "echo_line", "grpc_frame", "serve_app"]

log = logging.getLogger("meshfed.demo.app")
AppKind = Literal["http", "http2", "tcp"]
MAX_LINE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Identity:
    workload: str
    cluster: str
    zone: str
    replica: int = 0


def answer(me: Identity, path: str) -> bytes:
    return json.dumps(
        {
            "workload": me.workload,
            "replica": me.replica,
            "cluster": me.cluster,
            "zone": me.zone,
            "path": path,
        },
        separators=(",", ":"),
    ).encode()


def echo_line(me: Identity, line: bytes) -> bytes:
    return (
        f"{me.workload}-{me.replica} {me.cluster} {me.zone}: ".encode()
        + line.rstrip(b"\r\n")
        + b"\n"
    )


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (not compressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


async def _serve_http(me: Identity, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            target = event.target.decode("ascii", "replace")
            # The body (if any) is read and ignored, so keep-alive stays in sync.
            while not isinstance(conn.next_event(), h11.EndOfMessage):
                if conn.their_state is h11.ERROR:
                    return
                more = await stream.receive_some(65536)
                conn.receive_data(more)
            body = answer(me, target)
            headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
            await stream.send_all(conn.send(h11.Data(data=body)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
        elif event is h11.PAUSED:
            conn.start_next_cycle()
        else:  # ConnectionClosed or a protocol error
            return


async def _serve_http2(me: Identity, stream: trio.SocketStream) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    paths: dict[int, tuple[str, bool]] = {}
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                hdrs = {bytes(k).lower(): bytes(v) for k, v in (event.headers or [])}
                grpc = hdrs.get(b"content-type", b"").startswith(b"application/grpc")
                paths[event.stream_id] = (hdrs.get(b":path", b"/").decode("ascii", "replace"), grpc)
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                path, grpc = paths.pop(event.stream_id, ("/", False))
                body = answer(me, path)
                if grpc:
                    conn.send_headers(
                        event.stream_id, [(":status", "200"), ("content-type", "application/grpc")]
                    )
                    conn.send_data(event.stream_id, grpc_frame(body))
                    conn.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
                else:
                    conn.send_headers(
                        event.stream_id,
                        [(":status", "200"), ("content-type", "application/json"),
                         ("content-length", str(len(body)))],
                    )  # fmt: skip
                    conn.send_data(event.stream_id, body, end_stream=True)
            elif isinstance(event, h2.events.ConnectionTerminated):
                await stream.send_all(conn.data_to_send())
                return
        out = conn.data_to_send()
        if out:
            await stream.send_all(out)


async def _serve_tcp(me: Identity, stream: trio.SocketStream) -> None:
    buf = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            await stream.send_all(echo_line(me, line))
        if len(buf) > MAX_LINE:
            return


_HANDLERS = {"http": _serve_http, "http2": _serve_http2, "tcp": _serve_tcp}


async def serve_app(
    kind: AppKind,
    me: Identity,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``started(bound port)``."""
    handler = _HANDLERS[kind]
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def one(stream: trio.SocketStream) -> None:
        try:
            await handler(me, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        except Exception:  # one odd client must not stop the app
            log.exception("connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(one, listeners)
