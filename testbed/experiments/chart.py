"""Small SVG line charts (no plotting dependency): one or more panels side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 420, 300, 60, 150, 36, 46


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, name: str, x: float, y: float | None) -> None:
        if y is not None:
            self.series.setdefault(name, []).append((x, y))


def _ticks(hi: float) -> list[float]:
    if hi <= 0:
        return [0.0]
    raw = hi / 5
    mag = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 0.1
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(hi / step) + 2)]


def _panel(p: Panel, ox: int) -> list[str]:
    pts = [pt for s in p.series.values() for pt in s]
    xmax = max((x for x, _ in pts), default=1.0) or 1.0
    yt = _ticks(max((y for _, y in pts), default=1.0))
    xt = _ticks(xmax)
    xhi, yhi = xt[-1] or 1.0, yt[-1] or 1.0
    pw, ph = W - PAD_L - 10, H - PAD_T - PAD_B

    def sx(x: float) -> float:
        return ox + PAD_L + pw * x / xhi

    def sy(y: float) -> float:
        return PAD_T + ph * (1 - y / yhi)

    out = [f'<text x="{ox + PAD_L + pw / 2}" y="20" text-anchor="middle" font-weight="bold">{escape(p.title)}</text>',
           f'<rect x="{ox + PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for y in yt:
        out.append(f'<line x1="{ox + PAD_L}" x2="{ox + PAD_L + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{ox + PAD_L - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x in xt:
        out.append(f'<text x="{sx(x):.1f}" y="{PAD_T + ph + 16}" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{ox + PAD_L + pw / 2}" y="{H - 8}" text-anchor="middle">{escape(p.xlabel)}</text>')
    out.append(f'<text x="{ox + 14}" y="{PAD_T + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 {ox + 14} {PAD_T + ph / 2})">{escape(p.ylabel)}</text>')
    for i, (name, s) in enumerate(p.series.items()):
        c = COLORS[i % len(COLORS)]
        s = sorted(s)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s) + '"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y in s]
        ly = PAD_T + 14 * i
        out.append(f'<rect x="{ox + W - PAD_R + 20}" y="{ly}" width="10" height="10" fill="{c}"/>')
        out.append(f'<text x="{ox + W - PAD_R + 34}" y="{ly + 9}">{escape(name)}</text>')
    return out


def svg(panels: list[Panel], caption: str = "") -> str:
    width = (W + PAD_R) * len(panels)
    body = [line for i, p in enumerate(panels) for line in _panel(p, i * (W + PAD_R))]
    if caption:
        body.append(f'<text x="8" y="{H + 14}" font-size="11" fill="#555">{escape(caption)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{H + 22}" '
            f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")
