"""The SVG charts of the HTML report: plain SVG text, no script, no library.

Each chart is one ``<svg>`` element with a ``viewBox``, so it scales with the page;
tooltips are SVG ``<title>`` elements, which every browser shows on hover without a
script. A bar whose value is not fully known (an unpriced model, or answers without
token counts) is drawn hatched red rather than short, so it cannot be read as cheap.
Every label is text from data (model names, error types) and goes through ``escape``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

COLORS = {
    "cost": "#2563eb",
    "unpriced": "#dc2626",
    "uncached": "#2563eb",
    "cached": "#93c5fd",
    "output": "#f59e0b",
    "reasoning": "#a855f7",
    "error": "#dc2626",
    "grid": "#e5e7eb",
    "axis": "#6b7280",
}
TOKEN_SERIES = (
    ("uncached", "input (uncached)"),
    ("cached", "input (cached)"),
    ("output", "output"),
    ("reasoning", "reasoning"),
)


def compact(value: float) -> str:
    """Axis labels: 1.2k, 3.4M."""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def usd_axis(value: float) -> str:
    if value == 0:
        return "$0"
    if value >= 1000:
        return "$" + compact(value)
    return f"${value:.3g}"


def _nice_ticks(top: float, count: int = 4) -> list[float]:
    """0 and a few round steps (1, 2, 2.5 or 5 times a power of ten) up past ``top``."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    steps = math.ceil(top / step - 1e-9)
    return [i * step for i in range(steps + 1)]


def escape(text: Any) -> str:
    """Text from data as HTML text or an attribute value (quotes escaped too)."""
    return html.escape(str(text), quote=True)


def _hatch(pattern_id: str, color: str) -> str:
    return (
        f'<pattern id="{pattern_id}" width="6" height="6" patternUnits="userSpaceOnUse" '
        f'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fee2e2"/>'
        f'<rect width="2.5" height="6" fill="{color}"/></pattern>'
    )


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: float
    tooltip: str
    flagged: bool = False  # drawn hatched red: unpriced (cost) or failing (errors)
    note: str = ""  # text at the end of a horizontal bar


def column_chart(
    bars: Sequence[Bar], value_label: Callable[[float], str], chart_id: str, *, height: int = 260
) -> str:
    """Vertical bars over time (cost by day): y axis with round ticks, thinned x labels."""
    width, left, right, top, bottom = 960, 64, 16, 16, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    ticks = _nice_ticks(max((b.value for b in bars), default=0.0))
    scale = plot_h / ticks[-1]
    slot = plot_w / max(len(bars), 1)
    bar_w = max(1.0, min(48.0, slot * 0.72))
    every = max(1, math.ceil(len(bars) / 12))
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{chart_id}-title">',
        f'<title id="{chart_id}-title">{escape(chart_id)}</title>',
        f"<defs>{_hatch(chart_id + '-hatch', COLORS['unpriced'])}</defs>",
    ]
    for tick in ticks:
        y = top + plot_h - tick * scale
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{COLORS["grid"]}"/>'
            f'<text x="{left - 8}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
            f"{escape(value_label(tick))}</text>"
        )
    for i, bar in enumerate(bars):
        x = left + i * slot + (slot - bar_w) / 2
        h = bar.value * scale
        if bar.value > 0 and h < 1:
            h = 1.0  # a tiny cost is still visible
        fill = f"url(#{chart_id}-hatch)" if bar.flagged else COLORS["cost"]
        parts.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" '
            f'height="{h:.1f}" fill="{fill}" rx="2"><title>{escape(bar.tooltip)}</title></rect>'
        )
        if bar.flagged:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h - h - 4:.1f}" '
                f'class="flag" text-anchor="middle">!</text>'
            )
        if i % every == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{height - bottom + 18}" class="tick" '
                f'text-anchor="middle">{escape(bar.label)}</text>'
            )
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" '
        f'stroke="{COLORS["axis"]}"/></svg>'
    )
    return "".join(parts)


def bar_chart(bars: Sequence[Bar], chart_id: str, *, color: str = COLORS["cost"]) -> str:
    """Horizontal bars, one per category (cost by model), the value written at the end."""
    width, label_w, note_w, row_h = 960, 220, 210, 30
    plot_w = width - label_w - note_w
    height = row_h * len(bars) + 8
    top_value = max((b.value for b in bars), default=0.0) or 1.0
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{chart_id}-title">',
        f'<title id="{chart_id}-title">{escape(chart_id)}</title>',
        f"<defs>{_hatch(chart_id + '-hatch', COLORS['unpriced'])}</defs>",
    ]
    for i, bar in enumerate(bars):
        y = 4 + i * row_h
        w = bar.value / top_value * plot_w
        if (bar.value > 0 or bar.flagged) and w < 6:
            w = 6.0  # a tiny or unpriced value still shows
        fill = f"url(#{chart_id}-hatch)" if bar.flagged else color
        label = bar.label if len(bar.label) <= 30 else bar.label[:29] + "…"
        parts.append(
            f'<text x="{label_w - 10}" y="{y + 19}" class="label" text-anchor="end">'
            f"{escape(label)}<title>{escape(bar.label)}</title></text>"
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 10}" '
            f'fill="{fill}" rx="3"><title>{escape(bar.tooltip)}</title></rect>'
            f'<text x="{label_w + w + 8:.1f}" y="{y + 19}" '
            f'class="value{" flag" if bar.flagged else ""}">{escape(bar.note)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def stacked_chart(rows: Sequence[tuple[str, dict[str, float]]], chart_id: str) -> str:
    """One bar per model, split into token types; every bar is the share of its own total,
    so a small model's mix is as readable as a large one's."""
    width, label_w, total_w, row_h = 960, 220, 120, 30
    plot_w = width - label_w - total_w
    height = row_h * len(rows) + 8
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{chart_id}-title">'
        f'<title id="{chart_id}-title">{escape(chart_id)}</title>'
    ]
    for i, (label, values) in enumerate(rows):
        y = 4 + i * row_h
        whole = sum(values.values())
        weight = "bold" if label == "TOTAL" else "normal"
        parts.append(
            f'<text x="{label_w - 10}" y="{y + 19}" class="label" text-anchor="end" '
            f'font-weight="{weight}">{escape(label)}</text>'
        )
        x = float(label_w)
        for key, name in TOKEN_SERIES:
            value = values.get(key, 0.0)
            if whole <= 0 or value <= 0:
                continue
            w = value / whole * plot_w
            parts.append(
                f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{row_h - 10}" '
                f'fill="{COLORS[key]}"><title>{escape(label)}: {escape(name)} {value:,.0f} tokens '
                f"({value / whole:.1%})</title></rect>"
            )
            x += w
        parts.append(
            f'<text x="{label_w + plot_w + 10}" y="{y + 19}" class="value">'
            f"{escape(compact(whole))} tokens</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def legend(items: Sequence[tuple[str, str]]) -> str:
    """Colour keys; the colour ``"hatch"`` is the striped unpriced fill."""
    keys = [
        '<i class="hatch"></i>' if color == "hatch" else f'<i style="background:{color}"></i>'
        for color, _ in items
    ]
    spans = "".join(
        f"<span>{key}{escape(name)}</span>" for key, (_, name) in zip(keys, items, strict=True)
    )
    return f'<div class="legend">{spans}</div>'
