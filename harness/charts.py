"""Hand-written inline SVG charts for the report: line, scatter, histogram, horizontal bars.

No JavaScript and no external resource: each function returns one ``<svg>``
element as :class:`markupsafe.Markup`, with every label escaped here (the
template inserts the markup as is). Long series are downsampled when drawn
(min/max per bucket, so a memory peak is never smoothed away); the full data
stays in results.jsonl.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from markupsafe import Markup

# colour-blind-safe palette (Okabe-Ito), first the two a prediction and its control use
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000")
WIDTH, HEIGHT = 560, 280
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 16, 30, 44
MAX_POINTS = 400
HIST_WIDTH = 430


@dataclass(frozen=True)
class Trace:
    """One named curve or point cloud."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str = ""


@dataclass(frozen=True)
class HLine:
    """A labelled horizontal reference line (a budget, a threshold)."""

    y: float
    label: str
    color: str = "#cf222e"


@dataclass
class _Axes:
    x0: float
    x1: float
    y0: float
    y1: float
    w: int = WIDTH
    h: int = HEIGHT
    top: int = MARGIN_T  # grows by the legend's band above the plot area
    parts: list[str] = field(default_factory=list)

    def px(self, x: float) -> float:
        return MARGIN_L + (x - self.x0) / (self.x1 - self.x0) * (self.w - MARGIN_L - MARGIN_R)

    def py(self, y: float) -> float:
        return self.h - MARGIN_B - (y - self.y0) / (self.y1 - self.y0) * (self.h - self.top - MARGIN_B)


def finite_pairs(x: Sequence[object], y: Sequence[object]) -> tuple[list[float], list[float]]:
    """Keep the (x, y) pairs that are both finite numbers (NaN arrives as the string 'nan')."""
    xs: list[float] = []
    ys: list[float] = []
    for a, b in zip(x, y, strict=False):
        if isinstance(a, int | float) and isinstance(b, int | float) and math.isfinite(a) and math.isfinite(b):
            xs.append(float(a))
            ys.append(float(b))
    return xs, ys


