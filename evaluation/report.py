"""A self-contained HTML report of an evaluation: tables, SVG plots drawn here, images inlined.

    write_report(metrics, "eval/report.html", images) -> Path

No plotting library and nothing fetched: charts are SVG written by this module (matplotlib is
not a dependency of the project), images are PNG data URIs, so the file opens anywhere offline
and can be attached to a run. `metrics` is the dict `evaluation.evaluate.evaluate` writes to
metrics.json; `images` maps the image ids it references to PIL images.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

PRIOR_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b")
BASELINE_COLORS = ("#7f7f7f", "#a6a6a6", "#5c5c5c", "#c4c4c4", "#8f8f8f")
SUMMARY_METRICS = ("cos_image", "cos_text", "cos_unrelated_text", "cos_image_minus_baseline", "r1", "r5", "r10",
                   "rank", "frechet", "norm_ratio", "mse")
CHART_METRICS = ("cos_image", "cos_image_minus_baseline", "r1", "r10", "frechet", "norm_ratio")
PROMPT_CHARTS = (("swap_acc", "swap-pair accuracy (own prompt closer than the swapped one)"),
                 ("cos_nearest_image", "cos to the nearest real image embedding (gap-sensitive)"),
                 ("cos_text", "cos(pred, prompt text embedding)"),
                 ("text_r1", "own prompt retrieved first among the category's prompts"))
CURVES = (("train", "loss", "training loss"), ("eval", "cos_to_image", "held-out cos(pred, image) during training"),
          ("eval", "loss", "held-out loss during training"))

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;
padding:0 16px}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:4px}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:right;vertical-align:top}th{background:#f5f5f5}td.l,th.l{text-align:left}
.best{font-weight:bold;background:#eaf6ea}.ci{color:#777;font-size:.85em}.note{color:#555;font-size:.9em}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #eee;padding:4px}
.thumb{max-width:128px;max-height:128px;display:block}.gen{max-width:192px;max-height:192px}
.true{color:#2ca02c;font-weight:bold}.skip{color:#a15c00}.cap{max-width:260px;text-align:left}
"""


# -- small helpers ---------------------------------------------------------------------------------


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}"


def image_data_uri(image: Image.Image, max_side: int = 256) -> str:
    """A PNG data URI of the image, downscaled to max_side (keeps the report small)."""
    im = image.convert("RGB")
    if max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(image: Image.Image | None, alt: str, cls: str = "thumb", max_side: int = 256) -> str:
    if image is None:
        return f'<span class="note">{esc(alt)}: no image</span>'
    return f'<img class="{cls}" alt="{esc(alt)}" title="{esc(alt)}" src="{image_data_uri(image, max_side)}">'


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    # the axis runs from the first tick to the last, so they must enclose [lo, hi]: no point past an axis
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _finite(*vals) -> list[float]:
    return [float(v) for v in vals if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]


# -- charts --------------------------------------------------------------------------------------------


