"""Rotation: SVID renewal and the three-step CA rotation.

Pure parts (no trio, no clock; ``now`` and ``rng`` come from the caller):

* :class:`RenewalSchedule` -- when to renew an SVID (50 % of its lifetime,
  jittered, never past 90 %) and when to retry a failed renewal (exponential
  backoff with jitter, never sleeping past the SVID's expiry).
* :class:`CaRotation` -- the CA rotation state machine. Each step moves the
  ``spiffe_sequence`` the way peers need to see it::

      steady --publish--> published --switch--> switched --drop--> steady
      roots: [old]        [old, new] seq+1     [old, new]           [new] seq+1
      signs: old          old                  new                  new

  ``drop`` is refused while an SVID signed by the old CA could still be live:
  the state records the latest ``not_after`` each CA has issued.

Disk (:class:`CaDirectory`, synchronous file I/O; no trio)::

    <dir>/ca.key, ca.crt, [root.key]   the CA that signs now (``CertificateAuthority.load(dir)``
                                       keeps working for every other reader of the directory)
    <dir>/next/...                     the new CA, from ``publish`` until ``switch``
    <dir>/previous/...                 the old CA, from ``switch`` until ``drop`` (then deleted)
    <dir>/rotation.json                the :class:`CaRotation` state (public; 0644)

Private keys are always 0600 (created by ``CertificateAuthority.init``, moved
with ``os.replace``/``os.link``, which keep the mode).

trio part: :class:`SvidRotator`, a task that renews the SVID held by a
:class:`~trust.tls.TlsContextHolder` on schedule. New handshakes use the new
SVID; live connections keep the context they were made with. ``freeze()``/``thaw()``
suspend and resume renewal (an operator's knob; the ``cert-expire`` drill), and
:func:`identity_lapsing` (pure) says when a proxy whose SVID is about to lapse
should leave rotation.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import random
import shutil
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NoReturn, get_args

import trio
from cryptography import x509

from trust.atomicfile import write_atomic
from trust.bundle import TrustBundle
from trust.ca import CERT_FILE, KEY_FILE, ROOT_KEY_FILE, CertificateAuthority
from trust.errors import CaKeyError, TrustError
from trust.spiffe import SpiffeId, TrustDomain
from trust.svid import DEFAULT_SVID_TTL, Svid, issue_svid
from trust.tls import TlsContextHolder

__all__ = [
    "NEXT_DIR",
    "PREVIOUS_DIR",
    "STATE_FILE",
    "CaDirectory",
    "CaRotation",
    "RenewalSchedule",
    "RotationPhase",
    "RotationRefused",
    "RotationStep",
    "RotatorStatistics",
    "SvidRotator",
    "identity_lapsing",
]

log = logging.getLogger(__name__)

# -- SVID renewal (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RenewalSchedule:
    """When to renew an SVID and when to retry a failed renewal.

    Jitter spreads the renewals of workloads that started together (a rollout,
    a cluster restart) so they do not all hit the CA in the same second.
    """

    fraction: float = 0.5
    """Renew at this fraction of the lifetime (NotBefore to NotAfter)."""
    jitter: float = 0.1
    """Uniform jitter, as a fraction of the lifetime, added to ``fraction`` (+/-)."""
    latest: float = 0.9
    """Never plan a first attempt later than this fraction: leave room for retries."""
    retry_initial: dt.timedelta = dt.timedelta(seconds=1)
    """First retry delay after a failed renewal."""
    retry_max: dt.timedelta = dt.timedelta(minutes=2)
    """Retry delays double up to this cap."""

    def __post_init__(self) -> None:
        if not 0 < self.fraction < self.latest <= 1:
            raise ValueError("need 0 < fraction < latest <= 1")
        if not 0 <= self.jitter < self.fraction:
            raise ValueError("jitter must be in [0, fraction)")
        if not dt.timedelta(0) < self.retry_initial <= self.retry_max:
            raise ValueError("need 0 < retry_initial <= retry_max")

    def renew_at(
        self, not_before: dt.datetime, not_after: dt.datetime, rng: random.Random
    ) -> dt.datetime:
        """The time of the first renewal attempt for an SVID valid over this window."""
        lifetime = not_after - not_before
        share = self.fraction + rng.uniform(-self.jitter, self.jitter)
        return not_before + lifetime * min(share, self.latest)

    def retry_at(
        self, now: dt.datetime, attempt: int, not_after: dt.datetime, rng: random.Random
    ) -> dt.datetime:
        """When to make retry number ``attempt`` (1 for the first retry).

        Exponential backoff with "equal jitter" (half fixed, half random), capped
        at ``retry_max``; while the SVID is still valid the wait is also capped at
        half the time it has left, so a slow backoff never sleeps through expiry.
        """
        if attempt < 1:
            raise ValueError("attempt counts from 1")
        base: dt.timedelta = min(self.retry_max, self.retry_initial * (2 ** min(attempt - 1, 30)))
        delay: dt.timedelta = base / 2 + base / 2 * rng.random()
        remaining = not_after - now
        if remaining > dt.timedelta(0):
            delay = min(delay, max(self.retry_initial, remaining / 2))
        return now + delay


# -- SVID renewal (trio) ---------------------------------------------------------------------


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class RotatorStatistics:
    """What a :class:`SvidRotator` has done so far."""

    renewals: int
    """Successful renewals."""
    failures: int
    """Failed renewal attempts (each is retried)."""
    consecutive_failures: int
    """Failures since the last success; 0 when healthy."""
    next_attempt_at: dt.datetime | None
    """When the next attempt is planned (UTC), None before the first plan."""
    last_error: str | None
    """The last failure, for status output."""
    frozen: bool = False
    """Renewal is suspended by :meth:`SvidRotator.freeze` (an operator's or a drill's knob)."""


class SvidRotator:
    """Renews the SVID of a :class:`TlsContextHolder` on a :class:`RenewalSchedule`.

    ``renew()`` obtains a new SVID (from the local CA, or by CSR to the agent);
    any exception it raises is a failed attempt, retried with backoff, never a
    crash. A renewed SVID must carry the same SPIFFE ID. Sleeping uses
    ``trio.sleep``, so ``MockClock`` drives it; ``now_fn`` gives the wall-clock
    time certificates are compared with (tests derive it from trio's clock).
    """

    def __init__(
        self,
        holder: TlsContextHolder,
        renew: Callable[[], Awaitable[Svid]],
        *,
        rng: random.Random,
        schedule: RenewalSchedule | None = None,
        now_fn: Callable[[], dt.datetime] = _utc_now,
        on_renewed: Callable[[Svid], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._holder = holder
        self._renew = renew
        self._rng = rng
        self._schedule = schedule or RenewalSchedule()
        self._now = now_fn
        self._on_renewed = on_renewed
        self._on_failure = on_failure
        self._renewals = 0
        self._failures = 0
        self._consecutive = 0
        self._next: dt.datetime | None = None
        self._last_error: str | None = None
        self._frozen = False
        self._thawed = trio.Event()

    def freeze(self) -> None:
        """Suspend renewal: attempts that fall due wait for :meth:`thaw` (nothing is
        attempted, nothing fails). The SVID in use is left alone, so it expires for real at
        its NotAfter if the freeze lasts that long (the ``cert-expire`` drill)."""
        if not self._frozen:
            self._frozen = True
            self._thawed = trio.Event()

    def thaw(self) -> None:
        """Resume renewal; an attempt that fell due while frozen is made at once."""
        self._frozen = False
        self._thawed.set()

    def statistics(self) -> RotatorStatistics:
        """Counters and the next planned attempt."""
        return RotatorStatistics(
            self._renewals,
            self._failures,
            self._consecutive,
            self._next,
            self._last_error,
            self._frozen,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Renew forever (cancel the surrounding scope to stop)."""
        task_status.started()
        while True:
            svid = self._holder.svid
            now = self._now()
            if self._consecutive == 0:
                at = self._schedule.renew_at(svid.not_before, svid.not_after, self._rng)
            else:
                at = self._schedule.retry_at(now, self._consecutive, svid.not_after, self._rng)
            self._next = at
            delay = (at - now).total_seconds()
            if self._renewals and not self._consecutive:
                # A renew() that hands back an SVID already due for renewal (a CA
                # clipping lifetimes, a skewed clock) must not become a hot loop.
                delay = max(delay, self._schedule.retry_initial.total_seconds())
            await trio.sleep(max(0.0, delay))
            while self._frozen:
                await self._thawed.wait()
            try:
                new = await self._renew()
                if new.spiffe_id != svid.spiffe_id:
                    raise TrustError(f"renewal returned {new.spiffe_id}, expected {svid.spiffe_id}")
                self._holder.update(svid=new)
            except Exception as exc:  # renew() is caller code: any failure is retried
                self._failures += 1
                self._consecutive += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "SVID renewal failed",
                    extra={
                        "spiffe_id": str(svid.spiffe_id),
                        "attempt": self._consecutive,
                        "error": self._last_error,
                    },
                )
                if self._on_failure is not None:
                    self._on_failure(exc)
                continue
            self._renewals += 1
            self._consecutive = 0
            if self._on_renewed is not None:
                self._on_renewed(new)


