"""Fakes and wiring for the catalog-stream tests: a CatalogSource on a real
CatalogBuilder fed with store events, a recording registrar, a signer on a real CA,
and servers/clients joined by memory streams with real TLS.

OpenSSL checks certificate validity against the real clock, so certificates are
minted at the real time; the trio clock may be a MockClock.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import trio
import trio.testing

from federation.catalog import CatalogBuilder
from federation.catalog_client import CatalogClient, ClientConfig
from federation.model import EndpointRecord
from federation.store.api import Delete, KeyValue, Put, Reset
from tests.catalog.strategies import endpoint
from trust.ca import CertificateAuthority
from trust.spiffe import SpiffeId, TrustDomain, agent_id, workload_id
from trust.svid import issue_svid
from trust.tls import TlsContextHolder
from trust.validate import TrustBundleSet

REAL_NOW = dt.datetime.now(dt.UTC)
TD = TrustDomain("c1.acme.mesh")
TD_OTHER = TrustDomain("c2.acme.mesh")
TD_EVIL = TrustDomain("evil.mesh")
CA, _ = CertificateAuthority.create(TD, REAL_NOW)
CA_OTHER, _ = CertificateAuthority.create(TD_OTHER, REAL_NOW)
CA_EVIL, _ = CertificateAuthority.create(TD_EVIL, REAL_NOW)
BUNDLES = TrustBundleSet({TD: (CA.root,), TD_OTHER: (CA_OTHER.root,)})
AGENT = agent_id(TD)
WORKLOAD_A = workload_id(TD, "shop", "a")
WORKLOAD_B = workload_id(TD, "shop", "b")
AGENT_TLS = TlsContextHolder(issue_svid(CA, AGENT, REAL_NOW), BUNDLES)
SVID_A = issue_svid(CA, WORKLOAD_A, REAL_NOW)
TLS_A = TlsContextHolder(SVID_A, BUNDLES)


def holder_for(ca: CertificateAuthority, sid: SpiffeId, bundles: TrustBundleSet = BUNDLES):
    return TlsContextHolder(issue_svid(ca, sid, REAL_NOW), bundles)


def local_endpoint(eid: str = "e1", service: str = "a", **kw: object) -> EndpointRecord:
    """An endpoint of the agent's cluster c1 whose spiffe_id is WORKLOAD_<service>."""
    return endpoint("c1", service, eid, **kw)


class FakeSource:
    """CatalogSource over a real CatalogBuilder; tests feed it store events."""

    def __init__(self, epoch: str = "inc-1") -> None:
        self.builder = CatalogBuilder("c1", epoch)
        self._degraded = False
        self._changed = trio.Event()
        self._rev = 0

    @property
    def epoch(self) -> str:
        return self.builder.epoch

    @property
    def version(self) -> int:
        return self.builder.version

    @property
    def synced(self) -> bool:
        return self.builder.synced

    @property
    def degraded(self) -> bool:
        return self._degraded

    def snapshot(self):
        return self.builder.snapshot()

    def changes_since(self, version, epoch=None):
        return self.builder.changes_since(version, epoch)

    async def wait_changed(self, version, synced, degraded):
        while (self.version, self.synced, self.degraded) == (version, synced, degraded):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _kv(self, record) -> KeyValue:
        self._rev += 1
        return KeyValue(record.key(), record.to_json(), self._rev, self._rev, 1)

    def reset(self, *records) -> None:
        self._rev += 1
        items = tuple(sorted((self._kv(r) for r in records), key=lambda kv: kv.key))
        self.builder.apply(Reset(self._rev, items), now=1000.0)
        self._notify()

    def put(self, record) -> None:
        self.builder.apply(Put(self._kv(record)), now=1000.0)
        self._notify()

    def delete(self, key: str) -> None:
        self._rev += 1
        self.builder.apply(Delete(key, self._rev), now=1000.0)
        self._notify()

    def set_degraded(self, value: bool) -> None:
        self._degraded = value
        self._notify()


class FakeRegistrar:
    def __init__(self) -> None:
        self.records: dict[str, tuple[EndpointRecord, str]] = {}
        self.dropped: list[str] = []
        self.owner_dropped = trio.Event()

    async def register(self, record, owner):
        self.records[record.key()] = (record, owner)

    async def deregister(self, record_key, owner):
        if self.records.get(record_key, (None, None))[1] == owner:
            del self.records[record_key]

    async def drop_owner(self, owner):
        self.dropped.append(owner)
        for key in [k for k, (_, o) in self.records.items() if o == owner]:
            del self.records[key]
        self.owner_dropped.set()


class FakeSigner:
    trust_domain = TD.name

    def __init__(self) -> None:
        self.signed: list[SpiffeId] = []

    def sign(self, csr_pem, spiffe_id):
        self.signed.append(spiffe_id)
        return CA.sign_csr(csr_pem, spiffe_id, dt.datetime.now(dt.UTC))


def memory_connector(server, nursery: trio.Nursery):
    """A CatalogClient ``connect`` that serves each connection with ``server`` in memory."""

    async def connect() -> trio.abc.Stream:
        a, b = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_connection, a)
        return b

    return connect


def make_client(
    connect, tls: TlsContextHolder = TLS_A, state_path: Path | None = None, **config: object
) -> CatalogClient:
    config.setdefault("persist_in_thread", False)
    return CatalogClient(
        "agent.c1",
        15012,
        tls,
        lambda: BUNDLES,
        AGENT,
        state_path,
        config=ClientConfig(**config),  # type: ignore[arg-type]
        connect=connect,
        rng=random.Random(7),
    )


async def raw_session(server, nursery: trio.Nursery, ctx):
    """A bare HTTP/2 session to ``server`` with TLS context ``ctx`` (for refusal tests)."""
    import contextlib

    from federation.catalog_client import CatalogClientError, _Session

    a, b = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, a)
    stream = trio.SSLStream(b, ctx, server_hostname="agent.c1")
    await stream.do_handshake()
    session = _Session(stream)
    await session.flush()

    async def read() -> None:
        with contextlib.suppress(CatalogClientError, trio.BrokenResourceError):
            await session.read_loop(float("inf"))

    nursery.start_soon(read)
    return session
