"""Agent benchmarks: propagation latency and full-sync time (results in bench/results/agent.md).

    .venv/bin/python bench/agent_bench.py                 # full: 1000 changes, 10x1000x10
    .venv/bin/python bench/agent_bench.py --short         # 300 changes, 10x100x10
    .venv/bin/python bench/agent_bench.py --part propagation-etcd --json   # what bench.run runs

Propagation: a write into cluster A's endpoint keys (``store.put`` of a new
port) until cluster C's CatalogSource (the agent's importer: watch ->
CatalogBuilder, with its import rule) shows it, measured with ``wait_changed``.
Full sync: 10 clusters x S services x 10 endpoints bulk-loaded (etcd: Txn of 128
puts), then ``get_prefix`` and one ``CatalogBuilder.apply(Reset)`` timed (wall and
process CPU), the same Reset again (a re-list that lost nothing), the sliced path
(``apply_steps``: the longest stretch between two checkpoints), ``snapshot()``,
``Catalog.to_json`` / ``from_json`` and the stream's Snapshot line.
Starts its own etcd (Debian's etcd-server) on free loopback ports.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from etcd_server import EtcdServer  # type: ignore[import-not-found]

from federation import keys
from federation.agent.health import StoreHealth
from federation.agent.importer import CatalogImporter
from federation.agent.metrics import AgentMetrics
from federation.catalog import Catalog, CatalogBuilder
from federation.model import EndpointRecord, ExportRecord, Locality, ServicePort
from federation.store import Reset, Store, open_store
from federation.store.etcd_compat import import_etcd3
from federation.stream_codec import Snapshot, encode


def endpoint(cluster: str, svc: str, i: int, port: int = 15006) -> EndpointRecord:
    return EndpointRecord(
        cluster=cluster, namespace="bench", service=svc, endpoint_id=f"e{i}",
        address=f"10.0.{i // 250}.{i % 250 + 1}", port=port,
        locality=Locality("aws", "us-east-1", "us-east-1a", cluster), weight=1, healthy=True,
        spiffe_id=f"spiffe://{cluster}.bench.mesh/ns/bench/sa/{svc}", network=cluster,
        written_at=time.time(),
    )


def export(cluster: str, svc: str) -> ExportRecord:
    return ExportRecord(cluster, "bench", svc, (ServicePort("http", 8080, "http"),), ("*",))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def propagation(store: Store, changes: int) -> dict[str, float]:
    src = CatalogImporter("c-2", "inc-bench", health=StoreHealth(), metrics=AgentMetrics())
    src.health.ok(0)
    await store.put(keys.export("c-0", "bench", "svc"), export("c-0", "svc").to_json())
    lat: list[float] = []
    async with trio.open_nursery() as n:
        await n.start(src.run, store)
        key = keys.endpoint("c-0", "bench", "svc", "e0")
        for i in range(changes):
            rec = endpoint("c-0", "svc", 0, port=20000 + i % 40000)
            version = src.version
            t0 = time.perf_counter()
            await store.put(key, rec.to_json())
            while True:
                await src.wait_changed(version, src.synced, src.degraded)
                version = src.version
                got = src.snapshot().entries.get(key)
                if isinstance(got, EndpointRecord) and got.port == rec.port:
                    break
            lat.append(time.perf_counter() - t0)
        n.cancel_scope.cancel()
    return {
        "n": len(lat), "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
        "mean_ms": statistics.fmean(lat) * 1e3, "max_ms": max(lat) * 1e3,
    }


def dataset(services: int) -> list[tuple[str, bytes]]:
    out = []
    for c in range(10):
        cluster = f"c-{c}"
        for s in range(services):
            svc = f"s{s}"
            out.append((keys.export(cluster, "bench", svc), export(cluster, svc).to_json()))
            for i in range(10):
                out.append((keys.endpoint(cluster, "bench", svc, f"e{i}"),
                            endpoint(cluster, svc, i).to_json()))
    return out


def raw_range_etcd(endpoint_: str) -> tuple[float, int]:
    """Range of the whole prefix with the etcd3 client, gRPC receive limit lifted."""
    etcd3 = import_etcd3()
    host, port = endpoint_.rsplit(":", 1)
    client = etcd3.client(
        host=host, port=int(port), grpc_options=[("grpc.max_receive_message_length", -1)]
    )
    t0 = time.perf_counter()
    n = sum(1 for _ in client.get_prefix(keys.ROOT))
    elapsed = time.perf_counter() - t0
    client.close()
    return elapsed, n


def bulk_load_etcd(endpoint_: str, items: list[tuple[str, bytes]]) -> float:
    etcd3 = import_etcd3()
    host, port = endpoint_.rsplit(":", 1)
    client = etcd3.client(host=host, port=int(port))
    t0 = time.perf_counter()
    for i in range(0, len(items), 128):  # etcd's default --max-txn-ops
        ops = [client.transactions.put(k, v) for k, v in items[i : i + 128]]
        client.transaction(compare=[], success=ops, failure=[])
    client.close()
    return time.perf_counter() - t0


async def full_sync(store: Store, label: str) -> dict[str, object]:
    out: dict[str, object] = {}
    t0 = time.perf_counter()
    try:
        rev, items = await store.get_prefix(keys.ROOT)
    except Exception as exc:  # report, do not hide
        out[f"{label}_get_prefix_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        return out
    out[f"{label}_get_prefix_s"] = time.perf_counter() - t0
    out[f"{label}_keys"] = len(items)
    reset = Reset(rev, tuple(items))
    b = CatalogBuilder("c-9", "inc-bench")
    t0, c0 = time.perf_counter(), time.process_time()
    b.apply(reset, time.time())
    out[f"{label}_builder_reset_s"] = time.perf_counter() - t0
    out[f"{label}_builder_reset_cpu_s"] = time.process_time() - c0
    t0 = time.perf_counter()
    b.apply(reset, time.time())
    out[f"{label}_builder_relist_same_s"] = time.perf_counter() - t0
    # The importer's way: slices with a checkpoint between them, the collector off meanwhile.
    sliced = CatalogBuilder("c-9", "inc-bench")
    steps = sliced.apply_steps(reset, time.time())
    gc.disable()
    c0 = time.process_time()
    longest, n_slices = 0.0, 0
    t0 = time.perf_counter()
    while True:
        s0 = time.perf_counter()
        try:
            next(steps)
        except StopIteration:
            longest = max(longest, time.perf_counter() - s0)
            break
        longest = max(longest, time.perf_counter() - s0)
        n_slices += 1
    out[f"{label}_sliced_reset_s"] = time.perf_counter() - t0
    out[f"{label}_sliced_reset_cpu_s"] = time.process_time() - c0
    gc.enable()
    out[f"{label}_sliced_slices"] = n_slices
    out[f"{label}_sliced_longest_slice_ms"] = longest * 1e3
    t0 = time.perf_counter()
    snap = b.snapshot()
    out[f"{label}_snapshot_s"] = time.perf_counter() - t0
    out[f"{label}_visible_entries"] = len(snap.entries)
    t0 = time.perf_counter()
    data = snap.to_json()
    out[f"{label}_to_json_s"] = time.perf_counter() - t0
    out[f"{label}_catalog_json_mb"] = len(data) / 1e6
    t0 = time.perf_counter()
    encode(Snapshot(snap.version, snap))
    out[f"{label}_snapshot_line_after_to_json_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    Catalog.from_json(data)
    out[f"{label}_from_json_s"] = time.perf_counter() - t0
    return out


PARTS = ("propagation-embedded", "propagation-etcd", "full-sync")
"""What ``--part`` selects (default: all three, in this order)."""


async def main(args: argparse.Namespace) -> dict[str, object]:
    parts = args.part or list(PARTS)
    results: dict[str, object] = {}
    if "propagation-embedded" in parts:
        async with open_store("memory://") as mem:
            results["embedded_propagation"] = await propagation(mem, args.changes)
    if "propagation-etcd" not in parts and "full-sync" not in parts:
        return results
    with tempfile.TemporaryDirectory() as tmp:
        server = EtcdServer.launch(Path(tmp))
        try:
            async with open_store(server.url) as store:
                if "propagation-etcd" in parts:
                    results["etcd_propagation"] = await propagation(store, args.changes)
                    await store.delete_prefix(keys.ROOT)
                if "full-sync" in parts:
                    items = dataset(args.services)
                    results["records"] = len(items)
                    results["etcd_bulk_load_s"] = await trio.to_thread.run_sync(
                        bulk_load_etcd, server.endpoint, items
                    )
                    results.update(await full_sync(store, "etcd"))
                    took, n = await trio.to_thread.run_sync(raw_range_etcd, server.endpoint)
                    results["etcd_raw_range_unlimited_s"] = took
                    results["etcd_raw_range_keys"] = n
        finally:
            server.kill()
    if "full-sync" in parts:
        # The same Reset from the embedded store (no gRPC message-size limit in the way).
        async with open_store("memory://") as mem:
            t0 = time.perf_counter()
            for k, v in dataset(args.services):
                await mem.put(k, v)
            results["embedded_load_s"] = time.perf_counter() - t0
            results.update(await full_sync(mem, "embedded"))
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--changes", type=int)
    ap.add_argument("--services", type=int)
    ap.add_argument("--part", action="append", choices=PARTS, help="repeatable; default all")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout (bench.run)")
    a = ap.parse_args()
    a.changes = a.changes or (300 if a.short else 1000)
    a.services = a.services or (100 if a.short else 1000)
    res = trio.run(main, a)
    if a.json:
        print(json.dumps(res))
        sys.exit(0)
    print(f"# {platform.node()} {platform.processor() or platform.machine()} "
          f"python {platform.python_version()} changes={a.changes} services/cluster={a.services}")
    for k, v in res.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
