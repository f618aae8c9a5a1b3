"""A scenario's report: ``report.json`` (everything) and ``report.html`` (a page a person reads).

The page shows, for each move: its expectations and whether they held, the
phase timeline, dirty rate vs send rate and throttle per pre-copy round, the
heartbeat gaps over time with the switchover's gap marked, bytes per phase,
downtime reported vs observed and integrity; and across repeats, min/p50/p95/max.
Charts are inline SVG (no plotting dependency, no network).
"""

from __future__ import annotations

import datetime
import json
from html import escape
from pathlib import Path
from typing import Any

from testbed.experiments.chart import Panel, svg
from testbed.units import format_bytes

PHASE_COLORS = {"precheck": "#999", "disk-sync": "#1f77b4", "memory-precopy": "#2ca02c", "switchover": "#d62728",
                "verify": "#9467bd", "commit": "#8c564b", "rollback": "#ff7f0e", "rolled-back": "#ff7f0e",
                "failed": "#d62728", "done": "#333"}


def write(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, h = out_dir / "report.json", out_dir / "report.html"
    j.write_text(json.dumps(report, indent=1) + "\n")
    h.write_text(html(report))
    return j, h


def _timeline(phases: list[dict[str, Any]]) -> str:
    if not phases:
        return ""
    end = max(p["end_s"] for p in phases) or 1.0
    w, bar = 760, 22
    rows = []
    for i, p in enumerate(phases):
        x0, x1 = 120 + (w - 130) * p["start_s"] / end, 120 + (w - 130) * p["end_s"] / end
        c = PHASE_COLORS.get(p["name"], "#666")
        rows.append(f'<text x="4" y="{i * bar + 16}">{escape(p["name"])}</text>'
                    f'<rect x="{x0:.1f}" y="{i * bar + 4}" width="{max(x1 - x0, 1.5):.1f}" height="{bar - 8}" '
                    f'fill="{c}"/><text x="{x1 + 4:.1f}" y="{i * bar + 16}" font-size="11">'
                    f'{(p["end_s"] - p["start_s"]) * 1000:.0f} ms</text>')
    hgt = len(phases) * bar + 24
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 60}" height="{hgt}" font-family="sans-serif" '
            f'font-size="12"><rect width="100%" height="100%" fill="white"/>{"".join(rows)}'
            f'<text x="120" y="{hgt - 4}" font-size="11" fill="#555">0 s</text>'
            f'<text x="{w - 10}" y="{hgt - 4}" font-size="11" fill="#555" text-anchor="end">{end:.2f} s '
            f'(engine time)</text></svg>')


def _gaps(gaps: list[dict[str, Any]], observed: float | None, span_s: float) -> str:
    """Heartbeat gaps (>= 5 ms) over the move's time, the switchover's gap in red."""
    w, hgt, pl, pb = 760, 220, 50, 30
    ymax = max([g["gap_ms"] for g in gaps] + [50.0])
    span = max(span_s, max((g["at_s"] for g in gaps), default=1.0), 1.0)
    sw = min(gaps, key=lambda g: abs(g["gap_ms"] - observed)) if gaps and observed else None
    items = []
    for g in gaps:
        x = pl + (w - pl - 10) * g["at_s"] / span
        y = (hgt - pb) * (1 - g["gap_ms"] / ymax)
        red = g is sw
        items.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{hgt - pb}" y2="{max(y, 2):.1f}" '
                     f'stroke="{"#d62728" if red else "#1f77b4"}" stroke-width="{3 if red else 1.5}"/>')
        if red:
            items.append(f'<text x="{x + 4:.1f}" y="{max(y, 12) + 10:.1f}" fill="#d62728" font-size="11">'
                         f'switchover: {g["gap_ms"]:.0f} ms</text>')
    axis = (f'<line x1="{pl}" x2="{w - 10}" y1="{hgt - pb}" y2="{hgt - pb}" stroke="#888"/>'
            f'<text x="{pl - 4}" y="12" text-anchor="end" font-size="11">{ymax:.0f} ms</text>'
            f'<text x="{pl - 4}" y="{hgt - pb}" text-anchor="end" font-size="11">0</text>'
            f'<text x="{pl}" y="{hgt - 8}" font-size="11">0 s</text>'
            f'<text x="{w - 10}" y="{hgt - 8}" text-anchor="end" font-size="11">{span:.1f} s since the move '
            f'started</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{hgt}" font-family="sans-serif" '
            f'font-size="12"><rect width="100%" height="100%" fill="white"/>{axis}{"".join(items)}</svg>')


