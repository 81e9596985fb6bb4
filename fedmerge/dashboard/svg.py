"""Server-rendered inline SVG: line charts, stacked bars and the lineage graph (no JavaScript library).

Every function returns SVG markup with all text escaped; colours come from CSS classes
(``dashboard.css``) and SVG presentation attributes, never inline ``style``, so the pages keep a
strict Content-Security-Policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from fedmerge.dashboard.views import Rollback, VersionSummary

WIDTH, HEIGHT = 560, 220
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 44, 36


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e3:
        return f"{v / 1e3:.3g}k"
    if a >= 0.01:
        return f"{v:.3g}"
    return f"{v:.2e}"


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    out = []
    t = start
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            out.append(round(t, 12))
        t += step
    return out


def _frame(title: str, body: list[str], chart_id: str, legend: Sequence[tuple[str, int]]) -> str:
    items = [f'<text x="8" y="15" class="chart-title">{escape(title)}</text>']
    x = PAD_L
    for name, idx in legend:
        items.append(
            f'<rect x="{x}" y="22" width="10" height="10" class="s{idx % 6}"/>'
            f'<text x="{x + 14}" y="31" class="legend">{escape(name)}</text>'
        )
        x += 24 + 7 * len(name)
    return (
        f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
        + "".join(items)
        + "".join(body)
        + "</svg>"
    )


def _empty(title: str, chart_id: str, message: str) -> str:
    return _frame(
        title,
        [
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" class="empty" text-anchor="middle">'
            f"{escape(message)}</text>"
        ],
        chart_id,
        [],
    )


def line_chart(
    title: str,
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    chart_id: str,
    x_label: str = "round",
    y_min: float | None = None,
    empty: str = "no data yet",
) -> str:
    """Lines through (x, y) points, one per named series, on shared axes; each point has a tooltip."""
    points = [p for _, pts in series for p in pts if math.isfinite(p[1])]
    if not points:
        return _empty(title, chart_id, empty)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (min(ys) if y_min is None else min(y_min, min(ys))), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.1 or 1), y1 + (abs(y1) * 0.1 or 1)
    pw, ph = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def sx(x: float) -> float:
        return PAD_L + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return PAD_T + ph - (y - y0) / (y1 - y0) * ph

    body: list[str] = []
    for t in _ticks(y0, y1):
        body.append(
            f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
            f'<text x="{PAD_L - 6}" y="{sy(t) + 4:.1f}" class="tick" text-anchor="end">{_fmt(t)}</text>'
        )
    xt = sorted(set(xs)) if len(set(xs)) <= 12 else _ticks(x0, x1, 6)
    for t in xt:
        body.append(
            f'<text x="{sx(t):.1f}" y="{HEIGHT - PAD_B + 16}" class="tick" text-anchor="middle">'
            f"{_fmt(t)}</text>"
        )
    body.append(
        f'<text x="{PAD_L + pw / 2}" y="{HEIGHT - 4}" class="axis" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    legend = []
    for idx, (name, pts) in enumerate(series):
        good = [(x, y) for x, y in pts if math.isfinite(y)]
        if not good:
            continue
        legend.append((name, idx))
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        body.append(f'<polyline points="{coords}" class="line l{idx % 6}" fill="none"/>')
        for x, y in good:
            body.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" class="s{idx % 6}">'
                f"<title>{escape(name)} at {_fmt(x)}: {y:.6g}</title></circle>"
            )
    return _frame(title, body, chart_id, legend)


def stacked_bars(
    title: str,
    xs: Sequence[float],
    stacks: Sequence[tuple[str, Sequence[float]]],
    *,
    chart_id: str,
    x_label: str = "round",
    empty: str = "no data yet",
) -> str:
    """One bar per x, stacked from the named series (e.g. accepted and rejected per round)."""
    if not xs:
        return _empty(title, chart_id, empty)
    totals = [sum(s[1][i] for s in stacks) for i in range(len(xs))]
    top = max(totals) or 1.0
    pw, ph = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B
    slot = pw / len(xs)
    bw = max(2.0, min(40.0, slot * 0.7))
    body: list[str] = []
    for t in _ticks(0.0, top):
        y = PAD_T + ph - t / top * ph
        body.append(
            f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_fmt(t)}</text>'
        )
    every = max(1, len(xs) // 12)
    for i, x in enumerate(xs):
        cx = PAD_L + slot * (i + 0.5)
        base = 0.0
        for idx, (name, values) in enumerate(stacks):
            v = values[i]
            if v > 0:
                y_top = PAD_T + ph - (base + v) / top * ph
                h = v / top * ph
                body.append(
                    f'<rect x="{cx - bw / 2:.1f}" y="{y_top:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                    f'class="s{idx % 6}"><title>{escape(name)} at {_fmt(x)}: {v:g}</title></rect>'
                )
            base += v
        if i % every == 0:
            body.append(
                f'<text x="{cx:.1f}" y="{HEIGHT - PAD_B + 16}" class="tick" text-anchor="middle">'
                f"{_fmt(x)}</text>"
            )
    body.append(
        f'<text x="{PAD_L + pw / 2}" y="{HEIGHT - 4}" class="axis" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    return _frame(title, body, chart_id, [(name, i) for i, (name, _) in enumerate(stacks)])


# ----------------------------------------------------------------------------------------- lineage

ROW_H, LANE_W, LEFT = 34, 26, 18


def lanes(versions: Sequence[VersionSummary]) -> dict[str, int]:
    """A column per branch: a version takes its first parent's lane unless a newer sibling already
    continued that lane, then the first free lane. ``versions`` oldest first."""
    lane: dict[str, int] = {}
    continued: set[str] = set()
    used_until: dict[int, int] = {}
    order = {v.id: i for i, v in enumerate(versions)}
    children: dict[str, int] = {}
    for v in versions:
        for p in v.parents:
            children[p] = max(children.get(p, -1), order[v.id])
    for i, v in enumerate(versions):
        first = v.parents[0] if v.parents else None
        if first is not None and first in lane and first not in continued:
            lane[v.id] = lane[first]
            continued.add(first)
        else:
            k = 0
            while used_until.get(k, -1) >= i:
                k += 1
            lane[v.id] = k
        used_until[lane[v.id]] = max(used_until.get(lane[v.id], -1), children.get(v.id, i))
    return lane


def lineage_graph(
    versions: Sequence[VersionSummary], rollbacks: Sequence[Rollback], *, href: str = "/versions/"
) -> str:
    """Every version as a node (newest at the top), an edge to each parent (the first solid, further
    merge inputs dashed), aliases as labels and each rollback as a curved arrow from the version an
    alias left back to the one it returned to. Parents outside ``versions`` (an earlier page) are drawn
    as edges leaving the graph at the bottom."""
    if not versions:
        return (
            '<svg class="lineage" id="lineage" viewBox="0 0 300 40" xmlns="http://www.w3.org/2000/svg">'
            '<text x="10" y="24" class="empty">no versions yet</text></svg>'
        )
    oldest_first = sorted(versions, key=lambda v: v.id)
    lane = lanes(oldest_first)
    n = len(oldest_first)
    row = {v.id: n - 1 - i for i, v in enumerate(oldest_first)}  # newest on top
    width_lanes = max(lane.values()) + 1
    text_x = LEFT + width_lanes * LANE_W + 10
    height = n * ROW_H + 20
    width = text_x + 520

    def pos(vid: str) -> tuple[float, float]:
        return LEFT + lane[vid] * LANE_W, 16 + row[vid] * ROW_H

    edges: list[str] = []
    for v in oldest_first:
        cx, cy = pos(v.id)
        for k, p in enumerate(v.parents):
            cls = "edge" if k == 0 else "edge merge"
            if p in row:
                px, py = pos(p)
                mid = (cy + py) / 2
                d = f"M{cx:.1f},{cy:.1f} C{cx:.1f},{mid:.1f} {px:.1f},{mid:.1f} {px:.1f},{py:.1f}"
            else:
                d = f"M{cx:.1f},{cy:.1f} L{cx:.1f},{height:.1f}"
            edges.append(
                f'<path d="{d}" class="{cls}" fill="none" data-child="{escape(v.id)}" '
                f'data-parent="{escape(p)}"><title>{escape(v.id)} ← {escape(p)}</title></path>'
            )
    for rb in rollbacks:
        if rb.left in row and rb.to in row:
            (ax, ay), (bx, by) = pos(rb.left), pos(rb.to)
            bend = LEFT + width_lanes * LANE_W - 4
            d = f"M{ax:.1f},{ay:.1f} C{bend + 30:.1f},{ay:.1f} {bend + 30:.1f},{by:.1f} {bx:.1f},{by:.1f}"
            edges.append(
                f'<path d="{d}" class="rollback" fill="none" marker-end="url(#arrow)" '
                f'data-alias="{escape(rb.alias)}"><title>rollback of {escape(rb.alias)}: '
                f"{escape(rb.left)} → {escape(rb.to)} at {escape(rb.at)}</title></path>"
            )
    nodes: list[str] = []
    for v in oldest_first:
        cx, cy = pos(v.id)
        kind = "root" if not v.parents else ("merge" if len(v.parents) > 1 else "delta")
        label = f"{v.id}  {v.method}" + (f"  round {v.round}" if v.round is not None else "")
        if v.rejected:
            label += f"  ({v.accepted} accepted, {v.rejected} rejected)"
        elif v.accepted:
            label += f"  ({v.accepted} accepted)"
        alias_text = "".join(f'<tspan class="alias" dx="8">[{escape(a)}]</tspan>' for a in v.aliases)
        nodes.append(
            f'<a href="{escape(href + v.id)}" class="node {kind}" data-version="{escape(v.id)}">'
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="7"/>'
            f'<text x="{text_x}" y="{cy + 4:.1f}">{escape(label)}{alias_text}</text>'
            f"<title>{escape(v.id)}: {escape(v.kind)} by {escape(v.method)}, parents "
            f"{escape(', '.join(v.parents) or 'none')}</title></a>"
        )
    defs = (
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>'
    )
    return (
        f'<svg class="lineage" id="lineage" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="lineage graph of {n} versions" xmlns="http://www.w3.org/2000/svg">'
        + defs
        + "".join(edges)
        + "".join(nodes)
        + "</svg>"
    )
