"""The etcd backend: :class:`~federation.store.api.Store` over etcd's v3 gRPC API.

The ``etcd3`` package (imported through :func:`federation.store.etcd_compat.import_etcd3`)
provides the generated protobuf messages and gRPC stubs; we call the stubs
directly rather than ``etcd3.Etcd3Client``'s helpers because:

* one boundary (:func:`_map_rpc_error`) then sees every ``grpc.RpcError`` and maps
  it to :class:`StoreUnavailable`, :class:`Compacted` or :class:`LeaseNotFound`;
* etcd3's ``Watcher`` thread re-opens its stream in a tight loop while the server
  is down (a busy CPU spin) and lives for the whole process; our watch owns one
  gRPC stream and one worker thread, both ended when the ``async with`` exits;
* we control the channel: reconnect backoff short enough to notice a restarted
  etcd within a second or two, and HTTP/2 keepalives that detect a dead peer.

Every blocking unary call runs in :func:`trio.to_thread.run_sync` behind a
:class:`trio.CapacityLimiter` and carries a gRPC deadline (``EtcdConfig.call_timeout``),
so a dead server costs at most one timeout, never a hung task.
"""

from __future__ import annotations

import ipaddress
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc
import trio

from federation.store.api import (
    CasResult,
    Compacted,
    Delete,
    KeyValue,
    Lease,
    LeaseNotFound,
    Put,
    Reset,
    StoreClosed,
    StoreError,
    StoreUnavailable,
    WatchEvent,
)
from federation.store.etcd_compat import import_etcd3

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """How to reach etcd and how hard to try."""

    endpoints: tuple[str, ...]
    """``host:port`` client endpoints; several only as IP literals (gRPC fails over)."""
    call_timeout: float = 5.0
    """gRPC deadline for each unary call, in seconds."""
    connect_attempts: int = 5
    """Tries made by :meth:`EtcdStore.connect` before giving up with StoreUnavailable."""
    backoff_initial: float = 0.1
    """First delay between connect tries and watch re-lists; doubles each time."""
    backoff_max: float = 2.0
    """Cap on that delay."""
    max_concurrent_calls: int = 8
    """Worker threads that may be blocked in unary calls at once."""
    watch_buffer: int = 64
    """Watch responses buffered between a stream's gRPC thread and trio (back-pressure beyond)."""
    page_size: int = 2000
    """Keys per Range call in prefix reads; pages are pinned to one revision, so a
    large federation (100k endpoints, ~40 MB) is listed in bounded replies."""
    max_response_bytes: int = 64 * 1024 * 1024
    """gRPC receive limit per reply (gRPC's own default, 4 MiB, is too small for a
    page of large records or a watch response batching many events)."""

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("at least one etcd endpoint is required")
        if self.connect_attempts < 1:
            raise ValueError(f"connect_attempts must be >= 1, got {self.connect_attempts}")
        if not self.call_timeout > 0 or not self.backoff_initial > 0:
            raise ValueError("call_timeout and backoff_initial must be positive")

    @property
    def where(self) -> str:
        return ",".join(self.endpoints)


@dataclass(frozen=True, slots=True)
class EtcdStatistics:
    """Counters for tests and metrics (see :meth:`EtcdStore.statistics`)."""

    open_watches: int
    """Watches whose ``async with`` has not exited."""
    open_streams: int
    """gRPC watch streams (and their worker threads) currently alive."""
    resets: int
    """Resets delivered by all watches so far (1 per watch, plus one per re-list)."""


def grpc_target(endpoints: Sequence[str]) -> str:
    """The gRPC channel target for ``host:port`` endpoints.

    One endpoint is used as is. Several must be IP literals and become one
    ``ipv4:``/``ipv6:`` target, so gRPC's pick-first policy fails over between them.
    """
    if len(endpoints) == 1:
        return endpoints[0]
    hosts = []
    for ep in endpoints:
        host = ep.rsplit(":", 1)[0].strip("[]")
        try:
            hosts.append(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(
                f"etcd endpoint {ep!r}: with several endpoints each host must be an IP "
                "address (or use one DNS name that resolves to all members)"
            ) from None
    families = {h.version for h in hosts}
    if len(families) != 1:
        raise ValueError("etcd endpoints mix IPv4 and IPv6 addresses; use one family")
    return f"ipv{families.pop()}:" + ",".join(endpoints)


def _prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with ``prefix``"."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"  # etcd: range_end "\0" means "to the end of the key space"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _enc(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        key=raw.key.decode("utf-8", "surrogateescape"),
        value=bytes(raw.value),
        create_revision=raw.create_revision,
        mod_revision=raw.mod_revision,
        version=raw.version,
        lease=raw.lease,
    )


