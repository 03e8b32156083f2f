"""One-time join tokens: how a workload without an SVID gets its first one.

An operator issues a token for one SPIFFE ID (``meshfed`` prints it once); the
workload presents it to its agent with its first CSR (``authorization: JoinToken
<token>``); the agent redeems it, which burns it, and signs the CSR for the token's
identity. Later CSRs are authenticated by the current SVID instead.

Token form: ``mfjt1.<id>.<secret>``. ``id`` (16 hex digits) finds the entry, so the
secret is never used as a dictionary key (a lookup by secret would leak through
timing); the entry holds only SHA-256 of the secret, compared in constant time, so
a copy of the book (or its file) cannot be replayed as tokens.

:class:`JoinTokenBook` is pure (time and randomness are arguments). :class:`JoinTokenFile`
keeps one on disk, 0600, written atomically after every change and *before* the
change takes effect for the caller, so a restarted agent honours every unused token
and never a used one.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import random
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

from trust.atomicfile import write_atomic
from trust.errors import InvalidSpiffeId
from trust.spiffe import SpiffeId

__all__ = [
    "MAX_TTL",
    "JoinTokenBook",
    "JoinTokenError",
    "JoinTokenFile",
    "JoinTokenFileError",
    "JoinTokenReason",
    "TokenEntry",
]

PREFIX: Final = "mfjt1"
MAX_TTL: Final = 7 * 24 * 3600.0
"""Longest token lifetime accepted by :meth:`JoinTokenBook.issue` (seconds)."""

USED_RETENTION: Final = 24 * 3600.0
"""How long a used or expired entry is kept after its expiry, so a replay is reported
as ``used``/``expired`` rather than ``unknown`` (either way it is refused)."""

_TOKEN_RE: Final = re.compile(r"\Amfjt1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})\Z")
_SECRET_BYTES: Final = 32
_SCHEMA: Final = 1

JoinTokenReason = Literal["malformed", "unknown", "expired", "used"]


class JoinTokenError(Exception):
    """A token was refused; ``reason`` is a stable metric label."""

    def __init__(self, reason: JoinTokenReason, detail: str) -> None:
        self.reason: JoinTokenReason = reason
        self.detail = detail
        super().__init__(f"join token refused ({reason}): {detail}")


class JoinTokenFileError(Exception):
    """The token file cannot be used (unreadable, corrupt, or not private); names the fix."""


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """What the book keeps about one token (never the token itself)."""

    spiffe_id: SpiffeId
    """The identity the token's holder will be issued."""
    secret_sha256: bytes
    """SHA-256 of the token's secret part."""
    expires_at: float
    """Redeemable while ``now < expires_at`` (the caller's clock, seconds)."""
    used_at: float | None = None
    """When it was redeemed; a used token is refused forever."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class JoinTokenBook:
    """Issued tokens by id. Pure: ``now`` and ``rng`` come from the caller."""

    def __init__(self, entries: dict[str, TokenEntry] | None = None) -> None:
        self._entries: dict[str, TokenEntry] = dict(entries or {})

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> dict[str, TokenEntry]:
        """A copy of the entries by token id."""
        return dict(self._entries)

    def issue(
        self,
        spiffe_id: SpiffeId,
        ttl: float,
        now: float,
        rng: random.Random | None = None,
    ) -> str:
        """A new token for ``spiffe_id`` valid for ``ttl`` seconds; the only copy is returned.

        ``rng`` defaults to ``random.SystemRandom()`` (the OS CSPRNG); pass a seeded
        ``random.Random`` only in tests.
        """
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl must be within (0, {MAX_TTL:g}] seconds, got {ttl!r}")
        if not spiffe_id.path:
            raise ValueError(f"a join token names a workload; {spiffe_id} has no path")
        source = rng if rng is not None else random.SystemRandom()
        while True:
            token_id = source.randbytes(8).hex()
            if token_id not in self._entries:
                break
        secret = _b64(source.randbytes(_SECRET_BYTES))
        self._entries[token_id] = TokenEntry(
            spiffe_id, hashlib.sha256(secret.encode("ascii")).digest(), now + ttl
        )
        return f"{PREFIX}.{token_id}.{secret}"

    def check(self, token: str, now: float) -> SpiffeId:
        """The identity ``token`` would redeem for, without burning it; raise JoinTokenError."""
        token_id, _ = self._lookup(token, now)
        return self._entries[token_id].spiffe_id

    def redeem(self, token: str, now: float) -> SpiffeId:
        """Burn ``token`` and return its identity; raise JoinTokenError (unknown/expired/used)."""
        token_id, entry = self._lookup(token, now)
        self._entries[token_id] = replace(entry, used_at=now)
        return entry.spiffe_id

    def _lookup(self, token: str, now: float) -> tuple[str, TokenEntry]:
        m = _TOKEN_RE.match(token)
        if m is None:
            raise JoinTokenError("malformed", f"not of the form {PREFIX}.<16 hex>.<43 base64url>")
        token_id, secret = m.group(1), m.group(2)
        entry = self._entries.get(token_id)
        # Same work whether or not the id exists, so timing says nothing about ids.
        digest = hashlib.sha256(secret.encode("ascii")).digest()
        expected = entry.secret_sha256 if entry is not None else bytes(32)
        if not hmac.compare_digest(digest, expected) or entry is None:
            raise JoinTokenError("unknown", f"no token {token_id} was issued by this agent")
        if entry.used_at is not None:
            raise JoinTokenError("used", f"token {token_id} was already redeemed")
        if now >= entry.expires_at:
            raise JoinTokenError("expired", f"token {token_id} expired")
        return token_id, entry

    def prune(self, now: float, retention: float = USED_RETENTION) -> int:
        """Forget entries expired for more than ``retention`` seconds; returns how many."""
        old = [k for k, e in self._entries.items() if now >= e.expires_at + retention]
        for k in old:
            del self._entries[k]
        return len(old)

    def to_json(self) -> bytes:
        """Canonical JSON of the book (hashes only; no token can be rebuilt from it)."""
        obj: dict[str, Any] = {
            "schema": _SCHEMA,
            "tokens": {
                k: {
                    "spiffe_id": str(e.spiffe_id),
                    "sha256": e.secret_sha256.hex(),
                    "expires_at": e.expires_at,
                    "used_at": e.used_at,
                }
                for k, e in sorted(self._entries.items())
            },
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes) -> JoinTokenBook:
        """Parse :meth:`to_json` output; raise ValueError naming the bad field."""
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("schema") != _SCHEMA:
            raise ValueError(f"not a schema-{_SCHEMA} join token book")
        tokens = obj.get("tokens")
        if not isinstance(tokens, dict):
            raise ValueError("tokens: must be an object")
        entries: dict[str, TokenEntry] = {}
        for k, e in tokens.items():
            where = f"tokens.{k}"
            if not re.fullmatch(r"[0-9a-f]{16}", k) or not isinstance(e, dict):
                raise ValueError(f"{where}: bad token id or entry")
            try:
                sid = SpiffeId.parse(e["spiffe_id"])
                digest = bytes.fromhex(e["sha256"])
                expires = float(e["expires_at"])
                used = e["used_at"]
            except (KeyError, TypeError, ValueError, InvalidSpiffeId) as exc:
                raise ValueError(f"{where}: {exc}") from None
            if len(digest) != 32 or not (used is None or isinstance(used, int | float)):
                raise ValueError(f"{where}: bad sha256 or used_at")
            entries[k] = TokenEntry(sid, digest, expires, None if used is None else float(used))
        return cls(entries)


class JoinTokenFile:
    """A :class:`JoinTokenBook` persisted to ``path`` (0600, atomic replace, fsync).

    Every change is on disk before the method returns; if the write fails the
    change is undone in memory and the error raised, so a token is never reported
    redeemed unless a restart would also see it redeemed.

    The file is shared by the running agent (which redeems) and ``meshfed agent
    token create`` (which issues): every change re-reads the file under an
    exclusive ``flock`` before writing, so neither side overwrites the other's
    tokens or burns.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.book = self._load()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.book = self._load()
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _load(self) -> JoinTokenBook:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return JoinTokenBook()
        except OSError as exc:
            raise JoinTokenFileError(f"{self.path}: cannot open ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_IMODE(mode) & 0o077:
                raise JoinTokenFileError(
                    f"{self.path}: readable or writable by group/others; chmod 600 {self.path}"
                )
            data = f.read()
        try:
            return JoinTokenBook.from_json(data)
        except ValueError as exc:
            raise JoinTokenFileError(
                f"{self.path}: corrupt join token file ({exc}); move it away and issue new tokens"
            ) from None

    def _save(self, book: JoinTokenBook) -> None:
        write_atomic(self.path, book.to_json(), mode=0o600)

    def _commit(self, change: JoinTokenBook) -> None:
        self._save(change)
        self.book = change

    def issue(
        self, spiffe_id: SpiffeId, ttl: float, now: float, rng: random.Random | None = None
    ) -> str:
        """Issue and persist; see :meth:`JoinTokenBook.issue`."""
        with self._locked():
            book = JoinTokenBook(self.book.entries())
            book.prune(now)
            token = book.issue(spiffe_id, ttl, now, rng)
            self._commit(book)
        return token

    def check(self, token: str, now: float) -> SpiffeId:
        """See :meth:`JoinTokenBook.check` (nothing is written; re-reads the file)."""
        self.book = self._load()
        return self.book.check(token, now)

    def redeem(self, token: str, now: float) -> SpiffeId:
        """Redeem and persist the burn before returning; see :meth:`JoinTokenBook.redeem`."""
        with self._locked():
            book = JoinTokenBook(self.book.entries())
            sid = book.redeem(token, now)
            book.prune(now)
            self._commit(book)
        return sid
