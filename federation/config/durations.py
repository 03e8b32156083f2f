"""Durations as written in deployment configs: ``150ms``, ``2s``, ``1h30m``.

Grammar: one or more ``<digits><unit>`` parts, units ``h``, ``m``, ``s``,
``ms``, each at most once and in that order (largest first), no spaces, no
sign, no bare numbers. A bare ``10`` is refused on purpose: whether it meant
seconds or milliseconds is exactly the ambiguity that causes outages.

Values are whole milliseconds, so :func:`format_duration` and
:func:`parse_duration` round-trip exactly for every non-negative multiple of
1 ms.
"""

from __future__ import annotations

import re

#: ECMA-262-compatible pattern (also used by the JSON Schema).
DURATION_PATTERN = r"^(?=[0-9])([0-9]+h)?([0-9]+m(?!s))?([0-9]+s)?([0-9]+ms)?$"

_DURATION_RE = re.compile(DURATION_PATTERN)
_MS_PER_UNIT = (("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1))
#: Longest accepted duration, a sanity bound far above any real timeout or TTL.
MAX_DURATION_MS = 10 * 365 * 24 * 3_600_000


class InvalidDuration(ValueError):
    """A string that is not a duration in the config grammar; the message says why."""


def parse_duration_ms(text: str) -> int:
    """Parse ``text`` into whole milliseconds; raise InvalidDuration if malformed."""
    if not isinstance(text, str):
        raise InvalidDuration(f"expected a duration string such as '2s', got {text!r}")
    match = _DURATION_RE.match(text)
    if match is None:
        raise InvalidDuration(_explain(text))
    total = 0
    for group, (_, factor) in zip(match.groups(), _MS_PER_UNIT, strict=True):
        if group is not None:
            total += int(group.rstrip("hms")) * factor
    if total > MAX_DURATION_MS:
        raise InvalidDuration(f"duration {text!r} is longer than ten years")
    return total


def parse_duration(text: str) -> float:
    """Parse ``text`` (e.g. ``'1h30m'``) into seconds; raise InvalidDuration if malformed."""
    return parse_duration_ms(text) / 1000


def format_duration(seconds: float) -> str:
    """The canonical string for ``seconds`` (rounded to whole milliseconds), e.g. ``'1h30m'``.

    Zero formats as ``'0s'``. Negative values raise ValueError: configs have none.
    """
    ms = round(seconds * 1000)
    if ms < 0:
        raise ValueError(f"durations are never negative, got {seconds!r}")
    if ms == 0:
        return "0s"
    parts: list[str] = []
    for unit, factor in _MS_PER_UNIT:
        amount, ms = divmod(ms, factor)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)


def _explain(text: str) -> str:
    stripped = text.strip()
    if stripped == "":
        return "empty duration"
    if stripped.startswith("-"):
        return f"negative duration {text!r}"
    if re.fullmatch(r"[0-9.]+", stripped):
        return f"duration {text!r} has no unit"
    if " " in text:
        return f"duration {text!r} contains spaces"
    if "." in text:
        return f"duration {text!r} has a fraction"
    return f"malformed duration {text!r}"