def _map_rpc_error(err: grpc.RpcError, where: str) -> StoreError | ValueError:
    """The one place where gRPC failures become store errors."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    ):
        return StoreUnavailable(
            f"etcd at {where} is unavailable ({code.name}: {details}); "
            f"is etcd running at {where}? start it, or pass --store memory://"
        )
    if "lease not found" in details:
        return LeaseNotFound(f"etcd lease not found (expired or revoked): {details}")
    if "compacted" in details:
        return Compacted(f"etcd: {details}")
    if "future revision" in details:
        return ValueError(f"etcd: {details}")
    return StoreError(f"etcd at {where} refused the request ({code.name}: {details})")


class EtcdStore:
    """:class:`~federation.store.api.Store` backed by etcd. Open with :func:`open_etcd_store`."""

    def __init__(self, config: EtcdConfig) -> None:
        etcd3 = import_etcd3()
        self._rpc = etcd3.etcdrpc
        self.config = config
        self._channel = grpc.insecure_channel(
            grpc_target(config.endpoints),
            options=[
                # gRPC's default reconnect backoff grows to 120 s; a restarted etcd
                # must be noticed within a couple of seconds.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
                # Detect a silently dead peer under an open watch. etcd rejects
                # pings more often than --grpc-keepalive-min-time (5 s default).
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.max_receive_message_length", config.max_response_bytes),
            ],
        )
        self._kv_stub = self._rpc.KVStub(self._channel)
        self._lease_stub = self._rpc.LeaseStub(self._channel)
        self._watch_stub = self._rpc.WatchStub(self._channel)
        self._limiter = trio.CapacityLimiter(config.max_concurrent_calls)
        self._closed = False
        self._open_watches = 0
        self._open_streams = 0
        self._resets = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<EtcdStore {self.config.where} watches={s.open_watches} streams={s.open_streams}"
            f"{' closed' if self._closed else ''}>"
        )

    def statistics(self) -> EtcdStatistics:
        return EtcdStatistics(self._open_watches, self._open_streams, self._resets)

    # -- the boundary ----------------------------------------------------------

    async def _call(self, fn: Callable[[], _T]) -> _T:
        """Run one blocking gRPC call in a worker thread, mapping its errors."""
        if self._closed:
            raise StoreClosed(f"the etcd store for {self.config.where} was closed")
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter, abandon_on_cancel=True)
        except grpc.RpcError as err:
            if self._closed:
                raise StoreClosed(f"the etcd store for {self.config.where} was closed") from err
            raise _map_rpc_error(err, self.config.where) from err
        except ValueError as err:
            # grpc raises ValueError("Cannot invoke RPC on closed channel!").
            if self._closed:
                raise StoreClosed(f"the etcd store for {self.config.where} was closed") from err
            raise

    async def connect(self) -> None:
        """Wait until etcd answers, with bounded, backed-off retries.

        Raises StoreUnavailable naming the endpoints after ``connect_attempts`` tries.
        """
        delay = self.config.backoff_initial
        last: StoreUnavailable | None = None
        for attempt in range(1, self.config.connect_attempts + 1):
            try:
                await self.current_revision()
                return
            except StoreUnavailable as err:
                last = err
            if attempt < self.config.connect_attempts:
                await trio.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max)
        where = self.config.where
        raise StoreUnavailable(
            f"cannot reach etcd at {where} after {self.config.connect_attempts} attempts; "
            f"is etcd running at {where}? start it, or pass --store memory:// "
            f"(last error: {last})"
        )

    # -- Store -----------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        req = self._rpc.RangeRequest(key=_enc(key))
        resp = await self._call(lambda: self._kv_stub.Range(req, self.config.call_timeout))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        # A compaction between two pages makes the pinned revision unreadable;
        # start over at a fresh revision (bounded: compactions are rare).
        for _ in range(2):
            try:
                return await self._get_prefix_once(prefix)
            except Compacted:
                continue
        return await self._get_prefix_once(prefix)

    async def _get_prefix_once(self, prefix: str) -> tuple[int, list[KeyValue]]:
        raw = _enc(prefix)
        end = _prefix_range_end(raw)
        out: list[KeyValue] = []
        revision = 0  # the first page fixes the revision every later page reads at
        start = raw
        while True:
            req = self._rpc.RangeRequest(
                key=start,
                range_end=end,
                limit=self.config.page_size,
                revision=revision,
                sort_order=self._rpc.RangeRequest.ASCEND,
                sort_target=self._rpc.RangeRequest.KEY,
            )
            resp = await self._call(partial(self._kv_stub.Range, req, self.config.call_timeout))
            if revision == 0:
                revision = int(resp.header.revision)
            out.extend(_kv(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return revision, out
            # The next key after the last one returned: keys sort bytewise.
            start = bytes(resp.kvs[-1].key) + b"\0"

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        req = self._rpc.PutRequest(key=_enc(key), value=value, lease=lease)
        resp = await self._call(lambda: self._kv_stub.Put(req, self.config.call_timeout))
        return int(resp.header.revision)

    async def delete(self, key: str) -> bool:
        req = self._rpc.DeleteRangeRequest(key=_enc(key))
        resp = await self._call(lambda: self._kv_stub.DeleteRange(req, self.config.call_timeout))
        return bool(resp.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        raw = _enc(prefix)
        req = self._rpc.DeleteRangeRequest(key=raw, range_end=_prefix_range_end(raw))
        resp = await self._call(lambda: self._kv_stub.DeleteRange(req, self.config.call_timeout))
        return int(resp.deleted)

    def _mod_equals(self, key: bytes, revision: int) -> Any:
        # A missing key compares as mod_revision 0, so 0 means "must not exist".
        return self._rpc.Compare(
            result=self._rpc.Compare.EQUAL,
            target=self._rpc.Compare.MOD,
            key=key,
            mod_revision=revision,
        )

    async def compare_and_swap(
        self, key: str, value: bytes, *, expected_mod_revision: int, lease: int = 0
    ) -> CasResult:
        raw = _enc(key)
        rpc = self._rpc
        req = rpc.TxnRequest(
            compare=[self._mod_equals(raw, expected_mod_revision)],
            success=[
                rpc.RequestOp(
                    request_put=rpc.PutRequest(key=raw, value=value, lease=lease, prev_kv=True)
                )
            ],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=raw))],
        )
        resp = await self._call(lambda: self._kv_stub.Txn(req, self.config.call_timeout))
        rev = int(resp.header.revision)
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            return CasResult(False, rev, _kv(kvs[0]) if kvs else None)
        put_resp = resp.responses[0].response_put
        prev = _kv(put_resp.prev_kv) if put_resp.HasField("prev_kv") else None
        # The new key follows from the previous one, so no second read is needed.
        new = KeyValue(
            key=key,
            value=value,
            create_revision=prev.create_revision if prev else rev,
            mod_revision=rev,
            version=prev.version + 1 if prev else 1,
            lease=lease,
        )
        return CasResult(True, rev, new)

    async def compare_and_delete(self, key: str, *, expected_mod_revision: int) -> bool:
        raw = _enc(key)
        rpc = self._rpc
        req = rpc.TxnRequest(
            compare=[self._mod_equals(raw, expected_mod_revision)],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=raw))],
        )
        resp = await self._call(lambda: self._kv_stub.Txn(req, self.config.call_timeout))
        return bool(resp.succeeded and resp.responses[0].response_delete_range.deleted)

    async def grant_lease(self, ttl: float) -> Lease:
        if not ttl > 0 or math.isinf(ttl):
            raise ValueError(f"lease TTL must be a positive, finite number of seconds, got {ttl}")
        # etcd grants whole seconds (and raises tiny TTLs to its minimum).
        req = self._rpc.LeaseGrantRequest(TTL=math.ceil(ttl))
        resp = await self._call(lambda: self._lease_stub.LeaseGrant(req, self.config.call_timeout))
        if resp.error:
            raise StoreError(f"etcd refused the lease: {resp.error}")
        return Lease(int(resp.ID), float(resp.TTL))

    async def keepalive(self, lease_id: int) -> float:
        req = self._rpc.LeaseKeepAliveRequest(ID=lease_id)

        def once() -> Any:
            # LeaseKeepAlive is a stream; one request, one answer, then the call ends.
            return next(
                iter(self._lease_stub.LeaseKeepAlive(iter([req]), self.config.call_timeout))
            )

        resp = await self._call(once)
        if resp.TTL <= 0:
            raise LeaseNotFound(f"etcd lease {lease_id:#x} not found (expired or revoked)")
        return float(resp.TTL)

    async def revoke_lease(self, lease_id: int) -> None:
        req = self._rpc.LeaseRevokeRequest(ID=lease_id)
        # Revoking a gone lease is a no-op, as in the embedded store.
        with suppress(LeaseNotFound):
            await self._call(lambda: self._lease_stub.LeaseRevoke(req, self.config.call_timeout))

    async def current_revision(self) -> int:
        req = self._rpc.RangeRequest(key=b"\0", count_only=True)
        resp = await self._call(lambda: self._kv_stub.Range(req, self.config.call_timeout))
        return int(resp.header.revision)

    async def compact(self, revision: int) -> None:
        req = self._rpc.CompactionRequest(revision=revision, physical=False)
        await self._call(lambda: self._kv_stub.Compact(req, self.config.call_timeout))

    async def aclose(self) -> None:
        """Close the channel: in-flight calls fail, watches end; later calls raise StoreClosed."""
        await trio.lowlevel.checkpoint()
        if not self._closed:
            self._closed = True
            self._channel.close()

    # -- watches ---------------------------------------------------------------

    @asynccontextmanager
    async def watch_prefix(self, prefix: str) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        if self._closed:
            raise StoreClosed(f"the etcd store for {self.config.where} was closed")
        send, recv = trio.open_memory_channel[WatchEvent](0)
        self._open_watches += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_loop, prefix, send)
                try:
                    yield _ReceiveIterator(self, recv)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._open_watches -= 1

    async def _watch_loop(self, prefix: str, out: trio.MemorySendChannel[WatchEvent]) -> None:
        """Reset, stream events, and on any break re-list and Reset again. Runs until cancelled."""
        async with out:
            delay = self.config.backoff_initial
            while True:
                try:
                    revision, items = await self.get_prefix(prefix)
                except StoreUnavailable:
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.config.backoff_max)
                    continue
                except StoreClosed:
                    return
                self._resets += 1
                await out.send(Reset(revision, tuple(items)))
                delivered = await self._stream(prefix, revision + 1, out)
                if self._closed:
                    return
                # A stream that worked for a while restarts quickly; one that keeps
                # breaking before its first event backs off like a connect retry.
                if delivered:
                    delay = self.config.backoff_initial
                else:
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.config.backoff_max)

    async def _stream(
        self, prefix: str, start_revision: int, out: trio.MemorySendChannel[WatchEvent]
    ) -> bool:
        """Forward one gRPC watch stream's events until it breaks; True if it was created.

        Returns (never raises StoreUnavailable) when the stream breaks, is
        cancelled by etcd, or its start revision was compacted: the caller re-lists.
        """
        raw = _enc(prefix)
        rpc = self._rpc
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=raw, range_end=_prefix_range_end(raw), start_revision=start_revision
            )
        )
        stop = threading.Event()

        def requests() -> Iterator[Any]:
            yield create
            # Hold the request side open until we are done; returning then lets
            # gRPC's request-consumer thread exit too.
            stop.wait()

        try:
            call = self._watch_stub.Watch(requests())
        except ValueError:  # channel closed under us
            return False
        raw_send, raw_recv = trio.open_memory_channel[Any](self.config.watch_buffer)
        created = False
        self._open_streams += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, call, raw_send)
                try:
                    async with raw_recv:
                        async for item in raw_recv:
                            if isinstance(item, grpc.RpcError):
                                return created
                            if item.compact_revision or item.canceled:
                                return created
                            created = created or item.created
                            for ev in item.events:
                                if ev.type == 0:  # mvccpb.Event.PUT
                                    await out.send(Put(_kv(ev.kv)))
                                else:
                                    await out.send(
                                        Delete(
                                            ev.kv.key.decode("utf-8", "surrogateescape"),
                                            ev.kv.mod_revision,
                                        )
                                    )
                        return created
                finally:
                    stop.set()
                    call.cancel()
        finally:
            self._open_streams -= 1

    async def _pump(self, call: Any, raw_send: trio.MemorySendChannel[Any]) -> None:
        """Move one stream's responses from its gRPC worker thread into trio."""

        def run() -> None:
            try:
                for resp in call:
                    trio.from_thread.run(raw_send.send, resp)
            except grpc.RpcError as err:
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.Cancelled):
                    trio.from_thread.run(raw_send.send, err)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.Cancelled):
                # The trio side stopped listening; the finally in _stream cancels the call.
                call.cancel()

        async with raw_send:
            # A private limiter: a long-lived stream must not occupy the unary-call slots.
            await trio.to_thread.run_sync(run, limiter=trio.CapacityLimiter(1))


class _ReceiveIterator:
    """Iterates a watch's memory channel; a plain class, so no async generator to finalise."""

    def __init__(self, store: EtcdStore, recv: trio.MemoryReceiveChannel[WatchEvent]) -> None:
        self._store = store
        self._recv = recv

    def __aiter__(self) -> _ReceiveIterator:
        return self

    async def __anext__(self) -> WatchEvent:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            # The watch loop only ends on its own when the store was closed.
            raise StoreClosed(f"the etcd store for {self._store.config.where} was closed") from None


@asynccontextmanager
async def open_etcd_store(config: EtcdConfig) -> AsyncIterator[EtcdStore]:
    """Connect (bounded retries, then StoreUnavailable) and close the store on exit."""
    store = EtcdStore(config)
    try:
        await store.connect()
        yield store
    finally:
        await store.aclose()


__all__ = [
    "EtcdConfig",
    "EtcdStatistics",
    "EtcdStore",
    "grpc_target",
    "open_etcd_store",
]