def _rounds(rounds: list[dict[str, Any]]) -> str:
    if not rounds:
        return "<p>no pre-copy rounds recorded</p>"
    rates = Panel("dirty rate vs send rate", "round", "MB/s")
    thr = Panel("throttle per round", "round", "%")
    for r in rounds:
        rates.add("dirty", r["n"], r["dirty_rate_pps"] * 4096 / 1e6)
        rates.add("send", r["n"], r["throughput_bps"] / 1e6)
        thr.add("CPU throttle", r["n"], r["throttle_pct"])
        if r.get("stun_pct") is not None:
            thr.add("SDPS stun", r["n"], r["stun_pct"])
    return svg([rates, thr])


def _table(head: list[str], rows: list[list[Any]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


def _move(i: int, m: dict[str, Any]) -> str:
    r = m.get("report") or {}
    parts = [f'<h3 id="move{i}">{escape(m["vm"])}: {escape(m["from"])} ({escape(m["from_vcenter"])}) → '
             f'{escape(m["to"])} ({escape(m["to_vcenter"])}): <span class="{"ok" if m["ok"] else "bad"}">'
             f'{escape(m["status"])}</span></h3>']
    if m.get("fault"):
        parts.append(f"<p>fault injected: {escape(m['fault']['kind'])} at {escape(m['fault']['at'])}</p>")
    parts.append(_table(["expectation", "held", "measured"],
                        [[c["what"], "yes" if c["held"] else "NO", c["detail"]] for c in m["checks"]]))
    if m.get("error"):
        parts.append(f"<p class='bad'>{escape(m['error']['message'])}</p>")
    failed = [c for c in m.get("prechecks", []) if c["status"] != "ok"]
    if failed:
        parts.append(_table(["precheck", "status", "message"], [[c["name"], c["status"], c["message"]]
                                                               for c in failed]))
    if r:
        dt, b, integ = r["downtime_ms"], r["bytes"], r["integrity"]
        parts.append(_table(["downtime reported", "downtime observed", "pre-copy stall max", "disk bytes",
                             "memory bytes", "on the wire", "integrity (memory / disk)", "engine time"],
                            [[f"{dt['reported']} ms", f"{dt['observed']} ms", f"{r['stalls_ms']['max']} ms",
                              format_bytes(b["disk"]), format_bytes(b["memory"]),
                              format_bytes(b["wire"]) if b.get("wire") else "-",
                              f"{integ['memory']} / {integ['disk']}", f"{r['total_s']:.2f} s"]]))
        parts.append("<h4>phase timeline</h4>" + _timeline(r.get("phases", [])))
        parts.append("<h4>pre-copy rounds</h4>" + _rounds(r.get("rounds", [])))
    span = (m.get("t1_mono", 0) - m.get("t0_mono", 0)) or 1.0
    parts.append("<h4>heartbeat gaps (≥ 5 ms) during the move</h4>"
                 + _gaps(m.get("heartbeat_gaps", []), r.get("downtime_ms", {}).get("observed"), span))
    return "\n".join(parts)


def html(rep: dict[str, Any]) -> str:
    sc = rep["scenario"]
    when = datetime.datetime.fromtimestamp(rep["started"], datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    s = rep["summary"]
    summary_rows = []
    for key, label in (("downtime_observed_ms", "downtime observed (ms)"),
                       ("downtime_reported_ms", "downtime reported (ms)"),
                       ("engine_total_s", "engine time (s)"), ("task_s", "task time (s)")):
        st = s.get(key)
        if st:
            summary_rows.append([label, st["n"], st["min"], st["p50"], st["p95"], st["max"]])
    body = [f"<h1>scenario {escape(rep['name'])}: <span class='{'ok' if rep['passed'] else 'bad'}'>"
            f"{'PASSED' if rep['passed'] else 'FAILED'}</span></h1>",
            f"<p>{escape(sc.get('description', ''))}</p>",
            f"<p>lab {escape(rep['lab'])}, {when}, {rep['duration_s']} s, {rep['repeat']} repeat(s), "
            f"{s['succeeded']} of {s['moves']} moves succeeded</p>",
            "<h2>summary across repeats</h2>",
            _table(["measure", "n", "min", "p50", "p95", "max"], summary_rows)]
    k = 0
    for ri, run in enumerate(rep["runs"]):
        body.append(f"<h2>run {ri + 1}{' (stopped: ' + escape(run['error']) + ')' if run['error'] else ''}</h2>")
        body.append(_table(["step", "ok", "detail", "duration"],
                           [[st["label"], "yes" if st["ok"] else "NO", st["detail"], f"{st['duration_s']} s"]
                            for st in run["steps"]]))
        for m in run["moves"]:
            body.append(_move(k, m))
            k += 1
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:13px}.ok{color:#2a2}.bad{color:#c22}h3{margin-top:2em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>scenario {escape(rep['name'])}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")
