"""A watch consumer for tests: applies Resets (via diff_reset) and events, logs each change."""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from federation.store import Delete, KeyValue, Put, Reset, WatchEvent, apply_events, diff_reset


class View:
    """What a well-behaved consumer holds, plus the log of changes it applied."""

    def __init__(self) -> None:
        self.held: dict[str, KeyValue] = {}
        self.applied: list[Put | Delete] = []
        self.resets: list[Reset] = []
        self.changed = trio.Event()

    def apply(self, event: WatchEvent) -> None:
        if isinstance(event, Reset):
            self.resets.append(event)
            changes = diff_reset(self.held, event)
        else:
            changes = [event]
        apply_events(self.held, changes)
        self.applied.extend(changes)
        self.changed.set()
        self.changed = trio.Event()

    async def follow(self, events: AsyncIterator[WatchEvent]) -> None:
        async for event in events:
            self.apply(event)

    async def wait_for(self, truth: dict[str, KeyValue]) -> None:
        """Wait until the view equals ``truth`` (callers bound this with trio.fail_after)."""
        while self.held != truth:
            await self.changed.wait()

    def duplicate_puts(self) -> list[tuple[str, int]]:
        """(key, mod_revision) pairs applied more than once: a reconnect must produce none."""
        seen: set[tuple[str, int]] = set()
        dups = []
        for ev in self.applied:
            if isinstance(ev, Put):
                ident = (ev.kv.key, ev.kv.mod_revision)
                if ident in seen:
                    dups.append(ident)
                seen.add(ident)
        return dups