def downsample(x: Sequence[float], y: Sequence[float], max_points: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most ``max_points`` points: per bucket the first, min and max samples, in x order."""
    n = len(x)
    if n <= max_points:
        return list(x), list(y)
    buckets = max(1, max_points // 3)
    xs: list[float] = []
    ys: list[float] = []
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if lo >= hi:
            continue
        idx = range(lo, hi)
        keep = sorted({lo, min(idx, key=lambda i: y[i]), max(idx, key=lambda i: y[i])})
        xs += [x[i] for i in keep]
        ys += [y[i] for i in keep]
    xs.append(x[-1])
    ys.append(y[-1])
    return xs, ys


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.1e}"
    return f"{v:.6g}"


def _range(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi == lo:
        d = abs(hi) * 0.1 or 1.0
        return lo - d, hi + d
    d = (hi - lo) * pad
    return lo - d, hi + d


def _frame(ax: _Axes, title: str, xlabel: str, ylabel: str) -> None:
    w, h = ax.w, ax.h
    left, right, top, bottom = MARGIN_L, w - MARGIN_R, ax.top, h - MARGIN_B
    p = ax.parts
    p.append(f'<text x="{w / 2:.0f}" y="18" text-anchor="middle" class="ct">{escape(title)}</text>')
    for t in nice_ticks(ax.x0, ax.x1):
        x = ax.px(t)
        p.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" class="cg"/>')
        p.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">{escape(fmt_tick(t))}</text>')
    for t in nice_ticks(ax.y0, ax.y1):
        y = ax.py(t)
        p.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" class="cg"/>')
        p.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt_tick(t))}</text>')
    p.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" class="cf"/>')
    p.append(f'<text x="{(left + right) / 2:.0f}" y="{h - 8}" text-anchor="middle" class="cl">{escape(xlabel)}</text>')
    p.append(f'<text transform="translate(14 {(top + bottom) / 2:.0f}) rotate(-90)" text-anchor="middle" '
             f'class="cl">{escape(ylabel)}</text>')


LEGEND_ROW = 15


def _with_legend(ax: _Axes, n: int) -> _Axes:
    """Make room for ``n`` legend rows between the title and the plot: a legend never hides data."""
    ax.top = MARGIN_T + LEGEND_ROW * n
    ax.h += LEGEND_ROW * n
    return ax


def _legend(ax: _Axes, entries: Sequence[tuple[str, str, str]]) -> None:
    """Entries (label, colour, 'line'|'dot'|'dash'), one per row above the plot area."""
    x, y = MARGIN_L + 4, MARGIN_T + 8
    for label, color, style in entries:
        if style == "dot":
            ax.parts.append(f'<circle cx="{x + 8}" cy="{y - 4}" r="3" fill="{color}"/>')
        else:
            dash = ' stroke-dasharray="6 3"' if style == "dash" else ""
            ax.parts.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 16}" y2="{y - 4}" stroke="{color}" stroke-width="2"{dash}/>')
        ax.parts.append(f'<text x="{x + 22}" y="{y}" class="lg">{escape(label)}</text>')
        y += LEGEND_ROW


def _svg(ax: _Axes, aria: str) -> Markup:
    body = "".join(ax.parts)
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{ax.w}" height="{ax.h}" '
        f'viewBox="0 0 {ax.w} {ax.h}" role="img" aria-label="{escape(aria)}">{body}</svg>'
    )


def _colors(traces: Sequence[Trace]) -> list[str]:
    return [t.color or PALETTE[i % len(PALETTE)] for i, t in enumerate(traces)]


def line_chart(traces: Sequence[Trace], *, title: str, xlabel: str, ylabel: str,
               hlines: Sequence[HLine] = (), markers: bool = False) -> Markup:
    """Curves over a shared x axis, with optional labelled horizontal lines (a budget)."""
    pts = [finite_pairs(t.x, t.y) for t in traces]
    all_x = [v for xs, _ in pts for v in xs]
    all_y = [v for _, ys in pts for v in ys] + [h.y for h in hlines]
    x0, x1 = _range(all_x, pad=0.0)
    y0, y1 = _range(all_y)
    if all_y and min(all_y) >= 0:
        y0 = 0.0  # memory and losses read against zero
    ax = _with_legend(_Axes(x0, x1, y0, y1), len(traces))
    _frame(ax, title, xlabel, ylabel)
    colors = _colors(traces)
    legend: list[tuple[str, str, str]] = []
    for (xs, ys), color, t in zip(pts, colors, traces, strict=True):
        xs, ys = downsample(xs, ys)
        if not xs:
            continue
        path = " ".join(f"{ax.px(a):.1f},{ax.py(b):.1f}" for a, b in zip(xs, ys, strict=True))
        ax.parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if markers or len(xs) == 1:
            ax.parts += [f'<circle cx="{ax.px(a):.1f}" cy="{ax.py(b):.1f}" r="2.5" fill="{color}"/>'
                         for a, b in zip(xs, ys, strict=True)]
        legend.append((t.label, color, "line"))
    for h in hlines:
        y = ax.py(h.y)
        ax.parts.append(f'<line x1="{MARGIN_L}" y1="{y:.1f}" x2="{ax.w - MARGIN_R}" y2="{y:.1f}" stroke="{h.color}" '
                        f'stroke-width="1.5" stroke-dasharray="6 3"/>')
        ax.parts.append(f'<text x="{ax.w - MARGIN_R - 4}" y="{y - 4:.1f}" text-anchor="end" fill="{h.color}" '
                        f'class="lg">{escape(h.label)}</text>')
    _legend(ax, legend)
    return _svg(ax, title)


def scatter_chart(traces: Sequence[Trace], *, title: str, xlabel: str, ylabel: str,
                  diagonal: bool = True) -> Markup:
    """Point clouds; with ``diagonal`` the y = x line a perfect match would lie on."""
    pts = [finite_pairs(t.x, t.y) for t in traces]
    values = [v for xs, ys in pts for v in (*xs, *ys)]
    lo, hi = _range(values)
    # square-ish: equal scales on both axes
    ax = _with_legend(_Axes(lo, hi, lo, hi, w=HEIGHT + 110, h=HEIGHT), len(traces) + int(diagonal))
    _frame(ax, title, xlabel, ylabel)
    legend: list[tuple[str, str, str]] = []
    if diagonal:
        ax.parts.append(f'<line x1="{ax.px(lo):.1f}" y1="{ax.py(lo):.1f}" x2="{ax.px(hi):.1f}" y2="{ax.py(hi):.1f}" '
                        'stroke="#57606a" stroke-width="1" stroke-dasharray="4 3"/>')
        legend.append(("y = x", "#57606a", "dash"))
    for (xs, ys), color, t in zip(pts, _colors(traces), traces, strict=True):
        step = max(1, math.ceil(len(xs) / MAX_POINTS))  # evenly thinned: a cloud has no peak to keep
        ax.parts += [f'<circle cx="{ax.px(a):.1f}" cy="{ax.py(b):.1f}" r="1.8" fill="{color}" fill-opacity=".6"/>'
                     for a, b in zip(xs[::step], ys[::step], strict=True)]
        legend.append((t.label, color, "dot"))
    _legend(ax, legend)
    return _svg(ax, title)


def histogram_chart(values: Sequence[float], *, title: str, xlabel: str, bins: int = 30,
                    color: str = PALETTE[0]) -> Markup:
    """Counts of ``values`` in equal-width bins."""
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in vals:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    ax = _Axes(lo, hi, 0.0, max(counts or [1]) * 1.08, w=HIST_WIDTH)  # fits beside two scatters
    _frame(ax, title, xlabel, "count")
    for i, c in enumerate(counts):
        if c:
            x0, x1 = ax.px(lo + i * width), ax.px(lo + (i + 1) * width)
            y = ax.py(c)
            ax.parts.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(0.5, x1 - x0 - 1):.1f}" '
                            f'height="{ax.py(0) - y:.1f}" fill="{color}"/>')
    return _svg(ax, title)


def bar_chart(bars: Sequence[tuple[str, float, str]], *, title: str, xlabel: str) -> Markup:
    """Horizontal bars (label, value, colour), one row each, value printed at the bar's end."""
    row = 20
    left = 20 + int(6.3 * max((len(label) for label, _, _ in bars), default=10))
    w = left + 460
    h = MARGIN_T + row * len(bars) + 34
    top_value = max((v for _, v, _ in bars), default=1.0) or 1.0
    ax = _Axes(0.0, top_value, 0.0, 1.0, w=w, h=h)
    p = ax.parts
    p.append(f'<text x="{w / 2:.0f}" y="18" text-anchor="middle" class="ct">{escape(title)}</text>')
    span = w - left - 60
    for i, (label, value, color) in enumerate(bars):
        y = MARGIN_T + i * row
        bw = max(1.0, value / top_value * span)
        p.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{escape(label)}</text>')
        p.append(f'<rect x="{left}" y="{y + 3}" width="{bw:.1f}" height="{row - 6}" fill="{color}"/>')
        p.append(f'<text x="{left + bw + 4:.1f}" y="{y + 13}">{escape(fmt_tick(value))}</text>')
    p.append(f'<text x="{left + span / 2:.0f}" y="{h - 8}" text-anchor="middle" class="cl">{escape(xlabel)}</text>')
    return _svg(ax, title)
