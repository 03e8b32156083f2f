"""Revocations: published per trust domain, enforced by the validator.

A revocation names a certificate serial, a SPIFFE ID, or both, inside one trust
domain. Serials are 128-bit random numbers (see ``svid.py``), so a serial alone
identifies one certificate of that domain. Revoking a SPIFFE ID refuses every
SVID carrying it until the revocation is withdrawn (the operator re-admits the
workload by deleting the record, after fixing whatever went wrong).

JSON form (one record per store key ``/meshfed/v1/revocations/<td>/<segment>``)::

    {"trust_domain": "a.mesh", "serial": "9f3c...", "spiffe_id": null,
     "reason": "key compromise", "at": "2026-01-01T00:00:00+00:00"}

``serial`` is lower-case hex (a 128-bit integer does not fit a JSON number that
every reader handles exactly).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from trust.errors import InvalidSpiffeId, RevocationError
from trust.spiffe import SpiffeId, TrustDomain

__all__ = ["MAX_REASON_LEN", "Revocation", "RevocationSet"]

MAX_REASON_LEN = 512
_HEX_RE = re.compile(r"^[0-9a-f]{1,64}$")
_FIELDS = {"trust_domain", "serial", "spiffe_id", "reason", "at"}


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revoked certificate serial and/or SPIFFE ID in one trust domain."""

    trust_domain: TrustDomain
    """The domain whose CA issued what is revoked; revocations never cross domains."""
    serial: int | None
    """Revoked certificate serial, or None if only an ID is revoked."""
    spiffe_id: SpiffeId | None
    """Revoked SPIFFE ID (all its SVIDs), or None if only a serial is revoked."""
    reason: str
    """Operator's free-text reason, for logs and audit."""
    at: dt.datetime
    """When the revocation was made (timezone-aware)."""

    def __post_init__(self) -> None:
        if self.serial is None and self.spiffe_id is None:
            raise RevocationError("a revocation needs a serial, a SPIFFE ID, or both")
        if self.serial is not None and self.serial <= 0:
            raise RevocationError("serial must be a positive integer")
        if self.spiffe_id is not None and self.spiffe_id.trust_domain != self.trust_domain:
            raise RevocationError(
                f"SPIFFE ID {self.spiffe_id} is not in trust domain {self.trust_domain}"
            )
        if len(self.reason) > MAX_REASON_LEN:
            raise RevocationError(f"reason longer than {MAX_REASON_LEN} characters")
        if self.at.tzinfo is None:
            raise RevocationError("'at' must be timezone-aware")

    def store_segment(self) -> str:
        """The last store-key segment for this record: ``s-<serial hex>`` or ``id-<sha256/128>``.

        IDs are hashed because a SPIFFE path contains ``/`` and may be long.
        """
        if self.serial is not None:
            return f"s-{self.serial:x}"
        assert self.spiffe_id is not None
        return "id-" + hashlib.sha256(str(self.spiffe_id).encode()).hexdigest()[:32]

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), so equal records are equal bytes."""
        return json.dumps(
            {
                "trust_domain": self.trust_domain.name,
                "serial": None if self.serial is None else f"{self.serial:x}",
                "spiffe_id": None if self.spiffe_id is None else str(self.spiffe_id),
                "reason": self.reason,
                "at": self.at.astimezone(dt.UTC).isoformat(),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Revocation:
        """Parse a record; raise :class:`RevocationError` naming the broken rule."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RevocationError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise RevocationError("top level must be an object")
        unknown = set(doc) - _FIELDS
        if unknown:
            raise RevocationError(f"unknown fields {sorted(unknown)}")
        try:
            td = TrustDomain(_str(doc, "trust_domain"))
            serial_hex = doc.get("serial")
            serial = None
            if serial_hex is not None:
                if not isinstance(serial_hex, str) or not _HEX_RE.match(serial_hex):
                    raise RevocationError("serial must be lower-case hex")
                serial = int(serial_hex, 16)
            raw_id = doc.get("spiffe_id")
            if raw_id is not None and not isinstance(raw_id, str):
                raise RevocationError("spiffe_id must be a string")
            sid = None if raw_id is None else SpiffeId.parse(raw_id)
            reason = doc.get("reason", "")
            if not isinstance(reason, str):
                raise RevocationError("reason must be a string")
            at = dt.datetime.fromisoformat(_str(doc, "at"))
        except InvalidSpiffeId as exc:
            raise RevocationError(str(exc)) from None
        except ValueError as exc:
            raise RevocationError(f"bad timestamp: {exc}") from None
        return cls(td, serial, sid, reason, at)


def _str(doc: dict[str, object], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise RevocationError(f"{key!r} must be a string")
    return value


@dataclass(frozen=True)
class RevocationSet:
    """An immutable set of revocations with O(1) lookup by (domain, serial) and (domain, ID)."""

    revocations: tuple[Revocation, ...] = ()
    """Every revocation in force."""
    _serials: frozenset[tuple[TrustDomain, int]] = field(init=False, repr=False, compare=False)
    _ids: frozenset[SpiffeId] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "_serials",
            frozenset((r.trust_domain, r.serial) for r in self.revocations if r.serial is not None),
        )
        object.__setattr__(
            self,
            "_ids",
            frozenset(r.spiffe_id for r in self.revocations if r.spiffe_id is not None),
        )

    @classmethod
    def of(cls, revocations: Iterable[Revocation]) -> RevocationSet:
        """A set from any iterable of revocations."""
        return cls(tuple(revocations))

    def is_revoked(self, trust_domain: TrustDomain, serial: int, spiffe_id: SpiffeId) -> bool:
        """True if ``serial`` is revoked in ``trust_domain`` or ``spiffe_id`` is revoked."""
        # An ID's own domain is part of it, so a revoked ID can only match its own domain.
        return (trust_domain, serial) in self._serials or spiffe_id in self._ids

    def __len__(self) -> int:
        return len(self.revocations)
