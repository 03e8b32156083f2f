"""Exit when the supervising process dies, even if it died by SIGKILL.

``meshfed up`` (and the drill runner) start every component as its own process in
its own session, so a terminal's Ctrl-C reaches only the supervisor, which then
stops the children in order. If the supervisor is killed outright it cannot stop
anyone, and the children would run on as orphans. Linux's PR_SET_PDEATHSIG does
not fit: it fires when the *thread* that forked exits, and trio may spawn from a
worker thread that later retires. So a child started with ``MESHFED_PARENT_PID``
in its environment watches its parent from a daemon thread and, when it is
re-parented, sends itself SIGTERM (the component's own graceful drain), then
exits hard after a grace period if that did not end it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "MESHFED_PARENT_PID"
POLL_SECONDS = 1.0
GRACE_SECONDS = 10.0


def _watch(parent: int, poll: float, grace: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(3)


def start_from_env(
    environ: dict[str, str] | None = None,
    *,
    poll: float = POLL_SECONDS,
    grace: float = GRACE_SECONDS,
) -> bool:
    """Start the watch if ``MESHFED_PARENT_PID`` names our parent; True if started."""
    value = (environ if environ is not None else dict(os.environ)).get(ENV, "")
    if not value.isdigit():
        return False
    parent = int(value)
    if os.getppid() != parent:  # already orphaned, or not started by that process
        return False
    threading.Thread(
        target=_watch, args=(parent, poll, grace), name="meshfed-parentwatch", daemon=True
    ).start()
    return True
