"""Revocation enforcement on live connections.

New handshakes are checked by ``verify_peer(..., revoked=...)``. A connection
that was accepted before its peer was revoked must be closed too (BAD_INPUTS
10): :class:`LiveConnectionRegistry` is the pure core that, given a new
:class:`~trust.revocation.RevocationSet`, says which live connections to close;
:class:`RevocationEnforcer` is the trio adapter that cancels their scopes.

Usage in a server's per-connection task::

    peer = await handshake_and_verify(stream, bundles, now, revoked=enforcer.revoked)
    with enforcer.track(peer) as scope:   # cancelled if the peer is revoked later
        await serve(stream)
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from trust.revocation import RevocationSet
from trust.validate import VerifiedPeer

__all__ = ["EnforcerStatistics", "LiveConnectionRegistry", "RevocationEnforcer"]


class LiveConnectionRegistry:
    """Connection id -> the peer it was verified as. Pure: no I/O, no clock."""

    def __init__(self) -> None:
        self._peers: dict[int, VerifiedPeer] = {}

    def add(self, conn_id: int, peer: VerifiedPeer) -> None:
        """Register a live connection; ids are unique while registered."""
        if conn_id in self._peers:
            raise ValueError(f"connection {conn_id} is already registered")
        self._peers[conn_id] = peer

    def remove(self, conn_id: int) -> None:
        """Forget a connection (it closed); unknown ids are ignored."""
        self._peers.pop(conn_id, None)

    def peer(self, conn_id: int) -> VerifiedPeer | None:
        """The peer of a registered connection."""
        return self._peers.get(conn_id)

    def __len__(self) -> int:
        return len(self._peers)

    def revoked(self, revocations: RevocationSet) -> list[int]:
        """Ids of the registered connections whose peer ``revocations`` refuses, sorted."""
        return sorted(
            cid
            for cid, p in self._peers.items()
            if revocations.is_revoked(p.spiffe_id.trust_domain, p.serial, p.spiffe_id)
        )

    def expired(self, now: dt.datetime) -> list[int]:
        """Ids of connections whose peer certificate has expired by ``now``, sorted.

        TLS never re-checks a certificate after the handshake; a caller that wants
        connections to end with their credentials closes these.
        """
        return sorted(cid for cid, p in self._peers.items() if now > p.not_after)


@dataclass(frozen=True, slots=True)
class EnforcerStatistics:
    """Counters of a :class:`RevocationEnforcer`."""

    live: int
    """Connections tracked now."""
    closed: int
    """Connections closed because their peer was revoked."""
    revocations: int
    """Revocation records in force."""


class RevocationEnforcer:
    """Closes live connections whose peer gets revoked; holds the set for new handshakes."""

    def __init__(
        self,
        revoked: RevocationSet | None = None,
        *,
        on_close: Callable[[VerifiedPeer], None] | None = None,
    ) -> None:
        self._revoked = revoked or RevocationSet()
        self._registry = LiveConnectionRegistry()
        self._scopes: dict[int, trio.CancelScope] = {}
        self._ids = itertools.count(1)
        self._closed = 0
        self._on_close = on_close

    @property
    def revoked(self) -> RevocationSet:
        """The revocations in force: pass this to ``handshake_and_verify``."""
        return self._revoked

    def statistics(self) -> EnforcerStatistics:
        """Counters."""
        return EnforcerStatistics(len(self._registry), self._closed, len(self._revoked))

    @contextmanager
    def track(self, peer: VerifiedPeer) -> Iterator[trio.CancelScope]:
        """Run a connection's work inside the yielded scope; it is cancelled on revocation.

        A peer revoked between its handshake and this call is cancelled at once,
        so there is no window in which a revoked peer's connection escapes.
        """
        cid = next(self._ids)
        scope = trio.CancelScope()
        self._registry.add(cid, peer)
        self._scopes[cid] = scope
        if cid in self._registry.revoked(self._revoked):
            self._close(cid)
        try:
            with scope:
                yield scope
        finally:
            self._registry.remove(cid)
            self._scopes.pop(cid, None)

    def update(self, revoked: RevocationSet) -> int:
        """Install a new revocation set; cancel connections it revokes; return how many."""
        self._revoked = revoked
        doomed = self._registry.revoked(revoked)
        for cid in doomed:
            self._close(cid)
        return len(doomed)

    def _close(self, cid: int) -> None:
        peer = self._registry.peer(cid)
        scope = self._scopes.get(cid)
        self._registry.remove(cid)
        if scope is None or peer is None:
            return
        scope.cancel()
        self._closed += 1
        if self._on_close is not None:
            self._on_close(peer)
