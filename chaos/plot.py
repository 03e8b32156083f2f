"""The drill timeline as per-second series and as a hand-written SVG chart.

:func:`series` is pure bucketing (requests per second by serving locality, errors per
second, p99 latency per second); :func:`render_svg` draws it with the phases shaded and the
faults as labelled vertical lines. Output is deterministic for given records (no dates, no
random ids, fixed number formatting), and every mark carries ``data-*`` attributes so tests
and tools can read the chart back without guessing from pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from chaos.drill import Drill
from chaos.judge import AppliedFault, locality_key, percentile
from chaos.record import RequestLog

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f")
ERROR_COLOR = "#e15759"
WIDTH, HEIGHT = 960, 420
LEFT, RIGHT, TOP, BOTTOM = 60, 70, 30, 90


@dataclass(frozen=True, slots=True)
class Series:
    """Per-bucket figures of a run, by request start time."""

    width: float
    """Bucket width in seconds."""
    starts: tuple[float, ...]
    """Start time of each bucket."""
    by_locality: Mapping[str, tuple[int, ...]]
    """Successful requests per bucket, by serving ``cluster/zone`` (sorted keys)."""
    errors: tuple[int, ...]
    """Failed requests per bucket."""
    p99: tuple[float | None, ...]
    """p99 latency of the bucket's successful requests; None without any."""


def series(log: RequestLog, end: float, width: float = 1.0) -> Series:
    """Bucket ``log`` into ``[k*width, (k+1)*width)`` windows from 0 to ``end``."""
    count = max(1, math.ceil(end / width - 1e-9))
    ok: dict[str, list[int]] = {}
    errors = [0] * count
    latencies: list[list[float]] = [[] for _ in range(count)]
    for row in range(len(log)):
        k = math.floor(log.t_start[row] / width)
        if not 0 <= k < count:
            continue
        if log.ok(row):
            key = locality_key(log.text("served_by_cluster", row), log.text("served_by_zone", row))
            ok.setdefault(key, [0] * count)[k] += 1
            latencies[k].append(log.latency[row])
        else:
            errors[k] += 1
    return Series(
        width=width,
        starts=tuple(k * width for k in range(count)),
        by_locality={key: tuple(ok[key]) for key in sorted(ok)},
        errors=tuple(errors),
        p99=tuple(percentile(sorted(values), 0.99) for values in latencies),
    )


