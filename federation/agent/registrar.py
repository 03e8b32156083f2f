"""Endpoints registered at run time by local sidecars (implements ``EndpointRegistrar``).

Keyed by owner (a connection or sidecar id): when the owner's connection goes,
``drop_owner`` withdraws everything it registered.

An endpoint declared in the deployment config may be registered by its sidecar
when the registration matches the declaration (same identity, address, port,
locality and network; health and weight are the sidecar's to report). The
registration then overrides the declared record; when it is withdrawn the
declared record (published unhealthy) comes back. The registry only holds the
desired state; the publisher writes it (leased, compare-and-swap) when it may,
so registering never blocks on the store, and a registration made while the
store is down is published when it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from federation.model import EndpointRecord


class RegistrationRefused(ValueError):
    """A sidecar asked for something the agent will not publish; ``reason`` says what."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"endpoint {key}: {reason}")


class EndpointRegistry:
    """Run-time endpoints of one cluster, by owner."""

    def __init__(
        self,
        cluster: str,
        *,
        declared: Callable[[str], EndpointRecord | None] = lambda _key: None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.cluster = cluster
        self._declared = declared
        self._on_change = on_change
        self._by_owner: dict[str, dict[str, EndpointRecord]] = {}
        self._owner_of: dict[str, str] = {}

    def set_on_change(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change

    def records(self) -> Mapping[str, EndpointRecord]:
        """Every registered endpoint by store key."""
        return {k: self._by_owner[o][k] for k, o in self._owner_of.items()}

    def owners(self) -> dict[str, int]:
        return {o: len(r) for o, r in sorted(self._by_owner.items())}

    async def register(self, record: EndpointRecord, owner: str) -> None:
        key = record.key()
        if record.cluster != self.cluster:
            # An agent writes only its own cluster's keys.
            raise RegistrationRefused(
                key, f"belongs to cluster {record.cluster}, not {self.cluster}"
            )
        declared = self._declared(key)
        if declared is not None and _identity(declared) != _identity(record):
            raise RegistrationRefused(
                key,
                "does not match its declaration in the deployment config "
                f"(declared {_describe(declared)}, registered {_describe(record)})",
            )
        holder = self._owner_of.get(key)
        if holder is not None and holder != owner:
            raise RegistrationRefused(key, f"is registered by another owner ({holder})")
        if self._by_owner.get(owner, {}).get(key) == record:
            return
        self._by_owner.setdefault(owner, {})[key] = record
        self._owner_of[key] = owner
        self._on_change()

    async def deregister(self, record_key: str, owner: str) -> None:
        if self._owner_of.get(record_key) != owner:
            return
        del self._owner_of[record_key]
        owned = self._by_owner[owner]
        del owned[record_key]
        if not owned:
            del self._by_owner[owner]
        self._on_change()

    async def drop_owner(self, owner: str) -> None:
        owned = self._by_owner.pop(owner, None)
        if not owned:
            return
        for key in owned:
            del self._owner_of[key]
        self._on_change()


def _identity(r: EndpointRecord) -> tuple[object, ...]:
    """What a registration may not change about a declared endpoint."""
    return (r.spiffe_id, r.address, r.port, r.locality, r.network)


def _describe(r: EndpointRecord) -> str:
    return f"{r.spiffe_id} at {r.address}:{r.port} in {r.locality} on {r.network}"
