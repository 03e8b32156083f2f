"""The drill's load generator: requests on a fixed schedule through a source's sidecar.

Each traffic source sends request ``i`` at ``start + i / rate`` (its *scheduled* time) with
at most ``concurrency`` in flight. A request that has to wait for a slot starts late but is
recorded from its scheduled time, so queueing behind stuck requests counts as latency (no
coordinated omission); its deadline (``timeout``) also runs from the scheduled time.

Pure: :func:`schedule` and :func:`to_record`. The sender is a thin trio adapter over the
one-shot client of ``meshfed call`` (``federation.cli.up.traffic.call_once``): one TCP
connection per request, HTTP/1.1 GET (or one tcp line), answered by a demo app that says
which workload, cluster and zone served it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import trio

from chaos.drill import TrafficSource
from chaos.record import RequestRecord
from federation.cli.up.traffic import CallResult, call_once
from federation.config.model import FederationConfig

__all__ = ["error_kind", "run_source", "schedule", "source_listener", "to_record"]


def schedule(source: TrafficSource) -> Iterator[float]:
    """Scheduled start times of a source's requests (seconds from t0), in order."""
    n = int(source.duration * source.rate + 1e-9)
    for i in range(n):
        yield source.start + i / source.rate


def error_kind(result: CallResult) -> str:
    """The judge's error kind of a failed call (``timeout``, ``reset``, ``refused``, ``5xx``...)."""
    code = result.code
    if result.detail.startswith("no answer within"):
        return "timeout"  # the status line may have arrived, the body did not
    if code == "connect":
        return "refused"
    if code.isdigit():
        return f"{code[0]}xx"
    return code or "error"


def to_record(
    source: TrafficSource, t_start: float, t_end: float, result: CallResult
) -> RequestRecord:
    """The record of one request scheduled at ``t_start`` that ended at ``t_end``."""
    ok = result.ok
    return RequestRecord(
        t_start=t_start,
        t_end=t_end,
        source=f"{source.cluster}/{source.workload}",
        service=str(source.service),
        outcome="ok" if ok else "error",
        error_kind="" if ok else error_kind(result),
        latency=t_end - t_start,
        served_by_cluster=(result.served_cluster or "") if ok else "",
        served_by_zone=(result.served_zone or "") if ok else "",
        served_by_workload=(result.served_workload or "") if ok else "",
    )


def source_listener(source: TrafficSource, cfg: FederationConfig) -> str:
    """``host:port`` of the caller's sidecar upstream listener for the source's service."""
    for w in cfg.workloads:
        if w.cluster != source.cluster or w.name != source.workload:
            continue
        for u in w.upstreams:
            if str(u.service) == str(source.service) and (
                source.port is None or u.port in (None, source.port)
            ):
                return f"{u.listen.host}:{u.listen.port}"
    raise LookupError(
        f"{source.cluster}/{source.workload} has no upstream listener for {source.service}"
    )


async def run_source(
    source: TrafficSource,
    target: str,
    t0: float,
    emit: Callable[[RequestRecord], None],
) -> None:
    """Send the source's requests to ``target`` on schedule; ``emit`` every record."""
    slots = trio.Semaphore(source.concurrency)
    service = str(source.service)

    async def one(t_sched: float) -> None:
        try:
            remaining = t0 + t_sched + source.timeout - trio.current_time()
            if remaining <= 0:
                result = CallResult(False, 0.0, code="timeout", detail="waited for a slot")
            else:
                result = await call_once(source.protocol, target, service, timeout=remaining)
            emit(to_record(source, t_sched, trio.current_time() - t0, result))
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for t_sched in schedule(source):
            await trio.sleep_until(t0 + t_sched)
            await slots.acquire()
            nursery.start_soon(one, t_sched)
