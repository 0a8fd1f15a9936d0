"""harness.charts: the SVG helpers (escaping, downsampling that keeps peaks, ticks, budget line)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from harness import charts

SVG = "{http://www.w3.org/2000/svg}"


def _parse(markup: str) -> ET.Element:
    return ET.fromstring(str(markup))  # well-formed XML, or this raises


def test_downsample_keeps_the_peak_the_ends_and_the_order() -> None:
    n = 10_000
    x = [i * 0.01 for i in range(n)]
    y = [math.sin(i / 500) for i in range(n)]
    y[7_777] = 42.0  # one sample spike, like an allocation burst between two NVML reads
    xs, ys = charts.downsample(x, y, max_points=300)
    assert len(xs) <= 302
    assert 42.0 in ys and xs[0] == x[0] and xs[-1] == x[-1]
    assert xs == sorted(xs)
    assert charts.downsample([1.0, 2.0], [3.0, 4.0]) == ([1.0, 2.0], [3.0, 4.0])


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    assert charts.nice_ticks(0, 30.8) == [0, 10, 20, 30]
    assert charts.nice_ticks(-1.2, 1.2) == [-1, -0.5, 0, 0.5, 1]
    ticks = charts.nice_ticks(0.3, 0.95)
    assert all(0.3 <= t <= 0.95 for t in ticks) and len(ticks) >= 3


def test_labels_are_escaped_and_the_svg_is_well_formed() -> None:
    evil = '<script>alert("x")</script> & co'
    svg = charts.line_chart([charts.Trace(evil, [0, 1, 2], [1, 2, 3])], title=evil, xlabel=evil, ylabel=evil,
                            hlines=[charts.HLine(2.5, evil)])
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    root = _parse(svg)
    assert root.tag == f"{SVG}svg"
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert texts.count(evil) == 5  # title, x label, y label, legend, budget label: as text, not markup


def test_line_chart_draws_the_budget_line_at_its_value_and_labels_it() -> None:
    svg = charts.line_chart([charts.Trace("q4k", [0, 1, 2, 3], [0, 5, 17.8, 17.8])],
                            title="mem", xlabel="t (s)", ylabel="GB", hlines=[charts.HLine(30.0, "budget 30 GB")])
    root = _parse(svg)
    dashed = [ln for ln in root.iter(f"{SVG}line") if ln.get("stroke-dasharray") and ln.get("stroke") == "#cf222e"]
    assert len(dashed) == 1
    assert "budget 30 GB" in [t.text for t in root.iter(f"{SVG}text")]
    # the budget line sits above the curve's highest point (SVG y grows downwards)
    poly = next(root.iter(f"{SVG}polyline")).get("points", "")
    top_of_curve = min(float(p.split(",")[1]) for p in poly.split())
    assert float(dashed[0].get("y1", "0")) < top_of_curve
    assert "30" in [t.text for t in root.iter(f"{SVG}text")]  # the axis reaches the budget


def test_scatter_thins_points_and_skips_non_finite() -> None:
    x = [float(i) for i in range(2000)] + [float("nan")]
    y = [float(i) for i in range(2000)] + [1.0]
    svg = charts.scatter_chart([charts.Trace("subject", x, y)], title="parity", xlabel="ref", ylabel="got")
    circles = [c for c in _parse(svg).iter(f"{SVG}circle") if c.get("r") == "1.8"]
    assert 300 <= len(circles) <= charts.MAX_POINTS


def test_histogram_counts_every_value() -> None:
    values = [0.0] * 5 + [1.0] * 3 + [0.5]
    svg = charts.histogram_chart(values, title="err", xlabel="d", bins=4)
    rects = [r for r in _parse(svg).iter(f"{SVG}rect") if r.get("fill") == charts.PALETTE[0]]
    heights = sorted(float(r.get("height", "0")) for r in rects)
    assert len(rects) == 3 and math.isclose(heights[-1] / heights[0], 5.0, rel_tol=0.02)


def test_bar_chart_has_one_bar_and_value_per_row() -> None:
    svg = charts.bar_chart([("FT-1", 300, "#000"), ("FT-1 control x", 19, "#111")], title="examples", xlabel="n")
    root = _parse(svg)
    assert len([r for r in root.iter(f"{SVG}rect")]) == 2
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "300" in texts and "19" in texts and "FT-1 control x" in texts