def identity_lapsing(
    stats: RotatorStatistics,
    not_before: dt.datetime,
    not_after: dt.datetime,
    now: dt.datetime,
    *,
    margin_fraction: float = 0.1,
    min_margin: dt.timedelta = dt.timedelta(seconds=2),
) -> bool:
    """Whether a proxy should leave rotation (withdraw its endpoints): its SVID has expired,
    or expires within the margin (``margin_fraction`` of the lifetime, at least
    ``min_margin``) while renewal is frozen or failing, so nothing will replace it in time.
    Peers would refuse its handshakes from NotAfter on; withdrawing first moves traffic
    away without a failed request. False again once a renewal brings a fresh SVID."""
    if now >= not_after:
        return True
    stalled = stats.frozen or stats.consecutive_failures > 0
    margin = max(min_margin, (not_after - not_before) * margin_fraction)
    return stalled and now >= not_after - margin


# -- CA rotation (pure) ----------------------------------------------------------------------

RotationPhase = Literal["steady", "published", "switched"]
RotationStep = Literal["publish", "switch", "drop"]
_PHASES: tuple[str, ...] = get_args(RotationPhase)
_NEXT_STEP: dict[str, RotationStep] = {
    "steady": "publish",
    "published": "switch",
    "switched": "drop",
}