def _num(value: float) -> str:
    """Fixed, short number formatting so output is byte-for-byte stable."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _nice_ceiling(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def render_svg(drill: Drill, data: Series, faults: Sequence[AppliedFault]) -> str:
    """The timeline chart: stacked requests/s by locality, errors/s on top, p99 on the right
    axis, phases shaded, faults as vertical lines in time order."""
    count = len(data.starts)
    end = count * data.width
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    totals = [
        sum(column[k] for column in data.by_locality.values()) + data.errors[k]
        for k in range(count)
    ]
    y_max = _nice_ceiling(max(totals, default=0) / data.width)
    p99_max = _nice_ceiling(max((v for v in data.p99 if v is not None), default=0.0) * 1000)

    def x(t: float) -> float:
        return LEFT + plot_w * t / end

    def y(rate: float) -> float:
        return TOP + plot_h * (1 - rate / y_max)

    def y_ms(ms: float) -> float:
        return TOP + plot_h * (1 - ms / p99_max)

    bar_w = plot_w / count
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
        f"<title>{escape(drill.name)}: {escape(drill.description)}</title>",
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        '<g id="phases">',
    ]
    for phase in drill.phases:
        out.append(
            f'<rect class="phase" data-phase={quoteattr(phase.name)} '
            f'data-start="{_num(phase.start)}" data-end="{_num(phase.end)}" '
            f'x="{_num(x(phase.start))}" y="{TOP}" width="{_num(x(phase.end) - x(phase.start))}" '
            f'height="{plot_h}" fill="#000" fill-opacity="0.05"/>'
        )
        out.append(
            f'<text class="phase-label" x="{_num((x(phase.start) + x(phase.end)) / 2)}" '
            f'y="{TOP - 8}" text-anchor="middle">{escape(phase.name)}</text>'
        )
    out.append("</g>")

    out.append('<g id="axes" stroke="#333">')
    out.append(f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}"/>')
    out.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>')
    out.append(f'<line x1="{LEFT + plot_w}" y1="{TOP}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}"/>')
    out.append("</g>")
    out.append('<g id="ticks" fill="#333">')
    tick = _nice_ceiling(end / 10)
    t = 0.0
    while t <= end + 1e-9:
        out.append(
            f'<text x="{_num(x(t))}" y="{TOP + plot_h + 14}" text-anchor="middle">{_num(t)}s</text>'
        )
        t += tick
    for i in range(5):
        value = y_max * i / 4
        out.append(
            f'<text x="{LEFT - 6}" y="{_num(y(value) + 4)}" text-anchor="end">{_num(value)}</text>'
        )
        out.append(
            f'<text x="{LEFT + plot_w + 6}" y="{_num(y(value) + 4)}">'
            f"{_num(p99_max * i / 4)}ms</text>"
        )
    out.append(
        f'<text x="14" y="{TOP + plot_h / 2}" transform="rotate(-90 14 {TOP + plot_h / 2})" '
        'text-anchor="middle">requests/s</text>'
    )
    out.append(
        f'<text x="{WIDTH - 10}" y="{TOP + plot_h / 2}" '
        f'transform="rotate(90 {WIDTH - 10} {TOP + plot_h / 2})" text-anchor="middle">'
        "p99 latency</text>"
    )
    out.append("</g>")

    out.append('<g id="requests">')
    base = [0.0] * count
    for i, (key, counts) in enumerate(data.by_locality.items()):
        color = PALETTE[i % len(PALETTE)]
        out.append(f'<g class="series" data-locality={quoteattr(key)} fill="{color}">')
        for k, n in enumerate(counts):
            if n:
                rate = n / data.width
                top = base[k] + rate
                out.append(
                    f'<rect data-t="{_num(data.starts[k])}" data-value="{_num(rate)}" '
                    f'x="{_num(x(data.starts[k]))}" y="{_num(y(top))}" width="{_num(bar_w)}" '
                    f'height="{_num(y(base[k]) - y(top))}"/>'
                )
                base[k] = top
        out.append("</g>")
    out.append("</g>")
    out.append(f'<g id="errors" fill="{ERROR_COLOR}">')
    for k, n in enumerate(data.errors):
        if n:
            rate = n / data.width
            top = base[k] + rate
            out.append(
                f'<rect class="error" data-t="{_num(data.starts[k])}" data-value="{_num(rate)}" '
                f'x="{_num(x(data.starts[k]))}" y="{_num(y(top))}" width="{_num(bar_w)}" '
                f'height="{_num(y(base[k]) - y(top))}"/>'
            )
    out.append("</g>")

    points = [
        (data.starts[k] + data.width / 2, value * 1000)
        for k, value in enumerate(data.p99)
        if value is not None
    ]
    out.append('<g id="p99">')
    if points:
        out.append(
            '<polyline class="p99" fill="none" stroke="#222" stroke-width="1.5" '
            'data-t="' + " ".join(_num(t) for t, _ in points) + '" '
            'data-ms="' + " ".join(_num(ms) for _, ms in points) + '" '
            'points="' + " ".join(f"{_num(x(t))},{_num(y_ms(ms))}" for t, ms in points) + '"/>'
        )
    out.append("</g>")

    out.append('<g id="faults">')
    timed = sorted(
        (f for f in faults if f.t is not None or f.planned_at is not None),
        key=lambda f: (f.t if f.t is not None else f.planned_at or 0.0, f.index),
    )
    for n, fault in enumerate(timed):
        when = fault.t if fault.t is not None else fault.planned_at or 0.0
        color = "#222" if fault.verified else ERROR_COLOR
        label = f"{fault.fault} {fault.target}" + ("" if fault.verified else " (unverified)")
        out.append(
            f'<g class="fault" data-t="{_num(when)}" data-fault={quoteattr(fault.fault)} '
            f"data-target={quoteattr(fault.target)} "
            f'data-verified="{str(fault.verified).lower()}">'
            f'<line x1="{_num(x(when))}" y1="{TOP}" x2="{_num(x(when))}" y2="{TOP + plot_h}" '
            f'stroke="{color}" stroke-dasharray="4 3"/>'
            f'<text x="{_num(x(when) + 3)}" y="{TOP + 12 + 12 * (n % 4)}" fill="{color}">'
            f"{escape(label)}</text></g>"
        )
    out.append("</g>")

    out.append('<g id="legend">')
    entries = [*(k for k in data.by_locality), "errors", "p99 latency"]
    for i, name in enumerate(entries):
        lx = LEFT + (i % 4) * 210
        ly = HEIGHT - BOTTOM + 36 + 16 * (i // 4)
        if name == "errors":
            color = ERROR_COLOR
        elif name == "p99 latency":
            color = "#222"
        else:
            color = PALETTE[i % len(PALETTE)]
        out.append(
            f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{color}"/>'
            f'<text x="{lx + 14}" y="{ly}">{escape(name)}</text>'
        )
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