def svg_bars(title: str, items: Sequence[tuple[str, float | None, float | None, float | None, str]],
             note: str = "", width: int = 560) -> str:
    """Horizontal bars with confidence-interval whiskers: items = (label, value, ci_low, ci_high, color)."""
    label_w, row_h, top, bottom = 170, 22, 34, 34
    height = top + bottom + row_h * len(items)
    vals = _finite(*[v for it in items for v in it[1:4]], 0.0)
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.05 or 0.05
    ticks = _nice_ticks(lo - (pad if lo < 0 else 0), hi + pad)
    x0, x1 = ticks[0], ticks[-1]
    plot_w = width - label_w - 20

    def x(v: float) -> float:
        return label_w + (v - x0) / (x1 - x0) * plot_w

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{esc(title)}</text>']
    for t in ticks:
        parts.append(f'<line x1="{x(t):.1f}" y1="{top - 4}" x2="{x(t):.1f}" y2="{height - bottom + 4}" '
                     f'stroke="#eee"/><text x="{x(t):.1f}" y="{height - bottom + 18}" text-anchor="middle" '
                     f'font-size="10">{esc(fmt(t, 3))}</text>')
    zero = x(0.0) if x0 <= 0 <= x1 else x(x0)
    for i, (label, v, clo, chi, color) in enumerate(items):
        y = top + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{y + row_h * 0.65:.1f}" text-anchor="end" font-size="11">'
                     f'{esc(label[:26])}</text>')
        if v is None or not math.isfinite(v):
            parts.append(f'<text x="{label_w + 4}" y="{y + row_h * 0.65:.1f}" font-size="10" fill="#999">n/a</text>')
            continue
        xa, xb = sorted((zero, x(v)))
        parts.append(f'<rect x="{xa:.1f}" y="{y + 4}" width="{max(xb - xa, 1):.1f}" height="{row_h - 8}" '
                     f'fill="{color}" opacity="0.85"><title>{esc(label)}: {esc(fmt(v))} '
                     f'[{esc(fmt(clo))}, {esc(fmt(chi))}]</title></rect>')
        if clo is not None and chi is not None and math.isfinite(clo) and math.isfinite(chi):
            ym = y + row_h / 2
            parts.append(f'<g stroke="#222" stroke-width="1.2"><line x1="{x(clo):.1f}" y1="{ym}" x2="{x(chi):.1f}" '
                         f'y2="{ym}"/><line x1="{x(clo):.1f}" y1="{ym - 5}" x2="{x(clo):.1f}" y2="{ym + 5}"/>'
                         f'<line x1="{x(chi):.1f}" y1="{ym - 5}" x2="{x(chi):.1f}" y2="{ym + 5}"/></g>')
    if note:
        parts.append(f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle" font-size="10" fill="#666">'
                     f'{esc(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_grouped_bars(title: str, groups: Sequence[str],
                     series: Sequence[tuple[str, str, Sequence[tuple[float | None, float | None, float | None]]]],
                     width: int = 760, height: int = 300) -> str:
    """Vertical bars per group (e.g. prompt category), one bar per series (model), CI whiskers.

    series = (name, color, [(value, ci_low, ci_high) per group]).
    """
    left, right, top, bottom = 48, 170, 28, 40
    vals = _finite(0.0, *[v for _, _, pts in series for p in pts for v in p])
    ticks = _nice_ticks(min(vals), max(vals) * 1.05 if max(vals) > 0 else 1.0)
    y0, y1 = ticks[0], ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def y(v: float) -> float:
        return top + plot_h - (v - y0) / (y1 - y0) * plot_h

    gw = plot_w / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
             f'<text x="{left + plot_w / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
             f'{esc(title)}</text>']
    for t in ticks:
        parts.append(f'<line x1="{left}" y1="{y(t):.1f}" x2="{left + plot_w}" y2="{y(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{y(t) + 3:.1f}" text-anchor="end" font-size="10">{esc(fmt(t, 3))}'
                     f'</text>')
    for gi, g in enumerate(groups):
        parts.append(f'<text x="{left + gw * (gi + 0.5):.1f}" y="{height - bottom + 16}" text-anchor="middle" '
                     f'font-size="11">{esc(g)}</text>')
        for si, (name, color, pts) in enumerate(series):
            v, lo, hi = pts[gi] if gi < len(pts) else (None, None, None)
            if v is None or not math.isfinite(v):
                continue
            xb = left + gw * gi + gw * 0.1 + si * bw
            ya, yb = sorted((y(max(y0, 0.0)), y(v)))
            parts.append(f'<rect x="{xb:.1f}" y="{ya:.1f}" width="{bw * 0.9:.1f}" height="{max(yb - ya, 1):.1f}" '
                         f'fill="{color}" opacity="0.85"><title>{esc(name)} / {esc(g)}: {esc(fmt(v))} '
                         f'[{esc(fmt(lo))}, {esc(fmt(hi))}]</title></rect>')
            if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
                xm = xb + bw * 0.45
                parts.append(f'<line x1="{xm:.1f}" y1="{y(lo):.1f}" x2="{xm:.1f}" y2="{y(hi):.1f}" stroke="#222"/>')
    for si, (name, color, _) in enumerate(series):
        ly = top + 14 * si
        parts.append(f'<rect x="{width - right + 10}" y="{ly}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{width - right + 24}" y="{ly + 9}" font-size="11">{esc(name[:24])}</text>')
    parts.append("</svg>")
    return "".join(parts)


