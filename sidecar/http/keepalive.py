"""Keepalive and idle close of one HTTP/2 connection: a pure core (no I/O, no clock).

A pooled connection to a peer that silently died (host gone, path blackholed, no RST)
never reads EOF; without a probe the pool keeps handing it out and every request on it
hangs until its timeout. :class:`Keepalive` decides when to probe, when to give up,
and when an unused connection should go:

* **PING** once nothing at all was received for ``interval`` (gRPC's keepalive time:
  any frame proves the peer alive, so a busy connection is never probed, and a
  connection whose requests wait on a silent peer is probed ``interval`` after the
  peer's last frame, streams or not);
* **dead** when that PING is not acknowledged within ``timeout``: the adapter takes
  the connection out of its pool and fails its streams;
* **idle close** when the connection carried no stream for ``idle_timeout``: the
  adapter closes it with GOAWAY ``NO_ERROR``.

The adapter feeds it ``received(now)`` for every read, ``ping_acked(now)`` for the
ACK of the PING it sent on :attr:`Action.PING`, ``streams_changed(active, now)``
whenever the count of live streams changes, and calls :meth:`Keepalive.poll` at
:meth:`Keepalive.next_deadline` (early calls are harmless: they answer
:attr:`Action.NONE`). Deadlines only move later on ``received``/``ping_acked``;
they move earlier when the last stream ends (the idle clock starts), so the adapter
re-reads :meth:`next_deadline` then.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from federation.config.model import ConnectionPool

__all__ = ["Action", "Keepalive", "KeepaliveConfig", "keepalive_config"]


@dataclass(frozen=True, slots=True)
class KeepaliveConfig:
    """Keepalive and idle settings of one connection (seconds on the adapter's clock)."""

    interval: float | None = 5.0
    """PING after this long without receiving anything; None: never PING."""
    timeout: float = 3.0
    """A PING unanswered this long means the peer is gone."""
    idle_timeout: float | None = 300.0
    """Close a connection without streams for this long; None: never."""

    def __post_init__(self) -> None:
        for name in ("interval", "idle_timeout"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout must be positive, got {self.timeout!r}")


def keepalive_config(pool: ConnectionPool) -> KeepaliveConfig:
    """The settings of a service's ``traffic_policy.connection_pool``."""
    return KeepaliveConfig(
        interval=pool.keepalive_interval,
        timeout=pool.keepalive_timeout,
        idle_timeout=pool.idle_timeout,
    )


class Action(enum.Enum):
    """What :meth:`Keepalive.poll` asks the adapter to do now."""

    NONE = "none"
    """Nothing is due."""
    PING = "ping"
    """Send one PING (the core now counts it outstanding)."""
    DEAD = "keepalive_timeout"
    """The PING went unanswered: the connection is dead; fail its streams, drop it."""
    IDLE = "idle_timeout"
    """No stream for ``idle_timeout``: close gracefully (GOAWAY ``NO_ERROR``)."""


class Keepalive:
    """The keepalive/idle state of one connection (see the module docstring).

    Invariants: at most one PING is outstanding; :meth:`poll` answers DEAD before
    IDLE before PING; once DEAD or IDLE was answered every later poll repeats it.
    """

    def __init__(self, config: KeepaliveConfig, now: float) -> None:
        self.config = config
        self.last_received = now
        """When the peer's last bytes arrived (or the connection started)."""
        self.ping_sent: float | None = None
        """When the outstanding PING was sent, or None."""
        self.active_streams = 0
        self.idle_since: float | None = now
        """When the last stream ended (or the connection started); None while streams live."""
        self._final: Action | None = None

    # -- inputs ------------------------------------------------------------------------

    def received(self, now: float) -> None:
        """Bytes arrived from the peer."""
        self.last_received = max(self.last_received, now)

    def ping_acked(self, now: float) -> None:
        """The outstanding PING was acknowledged."""
        self.ping_sent = None
        self.received(now)

    def streams_changed(self, active: int, now: float) -> None:
        """The number of live streams is now ``active``."""
        if active == 0 and self.idle_since is None:
            self.idle_since = now
        elif active > 0:
            self.idle_since = None
        self.active_streams = active

    # -- decisions ---------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When :meth:`poll` may next answer something other than NONE (inf: never)."""
        if self._final is not None:
            return -math.inf
        c = self.config
        times = [math.inf]
        if self.ping_sent is not None:
            times.append(self.ping_sent + c.timeout)
        elif c.interval is not None:
            times.append(self.last_received + c.interval)
        if c.idle_timeout is not None and self.idle_since is not None:
            times.append(self.idle_since + c.idle_timeout)
        return min(times)

    def poll(self, now: float) -> Action:
        """What is due at ``now``; PING marks a PING outstanding as of ``now``."""
        if self._final is not None:
            return self._final
        c = self.config
        if self.ping_sent is not None and now >= self.ping_sent + c.timeout:
            self._final = Action.DEAD
            return Action.DEAD
        if (
            c.idle_timeout is not None
            and self.idle_since is not None
            and now >= self.idle_since + c.idle_timeout
        ):
            self._final = Action.IDLE
            return Action.IDLE
        due = c.interval is not None and now >= self.last_received + c.interval
        if due and self.ping_sent is None:
            self.ping_sent = now
            return Action.PING
        return Action.NONE

    def __repr__(self) -> str:
        return (
            f"<Keepalive streams={self.active_streams} last_received={self.last_received} "
            f"ping_sent={self.ping_sent} idle_since={self.idle_since}>"
        )
