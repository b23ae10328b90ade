"""Server-side SVG line charts: loss curves and KL trend lines, no JavaScript, no chart library.

Why our own: a chart here is a few polylines over (step, value) points, and every PyPI library
that renders SVG without a browser (pygal, matplotlib) brings far more than that, plus output a
test cannot read back. Each polyline carries its data (`data-x`, `data-y`) next to its drawn
`points`, so a test can check both against kd_metrics.json. Colours are SVG attributes, not
`style`, so the page's Content-Security-Policy can forbid inline styles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")


@dataclass(frozen=True)
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    dots: bool = False  # draw a circle at each point (sparse series, e.g. validation)


@dataclass(frozen=True)
class Box:
    """The plot area inside the SVG (pixels)."""

    left: float
    top: float
    right: float
    bottom: float


def finite_points(xs: Sequence[float], ys: Sequence[float], log_y: bool) -> list[tuple[float, float]]:
    """(x, y) pairs with both finite (and y > 0 on a log axis): NaN/inf never reach the drawing."""
    pts = []
    for x, y in zip(xs, ys, strict=True):
        if isinstance(x, int | float) and isinstance(y, int | float) and math.isfinite(x) and math.isfinite(y):
            if not log_y or y > 0:
                pts.append((float(x), float(y)))
    return pts


def span(values: Sequence[float]) -> tuple[float, float]:
    """(low, high) of the values; a single value gets a unit-wide range around it."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        return lo - 0.5, hi + 0.5
    return lo, hi


def scale(v: float, lo: float, hi: float, a: float, b: float) -> float:
    """Map v in [lo, hi] linearly onto [a, b]."""
    return a + (v - lo) / (hi - lo) * (b - a)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def line_chart(
    series: Sequence[Series],
    width: int = 560,
    height: int = 240,
    log_y: bool = False,
    title: str = "",
    x_label: str = "step",
) -> str:
    """An SVG document fragment: one polyline per series over shared axes, legend on top."""
    data = [(s, finite_points(s.xs, s.ys, log_y)) for s in series]
    every = [p for _, pts in data for p in pts]
    box = Box(56.0, 28.0, width - 12.0, height - 28.0)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
    )
    if not every:
        return head + f'<text x="{box.left}" y="{height / 2}" fill="#666">no data</text></svg>'
    x_lo, x_hi = span([x for x, _ in every])
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    y_lo, y_hi = span([ty(y) for _, y in every])
    parts = [head, _axes(box, x_lo, x_hi, y_lo, y_hi, log_y, x_label)]
    for i, (s, pts) in enumerate(data):
        colour = PALETTE[i % len(PALETTE)]
        drawn = [
            (scale(x, x_lo, x_hi, box.left, box.right), scale(ty(y), y_lo, y_hi, box.bottom, box.top)) for x, y in pts
        ]
        parts.append(
            f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="1.5" '
            f'data-label="{escape(s.label)}" data-x="{" ".join(_fmt(x) for x, _ in pts)}" '
            f'data-y="{" ".join(repr(y) for _, y in pts)}" '
            f'points="{" ".join(f"{px:.2f},{py:.2f}" for px, py in drawn)}"/>'
        )
        if s.dots:
            parts += [f'<circle cx="{px:.2f}" cy="{py:.2f}" r="2.5" fill="{colour}"/>' for px, py in drawn]
        parts.append(
            f'<text x="{box.left + 8 + 150 * i}" y="16" fill="{colour}" font-size="12">{escape(s.label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _axes(box: Box, x_lo: float, x_hi: float, y_lo: float, y_hi: float, log_y: bool, x_label: str) -> str:
    def y_text(v: float) -> str:
        return _fmt(10**v) if log_y else _fmt(v)

    return (
        f'<g stroke="#999" stroke-width="1"><line x1="{box.left}" y1="{box.bottom}" x2="{box.right}" '
        f'y2="{box.bottom}"/><line x1="{box.left}" y1="{box.top}" x2="{box.left}" y2="{box.bottom}"/></g>'
        f'<g fill="#555" font-size="11">'
        f'<text x="{box.left - 4}" y="{box.top + 4}" text-anchor="end">{y_text(y_hi)}</text>'
        f'<text x="{box.left - 4}" y="{box.bottom}" text-anchor="end">{y_text(y_lo)}</text>'
        f'<text x="{box.left}" y="{box.bottom + 16}">{_fmt(x_lo)}</text>'
        f'<text x="{box.right}" y="{box.bottom + 16}" text-anchor="end">{_fmt(x_hi)}</text>'
        f'<text x="{(box.left + box.right) / 2}" y="{box.bottom + 16}" text-anchor="middle">'
        f"{escape(x_label)}{' (log y)' if log_y else ''}</text></g>"
    )


def sparkline(values: Sequence[float], width: int = 120, height: int = 28) -> str:
    """A small trend line (e.g. held-out KL across versions), the last point marked."""
    pts = finite_points(list(range(len(values))), values, log_y=False)
    head = f'<svg xmlns="http://www.w3.org/2000/svg" class="spark" width="{width}" height="{height}">'
    if not pts:
        return head + "</svg>"
    x_lo, x_hi = span([x for x, _ in pts])
    y_lo, y_hi = span([y for _, y in pts])
    drawn = [(scale(x, x_lo, x_hi, 4, width - 4), scale(y, y_lo, y_hi, height - 4, 4)) for x, y in pts]
    last_x, last_y = drawn[-1]
    data_y = " ".join(repr(y) for _, y in pts)
    return (
        head + f'<polyline fill="none" stroke="{PALETTE[0]}" stroke-width="1.5" data-y="{data_y}" '
        f'points="{" ".join(f"{x:.2f},{y:.2f}" for x, y in drawn)}"/>'
        f'<circle cx="{last_x:.2f}" cy="{last_y:.2f}" r="2.5" fill="{PALETTE[0]}"/></svg>'
    )