class _Frame:
    """A chart's frame: maps data to pixels and opens the SVG (title, grid, tick and axis labels)."""

    def __init__(self, title: str, xt: list[float], yt: list[float], width: int, height: int,
                 margins: tuple[int, int, int, int]) -> None:
        self.title, self.xt, self.yt, self.width, self.height = title, xt, yt, width, height
        self.left, self.right, self.top, self.bottom = margins
        self.plot_w, self.plot_h = width - self.left - self.right, height - self.top - self.bottom

    def px(self, v: float) -> float:
        return self.left + (v - self.xt[0]) / ((self.xt[-1] - self.xt[0]) or 1) * self.plot_w

    def py(self, v: float) -> float:
        return self.top + self.plot_h - (v - self.yt[0]) / ((self.yt[-1] - self.yt[0]) or 1) * self.plot_h

    def open(self, xlabel: str, ylabel: str = "", x_digits: int = 4, x_grid: bool = False) -> list[str]:
        left, top, plot_w, plot_h = self.left, self.top, self.plot_w, self.plot_h
        width, height = self.width, self.height
        parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                 f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(self.title)}">',
                 f'<text x="{left + plot_w / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
                 f'{esc(self.title)}</text>']
        for t in self.yt:
            parts.append(f'<line x1="{left}" y1="{self.py(t):.1f}" x2="{left + plot_w}" y2="{self.py(t):.1f}" '
                         f'stroke="#eee"/><text x="{left - 4}" y="{self.py(t) + 3:.1f}" text-anchor="end" '
                         f'font-size="10">{esc(fmt(t, 3))}</text>')
        for t in self.xt:
            if x_grid:
                parts.append(f'<line x1="{self.px(t):.1f}" y1="{top}" x2="{self.px(t):.1f}" y2="{top + plot_h}" '
                             f'stroke="#eee"/>')
            parts.append(f'<text x="{self.px(t):.1f}" y="{height - self.bottom + 16}" text-anchor="middle" '
                         f'font-size="10">{esc(fmt(t, x_digits))}</text>')
        parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" font-size="11">'
                     f'{esc(xlabel)}</text>')
        if ylabel:
            parts.append(f'<text x="12" y="{top + plot_h / 2}" text-anchor="middle" font-size="11" '
                         f'transform="rotate(-90 12 {top + plot_h / 2})">{esc(ylabel)}</text>')
        return parts