class RotationRefused(TrustError):
    """A rotation step cannot be taken now; ``hint`` says what to do instead.

    ``reason``: ``out_of_order`` (wrong step for the phase), ``old_svids_live``
    (drop before the old CA's SVIDs have expired), ``not_propagated`` (the
    previous step's bundle is not yet where peers read it), ``bad_state``.
    """

    def __init__(self, reason: str, problem: str, hint: str) -> None:
        self.reason = reason
        self.problem = problem
        self.hint = hint
        super().__init__(f"rotation refused: {problem} ({hint})")


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(dt.UTC).isoformat()


def _parse_time(doc: dict[str, object], key: str) -> dt.datetime | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be an ISO time or null")
    t = dt.datetime.fromisoformat(value)
    if t.tzinfo is None:
        raise ValueError(f"{key} must carry a timezone")
    return t


def _later(a: dt.datetime | None, b: dt.datetime) -> dt.datetime:
    return b if a is None or b > a else a


@dataclass(frozen=True, slots=True)
class CaRotation:
    """The CA rotation state of one trust domain; transitions return a new state.

    Invariant: ``previous_issued_until`` is set only in phase ``switched``.
    """

    phase: RotationPhase = "steady"
    """Where the rotation stands (see the module docstring)."""
    sequence: int = 1
    """``spiffe_sequence`` of the bundle this CA publishes now."""
    active_issued_until: dt.datetime | None = None
    """Latest NotAfter of any SVID the signing CA has issued (None: none issued)."""
    previous_issued_until: dt.datetime | None = None
    """Latest NotAfter issued by the old CA (phase ``switched``): drop waits for it."""

    def __post_init__(self) -> None:
        if self.phase not in _PHASES:
            raise ValueError(f"unknown rotation phase {self.phase!r}")
        if self.sequence < 0:
            raise ValueError("sequence must be non-negative")
        if self.previous_issued_until is not None and self.phase != "switched":
            raise ValueError("previous_issued_until only exists while switched")

    @property
    def next_step(self) -> RotationStep:
        """The only step allowed from this phase."""
        return _NEXT_STEP[self.phase]

    def _require(self, step: RotationStep) -> None:
        if step != self.next_step:
            raise RotationRefused(
                "out_of_order",
                f"step {step!r} is not allowed in phase {self.phase!r}",
                f"the next step is {self.next_step!r}",
            )

    def record_issued(self, not_after: dt.datetime) -> CaRotation:
        """The signing CA issued an SVID valid until ``not_after``."""
        return replace(self, active_issued_until=_later(self.active_issued_until, not_after))

    def publish(self) -> CaRotation:
        """Step 1: a new root joins the bundle (sequence + 1); the old CA keeps signing."""
        self._require("publish")
        return replace(self, phase="published", sequence=self.sequence + 1)

    def switch(self) -> CaRotation:
        """Step 2: the new CA signs; the bundle (both roots) does not change."""
        self._require("switch")
        return CaRotation(
            phase="switched",
            sequence=self.sequence,
            active_issued_until=None,
            previous_issued_until=self.active_issued_until,
        )

    def drop_allowed_at(self) -> dt.datetime | None:
        """Earliest time ``drop`` is allowed (None: now, nothing of the old CA is live)."""
        return self.previous_issued_until

    def drop(self, now: dt.datetime) -> CaRotation:
        """Step 3: the old root leaves the bundle (sequence + 1).

        Refused while an SVID signed by the old CA could still be valid, because
        peers would then refuse it: the old root is its only anchor.
        """
        self._require("drop")
        until = self.previous_issued_until
        if until is not None and now < until:
            left = until - now
            raise RotationRefused(
                "old_svids_live",
                f"SVIDs signed by the old CA may be valid until {_iso(until)} "
                f"({_human(left)} from now)",
                "renew every workload with the new CA and run the drop step after that time",
            )
        return CaRotation(
            phase="steady",
            sequence=self.sequence + 1,
            active_issued_until=self.active_issued_until,
        )

    def to_json(self) -> str:
        """The ``rotation.json`` document."""
        return json.dumps(
            {
                "phase": self.phase,
                "sequence": self.sequence,
                "active_issued_until": _iso(self.active_issued_until),
                "previous_issued_until": _iso(self.previous_issued_until),
            },
            sort_keys=True,
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> CaRotation:
        """Parse ``rotation.json``; ValueError naming the broken field."""
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("top level must be an object")
        unknown = set(doc) - {"phase", "sequence", "active_issued_until", "previous_issued_until"}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        phase, sequence = doc.get("phase"), doc.get("sequence")
        if phase not in _PHASES:
            raise ValueError(f"phase must be one of {list(_PHASES)}")
        if not isinstance(sequence, int) or isinstance(sequence, bool):
            raise ValueError("sequence must be an integer")
        return cls(
            phase=phase,
            sequence=sequence,
            active_issued_until=_parse_time(doc, "active_issued_until"),
            previous_issued_until=_parse_time(doc, "previous_issued_until"),
        )


def _human(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d{hours}h"
    if hours:
        return f"{sign}{hours}h{minutes:02d}m"
    if minutes:
        return f"{sign}{minutes}m{secs:02d}s"
    return f"{sign}{secs}s"


# -- CA directory on disk --------------------------------------------------------------------

STATE_FILE = "rotation.json"
LOCK_FILE = ".rotation.lock"
NEXT_DIR = "next"
PREVIOUS_DIR = "previous"
_CA_FILES = (ROOT_KEY_FILE, KEY_FILE, CERT_FILE)


@dataclass
class CaDirectory:
    """A CA directory with its rotation state (layout in the module docstring).

    Every SVID this CA signs must go through :meth:`issue` (or be reported with
    :meth:`record_issued`): that record is what makes the drop step safe.
    """

    path: Path
    """The directory."""
    state: CaRotation = field(default_factory=CaRotation)
    """Current rotation state (``rotation.json``; a missing file means steady, sequence 1)."""

    @classmethod
    def init(
        cls, path: Path, trust_domain: TrustDomain, now: dt.datetime, *, intermediate: bool = False
    ) -> CaDirectory:
        """Create a CA in ``path`` (which must not hold one) with a fresh rotation state."""
        if (path / STATE_FILE).exists():
            raise CaKeyError(
                str(path / STATE_FILE), "already exists", "use an empty directory for a new CA"
            )
        CertificateAuthority.init(path, trust_domain, now, intermediate=intermediate)
        ca_dir = cls(path, CaRotation())
        ca_dir._save()
        return ca_dir

    @classmethod
    def open(cls, path: Path) -> CaDirectory:
        """Open an existing CA directory; CaKeyError / RotationRefused say what is wrong."""
        if not (path / CERT_FILE).exists() and not (path / KEY_FILE).exists():
            raise CaKeyError(
                str(path), "holds no CA", "run `meshfed trust init --dir` for a new CA"
            )
        return cls(path, _read_state(path))

    def refresh(self) -> CaRotation:
        """Re-read ``rotation.json``: another process (the CLI, an agent) may have changed it."""
        self.state = _read_state(self.path)
        return self.state

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive access to the rotation state across processes, state re-read first.

        The agent records every SVID it signs while an operator runs ``meshfed trust
        rotate`` in another process; without this, one would write back a stale copy
        of the other's state (seen in the ca-rotation drill: a signature right after
        ``publish`` put the phase back to ``steady``).
        """
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.refresh()
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def active(self) -> CertificateAuthority:
        """The CA that signs now (loads and checks the key: mode, owner, match)."""
        return CertificateAuthority.load(self.path)

    def next(self) -> CertificateAuthority | None:
        """The new CA during phase ``published``."""
        return (
            CertificateAuthority.load(self.path / NEXT_DIR)
            if self.state.phase == "published"
            else None
        )

    def previous_root(self) -> x509.Certificate | None:
        """The old root during phase ``switched`` (its key is not needed any more)."""
        if self.state.phase != "switched":
            return None
        return _load_root(self.path / PREVIOUS_DIR / CERT_FILE)

    @property
    def trust_domain(self) -> TrustDomain:
        """The domain this CA signs for (from its root, without touching the key)."""
        cert_path = self.path / CERT_FILE
        root = _load_root(cert_path)
        try:
            san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            return TrustDomain.parse(san.get_values_for_type(x509.UniformResourceIdentifier)[0])
        except (x509.ExtensionNotFound, IndexError, ValueError):
            raise CaKeyError(
                str(cert_path), "root does not name its trust domain", "re-create the CA"
            ) from None

    def bundle_roots(self) -> tuple[x509.Certificate, ...]:
        """The roots to publish now, in order: old first during a rotation."""
        active = _load_root(self.path / CERT_FILE)
        if self.state.phase == "published":
            return (active, _load_root(self.path / NEXT_DIR / CERT_FILE))
        if self.state.phase == "switched":
            prev = self.previous_root()
            assert prev is not None
            return (prev, active)
        return (active,)

    def bundle(self, sequence: int | None = None) -> TrustBundle:
        """This domain's bundle as it should be published now."""
        seq = self.state.sequence if sequence is None else sequence
        return TrustBundle(self.trust_domain, self.bundle_roots(), seq)

    def issue(
        self, spiffe_id: SpiffeId, now: dt.datetime, ttl: dt.timedelta = DEFAULT_SVID_TTL
    ) -> Svid:
        """Issue an SVID with the signing CA and record its NotAfter (saved before returning)."""
        svid = issue_svid(self.active(), spiffe_id, now, ttl)
        self.record_issued(svid.not_after)
        return svid

    def record_issued(self, not_after: dt.datetime) -> None:
        """Record an SVID the signing CA issued elsewhere (e.g. by the agent from a CSR)."""
        with self._locked():
            self.state = self.state.record_issued(not_after)
            self._save()

    def rotate(self, step: RotationStep, now: dt.datetime) -> TrustBundle:
        """Take one rotation step on disk; return the bundle to publish afterwards."""
        with self._locked():
            if step == "publish":
                self._publish(now)
            elif step == "switch":
                self._switch()
            else:
                self._drop(now)
            return self.bundle()

    def _publish(self, now: dt.datetime) -> None:
        new_state = self.state.publish()
        active = self.active()  # refuse early if the current key is unusable
        nxt = self.path / NEXT_DIR
        if (nxt / CERT_FILE).exists():
            # An interrupted publish left the new CA behind: reuse it (its root may
            # already have reached peers), after checking it loads cleanly.
            CertificateAuthority.load(nxt)
        else:
            if nxt.exists():
                shutil.rmtree(nxt)
            CertificateAuthority.init(
                nxt, active.trust_domain, now, intermediate=(self.path / ROOT_KEY_FILE).exists()
            )
        self.state = new_state
        self._save()

    def _switch(self) -> None:
        new_state = self.state.switch()
        nxt, prev = self.path / NEXT_DIR, self.path / PREVIOUS_DIR
        CertificateAuthority.load(nxt)  # the new key must be usable before anything moves
        prev.mkdir(mode=0o700, exist_ok=True)
        # Link every old file into previous/ before replacing anything, so a re-run
        # after a crash never links a new file as "previous". os.replace keeps 0600.
        for name in _CA_FILES:
            if (self.path / name).exists() and not (prev / name).exists():
                os.link(self.path / name, prev / name)
        for name in _CA_FILES:
            if (nxt / name).exists():
                os.replace(nxt / name, self.path / name)
            elif name == ROOT_KEY_FILE:
                (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(nxt)
        self.state = new_state
        self._save()

    def _drop(self, now: dt.datetime) -> None:
        new_state = self.state.drop(now)
        # The old keys sign nothing any more; keeping them only widens exposure.
        shutil.rmtree(self.path / PREVIOUS_DIR, ignore_errors=True)
        self.state = new_state
        self._save()

    def _save(self) -> None:
        write_atomic(self.path / STATE_FILE, self.state.to_json().encode() + b"\n", mode=0o644)


def _read_state(path: Path) -> CaRotation:
    state_path = path / STATE_FILE
    try:
        return CaRotation.from_json(state_path.read_bytes())
    except FileNotFoundError:
        return CaRotation()
    except (ValueError, OSError) as exc:
        raise RotationRefused(
            "bad_state", f"{state_path} is unreadable ({exc})", "restore it from backup"
        ) from None


def _load_root(cert_path: Path) -> x509.Certificate:
    """The last certificate of a CA chain file (the root)."""
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except FileNotFoundError:
        raise CaKeyError(str(cert_path), "missing", "restore it from backup") from None
    except ValueError:
        raise CaKeyError(str(cert_path), "is not PEM certificates", "restore it") from None
    return certs[-1]