def svg_lines(title: str, series: Sequence[tuple[str, str, Sequence[float], Sequence[float]]], xlabel: str = "step",
              width: int = 560, height: int = 280) -> str:
    """Line chart: series = (name, color, xs, ys); NaNs break nothing (points are skipped)."""
    left, right, top, bottom = 56, 150, 28, 40
    pts_all = [(x, y) for _, _, xs, ys in series for x, y in zip(xs, ys, strict=False)
               if _finite(x, y) and len(_finite(x, y)) == 2]
    if not pts_all:
        return ""
    xt = _nice_ticks(min(p[0] for p in pts_all), max(p[0] for p in pts_all))
    yt = _nice_ticks(min(p[1] for p in pts_all), max(p[1] for p in pts_all))
    frame = _Frame(title, xt, yt, width, height, (left, right, top, bottom))
    px, py = frame.px, frame.py
    parts = frame.open(xlabel)
    for si, (name, color, xs, ys) in enumerate(series):
        pts = [(x, y) for x, y in zip(xs, ys, strict=False) if len(_finite(x, y)) == 2]
        if pts:
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{d}">'
                         f'<title>{esc(name)}</title></polyline>')
            if len(pts) == 1:
                parts.append(f'<circle cx="{px(pts[0][0]):.1f}" cy="{py(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        ly = top + 14 * si
        parts.append(f'<rect x="{width - right + 10}" y="{ly}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{width - right + 24}" y="{ly + 9}" font-size="11">{esc(name[:20])}</text>')
    parts.append("</svg>")
    return "".join(parts)


#: One point of `svg_scatter`: label, color, (x, x_low, x_high), (y, y_low, y_high); None: no interval.
ScatterPoint = tuple[str, str, tuple[float | None, float | None, float | None],
                     tuple[float | None, float | None, float | None]]


def svg_scatter(title: str, points: Sequence[ScatterPoint], xlabel: str, ylabel: str,
                curve: Sequence[str] = (), width: int = 560, height: int = 340) -> str:
    """Points with interval whiskers on both axes; the points named in `curve` are joined in that
    order (a trade-off curve). A point without a finite x or y is listed as n/a in the legend."""
    left, right, top, bottom = 56, 170, 28, 44
    finite = [pt for pt in points if len(_finite(pt[2][0], pt[3][0])) == 2]
    if not finite:
        return ""
    xs = _finite(*[v for pt in finite for v in pt[2]])
    ys = _finite(*[v for pt in finite for v in pt[3]])
    xpad, ypad = (max(xs) - min(xs)) * 0.05 or 0.02, (max(ys) - min(ys)) * 0.05 or 0.02
    xt, yt = _nice_ticks(min(xs) - xpad, max(xs) + xpad), _nice_ticks(min(ys) - ypad, max(ys) + ypad)
    frame = _Frame(title, xt, yt, width, height, (left, right, top, bottom))
    px, py = frame.px, frame.py
    parts = frame.open(xlabel, ylabel, x_digits=3, x_grid=True)
    by_label = {pt[0]: pt for pt in finite}
    line = [f"{px(by_label[n][2][0]):.1f},{py(by_label[n][3][0]):.1f}" for n in curve if n in by_label]
    if len(line) > 1:
        parts.append(f'<polyline fill="none" stroke="#888" stroke-dasharray="4 3" points="{" ".join(line)}"/>')
    for i, (label, color, (x, xlo, xhi), (y, ylo, yhi)) in enumerate(points):
        ly = top + 15 * i
        ok = len(_finite(x, y)) == 2
        parts.append(f'<rect x="{width - right + 10}" y="{ly}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{width - right + 24}" y="{ly + 9}" font-size="11">{esc(label[:22])}'
                     f'{"" if ok else " (n/a)"}</text>')
        if not ok:
            continue
        cx, cy = px(x), py(y)
        whiskers = []
        if len(_finite(xlo, xhi)) == 2:
            whiskers.append(f'<line x1="{px(xlo):.1f}" y1="{cy:.1f}" x2="{px(xhi):.1f}" y2="{cy:.1f}"/>')
        if len(_finite(ylo, yhi)) == 2:
            whiskers.append(f'<line x1="{cx:.1f}" y1="{py(ylo):.1f}" x2="{cx:.1f}" y2="{py(yhi):.1f}"/>')
        parts.append(f'<g stroke="{color}" stroke-width="1.3">{"".join(whiskers)}</g>'
                     f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{color}"><title>{esc(label)}: '
                     f'{esc(xlabel)} {esc(fmt(x))} [{esc(fmt(xlo))}, {esc(fmt(xhi))}], {esc(ylabel)} {esc(fmt(y))} '
                     f'[{esc(fmt(ylo))}, {esc(fmt(yhi))}]</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


# -- the report ---------------------------------------------------------------------------------------


def _colors(models: Mapping[str, dict]) -> dict[str, str]:
    out, pi, bi = {}, 0, 0
    for name, m in models.items():
        if m.get("kind") == "prior":
            out[name] = PRIOR_COLORS[pi % len(PRIOR_COLORS)]
            pi += 1
        else:
            out[name] = BASELINE_COLORS[bi % len(BASELINE_COLORS)]
            bi += 1
    return out


def _cell(s: dict | None) -> str:
    if not s:
        return "-"
    lo, hi = s.get("ci", [None, None])
    return f'{esc(fmt(s.get("value")))} <span class="ci">[{esc(fmt(lo, 3))}, {esc(fmt(hi, 3))}]</span>'


def _best(values: dict[str, float | None], better: str) -> set[str]:
    vals = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if not vals:
        return set()
    if better == "higher":
        target = max(vals.values())
    elif better == "lower":
        target = min(vals.values())
    else:  # "1": closest to one
        target = min(vals.values(), key=lambda v: abs(v - 1))
    return {k for k, v in vals.items() if v == target}


def _summary_table(result: dict) -> str:
    models = result["models"]
    info = result.get("metric_info", {})
    cols = [k for k in SUMMARY_METRICS if any(k in m["metrics"] for m in models.values())]
    probe = result.get("probe", {}).get("models", {}) if isinstance(result.get("probe"), dict) else {}
    head = "".join(f'<th title="{esc(info.get(k, {}).get("what", k))}">{esc(k)}<br><span class="ci">'
                   f'{esc(info.get(k, {}).get("better", ""))}</span></th>' for k in cols)
    if probe:
        head += '<th title="attribute probe AUC">probe_auc<br><span class="ci">higher</span></th>'
    best = {k: _best({n: m["metrics"].get(k, {}).get("value") for n, m in models.items()},
                     info.get(k, {}).get("better", "higher")) for k in cols}
    best_probe = _best({n: probe.get(n, {}).get("value") for n in models}, "higher") if probe else set()
    rows = []
    for name, m in models.items():
        cells = "".join(f'<td class="{"best" if name in best[k] else ""}">{_cell(m["metrics"].get(k))}</td>'
                        for k in cols)
        if probe:
            cells += f'<td class="{"best" if name in best_probe else ""}">{_cell(probe.get(name))}</td>'
        kind = m.get("kind", "")
        sub = m.get("objective", "") if kind == "prior" else "baseline"
        rows.append(f'<tr><td class="l"><b>{esc(name)}</b><br><span class="ci">{esc(sub)}</span></td>{cells}</tr>')
    return f'<table><tr><th class="l">model</th>{head}</tr>{"".join(rows)}</table>'


def _metric_charts(result: dict, colors: dict[str, str]) -> str:
    models = result["models"]
    info = result.get("metric_info", {})
    charts = []
    for k in CHART_METRICS:
        items = []
        for name, m in models.items():
            s = m["metrics"].get(k)
            if s:
                items.append((name, s.get("value"), s["ci"][0], s["ci"][1], colors[name]))
        if items:
            what = info.get(k, {})
            charts.append(svg_bars(f"{k}: {what.get('what', '')}"[:90], items, f"better: {what.get('better', '')}"))
    probe = result.get("probe")
    if isinstance(probe, dict) and probe.get("models"):
        items = [(n, s.get("value"), s["ci"][0], s["ci"][1], colors.get(n, "#2ca02c"))
                 for n, s in probe["models"].items()]
        charts.append(svg_bars("attribute probe AUC (probe trained on real image embeddings)", items,
                               "better: higher; 0.5 = chance"))
    return f'<div class="charts">{"".join(charts)}</div>'


def _comparisons(result: dict) -> str:
    comps = result.get("comparisons") or []
    if not comps:
        return ""
    rows = "".join(f'<tr><td class="l">{esc(c["a"])}</td><td class="l">{esc(c["b"])}</td><td class="l">'
                   f'{esc(c["metric"])}</td><td>{_cell(c)}</td></tr>' for c in comps)
    return ("<h2>Paired differences</h2><p class='note'>a − b on the same rows (seed-averaged), paired bootstrap "
            f"interval; an interval excluding 0 is a difference the rows support.</p><table><tr><th class='l'>a</th>"
            f"<th class='l'>b</th><th class='l'>metric</th><th>a − b</th></tr>{rows}</table>")


def _probe(result: dict) -> str:
    p = result.get("probe")
    if not isinstance(p, dict):
        return ""
    if "skipped" in p:
        return f"<h2>Attribute probe</h2><p class='skip'>skipped: {esc(p['skipped'])}</p>"
    words = ", ".join(p.get("words", []))
    rows = "".join(f'<tr><td class="l">{esc(n)}</td><td>{_cell(s)}</td></tr>' for n, s in p["models"].items())
    return (f"<h2>Attribute probe</h2><p class='note'>Logistic classifiers for attribute words in the caption "
            f"({esc(words)}), trained on {p.get('train_rows')} real image embeddings of the training split only, "
            f"scored on each model's predictions for the held-out rows (mean ROC AUC over words). A decoder only "
            f"sees image embeddings; a prediction across the modality gap scores near chance here even when its "
            f"retrieval is perfect.</p><table><tr><th class='l'>model</th><th>mean AUC</th></tr>{rows}</table>")


def _prompts(result: dict, colors: dict[str, str]) -> str:
    p = result.get("prompts")
    if not isinstance(p, dict):
        return ""
    if "skipped" in p:
        return f"<h2>Prompt suites (T2I-CompBench)</h2><p class='skip'>skipped: {esc(p['skipped'])}</p>"
    cats = p["categories"]
    groups = list(cats)
    names = list(p["overall"])
    charts = []
    for metric, title in PROMPT_CHARTS:
        series = []
        for n in names:
            pts = []
            for c in groups:
                s = cats[c]["models"].get(n, {}).get(metric)
                pts.append((s["value"], s["ci"][0], s["ci"][1]) if s else (None, None, None))
            if any(v is not None for v, _, _ in pts):
                series.append((n, colors.get(n, "#333"), pts))
        if series:
            charts.append(svg_grouped_bars(title, groups, series))
    rows = []
    for c, e in cats.items():
        ex = "<br>".join(f"{esc(a)} → {esc(b)}" for a, b in e.get("swap_examples", []))
        rows.append(f"<tr><td class='l'>{esc(c)}</td><td>{e['n_prompts']}</td><td>{e['n_swaps']}</td>"
                    f"<td class='l cap'>{ex}</td></tr>")
    overall_cols = [m for m, _ in PROMPT_CHARTS] + ["swap_margin", "norm_ratio"]
    orow = "".join(f"<tr><td class='l'>{esc(n)}</td>" + "".join(f"<td>{_cell(p['overall'][n].get(m))}</td>"
                                                               for m in overall_cols) + "</tr>" for n in names)
    return (
        "<h2>Prompt suites (T2I-CompBench validation prompts)</h2>"
        f"<p class='note'>Encoded with the store's text encoder ({esc(p.get('encoder', ''))}). Swap-pair test: "
        "attribute words (color, shape, texture) or objects (spatial) exchanged; TextEmb passes it trivially "
        "(cos 1 to itself), so read it with the gap-sensitive cosine to the nearest real image.</p>"
        f"<div class='charts'>{''.join(charts)}</div>"
        "<h3>All categories pooled</h3><table><tr><th class='l'>model</th>"
        + "".join(f"<th>{esc(m)}</th>" for m in overall_cols) + f"</tr>{orow}</table>"
        "<h3>Categories</h3><table><tr><th class='l'>category</th><th>prompts</th><th>swap pairs</th>"
        f"<th class='l'>swap examples</th></tr>{''.join(rows)}</table>"
    )


def _curves(result: dict, colors: dict[str, str]) -> str:
    training = result.get("training") or {}
    charts = []
    for kind, key, title in CURVES:
        series = []
        for name, t in training.items():
            s = (t.get("curves") or {}).get(kind, {})
            if key in s and "step" in s:
                series.append((name, colors.get(name, "#333"), s["step"], s[key]))
        if series:
            charts.append(svg_lines(title, series))
    missing = [n for n, t in training.items() if not t.get("curves")]
    note = (f"<p class='note'>No training log for: {esc(', '.join(missing))} (pass a run folder to see its curves)."
            f"</p>" if missing else "")
    if not charts and not note:
        return ""
    return f"<h2>Training curves</h2>{note}<div class='charts'>{''.join(c for c in charts if c)}</div>"


def _examples(result: dict, images: Mapping[str, Image.Image]) -> str:
    exs = result.get("examples") or []
    if not exs:
        return ""
    blocks = []
    for ex in exs:
        own = img_tag(images.get(ex["image"]) if ex.get("image") else None, f"real image of {ex['key']}")
        rows = []
        for name, m in ex["models"].items():
            cells = []
            for nb in m["neighbours"]:
                im = img_tag(images[nb["image"]], nb["key"]) if nb.get("image") and nb["image"] in images else ""
                mark = " <span class='true'>✓ true image</span>" if nb["is_true"] else ""
                cells.append(f"<td class='l cap'>{im}<b>{esc(nb['key'])}</b> cos {esc(fmt(nb['cos'], 3))}{mark}<br>"
                             f"{esc(nb['caption'][:140])}</td>")
            rows.append(f"<tr><td class='l'>{esc(name)}</td><td>{m['true_rank']}</td><td>{esc(fmt(m['cos_true'], 3))}"
                        f"</td>{''.join(cells)}</tr>")
        blocks.append(f"<h3>{esc(ex['caption'][:200])}</h3><p class='note'>row key {esc(ex['key'])}</p>{own}"
                      "<table><tr><th class='l'>model</th><th>rank of true</th><th>cos to true</th>"
                      f"<th class='l' colspan='{len(ex['models'][next(iter(ex['models']))]['neighbours'])}'>nearest "
                      f"real rows (held-out gallery)</th></tr>{''.join(rows)}</table>")
    return ("<h2>Examples: real rows nearest to each prediction</h2><p class='note'>Held-out captions; each model's "
            "prediction (seed 0) against the held-out real image embeddings. Images appear when an image source "
            "was given; otherwise keys and captions.</p>" + "".join(blocks))


def _generation(result: dict, images: Mapping[str, Image.Image]) -> str:
    g = result.get("generation")
    if not isinstance(g, dict):
        return ""
    if "skipped" in g:
        return f"<h2>Generated images</h2><p class='skip'>skipped: {esc(g['skipped'])}</p>"
    names = list(g["items"][0]["images"]) if g["items"] else []
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = []
    for it in g["items"]:
        cells = "".join(f"<td>{img_tag(images.get(it['images'][n]), n + ': ' + it['prompt'], 'gen')}</td>"
                        for n in names)
        rows.append(f"<tr><td class='l cap'>{esc(it['prompt'])}<br><span class='ci'>seed {it['seed']}</span></td>"
                    f"{cells}</tr>")
    parts = [f"<h2>Generated images</h2><p class='note'>Decoder {esc(g['decoder'])} ({esc(g['decoder_path'])}); "
             f"the same prompts and seeds for every prior.</p><table><tr><th class='l'>prompt</th>{head}</tr>"
             f"{''.join(rows)}</table>"]
    for kind, block in (g.get("metrics") or {}).items():
        if "unavailable" in block:
            parts.append(f"<p class='skip'>{esc(kind)}: {esc(block['unavailable'])}</p>")
            continue
        if kind == "fid":
            parts.append("<h3>FID</h3><table>" + "".join(f"<tr><td class='l'>{esc(n)}</td><td>{esc(fmt(v))}</td>"
                                                         f"</tr>" for n, v in block.items()) + "</table>")
            continue
        rows = "".join(f"<tr><td class='l'>{esc(n)}</td><td>{_cell(s)}</td></tr>"
                       for n, s in block.get("per_prior", {}).items())
        parts.append(f"<h3>{esc(kind)}</h3><p class='note'>model {esc(block.get('model', ''))}</p><table>"
                     f"<tr><th class='l'>prior</th><th>mean score</th></tr>{rows}</table>")
        if block.get("win_rates"):
            wr = "".join(f"<tr><td class='l'>{esc(n)}</td><td>{_cell(w['hard'])}</td><td>{_cell(w['soft'])}</td></tr>"
                         for n, w in block["win_rates"].items())
            parts.append(f"<p>PickScore win rate against <b>{esc(block['win_rate_vs'])}</b> (same prompts and seeds)"
                         f"</p><table><tr><th class='l'>prior</th><th>hard</th><th>soft</th></tr>{wr}</table>")
    return "".join(parts)


def _header(result: dict) -> str:
    st, sp, se = result.get("store", {}), result.get("split", {}), result.get("settings", {})
    enc = st.get("encoder", {})
    ds = result.get("dataset", {}).get("cos_text_image")
    rows = [
        ("store", f"{st.get('path')} ({st.get('rows')} rows)"),
        ("encoder", f"{enc.get('preset')} (image {enc.get('image_model')}, text {enc.get('text_model')}, "
                    f"D={enc.get('image_dim')})"),
        ("held-out split", f"fraction {sp.get('heldout_fraction')}, seed {sp.get('heldout_seed')} "
                           f"({sp.get('source')}): {sp.get('heldout_rows')} rows evaluated = retrieval gallery; "
                           f"baselines fitted on {sp.get('train_rows_used')} training rows"),
        ("statistics", f"{se.get('seeds')} noise seeds per prior, averaged per row; {int(100 * se.get('ci', 0.95))} % "
                       f"bootstrap intervals over rows ({se.get('n_boot')} draws, seed {se.get('bootstrap_seed')}; "
                       f"Fréchet distance: {se.get('n_boot_fd')} draws)"),
        ("cos(text, true image)", _cell(ds) if ds else "-"),
        ("created", f"{result.get('created')} ({result.get('elapsed_s')} s)"),
    ]
    body = "".join(f"<tr><th class='l'>{esc(k)}</th><td class='l'>{v if k.startswith('cos') else esc(v)}</td></tr>"
                   for k, v in rows)
    return f"<table>{body}</table>"


NOTES = """<ul class="note">
<li>R@k ranks cosines, so it cannot see a constant shift: TextEmb can retrieve perfectly while sitting across the
modality gap from every real image. Read it with the gap-sensitive figures: cos to the true image, Fréchet
distance, norm ratio and the attribute probe.</li>
<li>text-shift (text − mean text + mean image) is a strong trivial baseline because the gap is close to a constant
vector; a prior that does not beat it has learned little.</li>
<li>The Fréchet distance is biased upwards at small n: compare models at the same n only (they are, here).</li>
</ul>"""


def write_report(result: dict, path: str | os.PathLike, images: Mapping[str, Image.Image] | None = None) -> Path:
    """Write the self-contained HTML report of an evaluation result."""
    images = images or {}
    colors = _colors(result["models"])
    body = [
        "<h1>Prior evaluation</h1>", _header(result), NOTES,
        "<h2>Embedding metrics on the held-out split</h2>", _summary_table(result), _metric_charts(result, colors),
        _comparisons(result), _probe(result), _prompts(result, colors), _curves(result, colors),
        _examples(result, images), _generation(result, images),
    ]
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Prior evaluation</title>"
           f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path
