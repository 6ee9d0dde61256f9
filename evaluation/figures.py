"""The report's charts, drawn with matplotlib and embedded as inline SVG.

    st = styles(["eclipse", "TextEmb"])
    svg = to_svg(bar_chart("cos_image", [("eclipse", 0.91, 0.90, 0.92), ("TextEmb", 0.3, None, None)], st))

One builder per chart kind returns a matplotlib `Figure` (the object API: no pyplot, no global
backend state), so a test can read back what was drawn; `to_svg` turns it into an SVG string for
the HTML. A builder returns None when there is nothing finite to draw. Intervals are error bars,
a series of one point is a marker (never a line), and every name keeps its own colour and marker
across all charts of a report (`styles`).
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape

import matplotlib
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

#: A value with its interval; None where there is none.
Interval = tuple[float | None, float | None, float | None]
#: One horizontal bar: label, value, interval low, interval high.
Bar = tuple[str, float | None, float | None, float | None]
#: One scatter point: label, (x, low, high), (y, low, high).
Point = tuple[str, Interval, Interval]

PALETTE = tuple(to_hex(c) for c in matplotlib.colormaps["tab10"].colors)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
HATCHES = ("", "//", "\\\\", "xx", "--", "||")  # line hatches: dotted ones cost 100s of kB of SVG
WIDTH_IN = 6.4  # about 600 px, two charts side by side in the report
TITLE_CHARS = 64  # a title wraps at this many characters: it is never cut off
LABEL_CHARS = 28  # tick and legend labels wrap here
LEGEND_RIGHT = 5  # a legend of more entries goes below the plot
FONT = 9
# Deterministic SVG: fixed ids (hash salt), no date; text as paths, so it looks the same in every browser.
SVG_RC = {"svg.hashsalt": "eclipse-prior-report", "svg.fonttype": "path"}


@dataclass(frozen=True)
class Style:
    color: str
    marker: str
    hatch: str


def styles(names: Iterable[str]) -> dict[str, Style]:
    """A distinct style per name, in order: the palette's colours first, then each further round of
    colours with the next marker and hatch, so no two names look alike."""
    out = {}
    for i, name in enumerate(dict.fromkeys(names)):
        rnd, c = divmod(i, len(PALETTE))
        out[name] = Style(PALETTE[c], MARKERS[rnd % len(MARKERS)], HATCHES[rnd % len(HATCHES)])
    return out


def _style(st: Mapping[str, Style], name: str) -> Style:
    return st.get(name) or Style("#555555", "o", "")


def finite(*vals) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals)


def wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width, break_long_words=True)) or text


def _figure(title: str, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(WIDTH_IN, height), layout="constrained")
    fig.set_label(title)  # to_svg's accessible title: the unwrapped text
    ax = fig.add_subplot()
    ax.set_title(wrap(title, TITLE_CHARS), fontsize=FONT + 2)
    ax.tick_params(labelsize=FONT)
    ax.ticklabel_format(useOffset=False)  # ticks read as values (0.93), not as offsets (+9.3e-1)
    # Without offsets, a narrow range has long labels (0.918875): few x ticks keep them apart.
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.grid(color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _legend(ax: Axes, handles: list | None = None) -> None:
    """Outside the axes, so it never hides data: on the right for a few entries; for more, below the
    plot in columns (a tall legend on the right would squeeze the plot), the figure growing to fit."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    if not handles:
        return
    if len(handles) <= LEGEND_RIGHT:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=FONT)
        return
    longest = max(len(line) for h in handles for line in h.get_label().splitlines())
    ncols = max(1, min(3, int(WIDTH_IN * 72 / (FONT * 0.6 * longest + 30))))  # columns as wide as the figure
    fig = ax.get_figure()
    fig.set_figheight(fig.get_figheight() + 0.2 * math.ceil(len(handles) / ncols))  # the plot keeps its height
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False, fontsize=FONT)


def _interval(ax: Axes, at: float, lo: float | None, hi: float | None, along: str, color: str = "#222222",
              capsize: float = 3) -> None:
    """An error bar from lo to hi along x or y at `at` on the other axis; nothing without an interval.
    Drawn from its own midpoint: a bootstrap interval need not contain the point estimate."""
    if not finite(lo, hi):
        return
    mid, half = (lo + hi) / 2, abs(hi - lo) / 2
    xy, err = ((mid, at), {"xerr": half}) if along == "x" else ((at, mid), {"yerr": half})
    ax.errorbar(*xy, **err, fmt="none", ecolor=color, elinewidth=1.2, capsize=capsize, zorder=3)


def bar_chart(title: str, items: Sequence[Bar], st: Mapping[str, Style], note: str = "") -> Figure | None:
    """Horizontal bars from 0 with interval error bars, one row per item; an item without a finite
    value says n/a in its row."""
    if not any(finite(v) for _, v, _, _ in items):
        return None
    fig, ax = _figure(title, 1.0 + 0.3 * len(items))
    ax.grid(axis="y", visible=False)
    for y, (label, v, lo, hi) in enumerate(items):
        if not finite(v):
            ax.annotate("n/a", (0, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=FONT,
                        color="#888888")
            continue
        s = _style(st, label)
        ax.barh(y, v, height=0.7, color=s.color, hatch=s.hatch, edgecolor="white", alpha=0.9)
        _interval(ax, y, lo, hi, "x")
    ax.set_yticks(range(len(items)), [wrap(label, LABEL_CHARS) for label, *_ in items])
    ax.invert_yaxis()  # first item on top, as in the table
    ax.axvline(0, color="#444444", linewidth=0.8)
    if note:
        ax.set_xlabel(note, fontsize=FONT, color="#555555")
    return fig


def grouped_bar_chart(title: str, groups: Sequence[str], series: Sequence[tuple[str, Sequence[Interval]]],
                      st: Mapping[str, Style]) -> Figure | None:
    """Vertical bars per group (e.g. a prompt category), one bar per series (a model) with interval
    error bars; series = (name, [(value, low, high) per group])."""
    if not any(finite(v) for _, pts in series for v, _, _ in pts):
        return None
    fig, ax = _figure(title, 3.2)
    ax.grid(axis="x", visible=False)
    width = 0.8 / max(len(series), 1)
    for si, (name, pts) in enumerate(series):
        s = _style(st, name)
        xs = [gi - 0.4 + width * (si + 0.5) for gi in range(len(groups))]
        drawn = [(x, v, lo, hi) for x, (v, lo, hi) in zip(xs, pts, strict=False) if finite(v)]
        ax.bar([d[0] for d in drawn], [d[1] for d in drawn], width=width * 0.9, color=s.color, hatch=s.hatch,
               edgecolor="white", alpha=0.9, label=wrap(name, LABEL_CHARS))
        for x, _, lo, hi in drawn:
            _interval(ax, x, lo, hi, "y", capsize=2)
    ax.set_xticks(range(len(groups)), [wrap(g, 14) for g in groups])
    ax.axhline(0, color="#444444", linewidth=0.8)
    _legend(ax)
    return fig


def _keep_x_open(ax: Axes, xs: Sequence[float]) -> None:
    """A single distinct x would give a degenerate axis (800 to 801 for one step): centre it on a
    range half its size either side instead."""
    if xs and min(xs) == max(xs):
        pad = max(abs(xs[0]) * 0.5, 1.0)
        ax.set_xlim(xs[0] - pad, xs[0] + pad)


def line_chart(title: str, series: Sequence[tuple[str, Sequence[float], Sequence[float]]], st: Mapping[str, Style],
               xlabel: str = "step", ylabel: str = "", log_y: bool = False,
               hlines: Sequence[tuple[float, str]] = ()) -> Figure | None:
    """Lines over x, series = (name, xs, ys); points without finite x and y are skipped, and a series
    left with one point is drawn as a marker. `log_y`: a log y axis (points with y <= 0 are skipped
    too); `hlines`: dashed reference lines (y, its legend label)."""
    keep = (lambda x, y: finite(x, y) and y > 0) if log_y else finite
    clean = [(name, [(x, y) for x, y in zip(xs, ys, strict=False) if keep(x, y)]) for name, xs, ys in series]
    clean = [(name, pts) for name, pts in clean if pts]
    if not clean:
        return None
    fig, ax = _figure(title, 3.0)
    if log_y:
        ax.set_yscale("log")
    for name, pts in clean:
        s, label = _style(st, name), wrap(name, LABEL_CHARS)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if len(pts) == 1:
            ax.plot(xs, ys, linestyle="none", marker=s.marker, markersize=7, color=s.color, label=label)
        else:
            ax.plot(xs, ys, color=s.color, linewidth=1.5, marker=s.marker, markersize=4,
                    markevery=max(1, len(pts) // 6), label=label)
    all_x = [x for _, pts in clean for x, _ in pts]
    _keep_x_open(ax, all_x)
    if all(float(x).is_integer() for x in all_x):
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.set_xlabel(xlabel, fontsize=FONT)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=FONT)
    for y, label in hlines:
        ax.axhline(y, color="#888888", linestyle="--", linewidth=1, label=wrap(label, LABEL_CHARS), zorder=1)
    _legend(ax)
    return fig


def scatter_chart(title: str, points: Sequence[Point], st: Mapping[str, Style], xlabel: str, ylabel: str,
                  curve: Sequence[str] = ()) -> Figure | None:
    """Points with interval error bars on both axes; the points named in `curve` are joined in that
    order by a dashed line (a trade-off curve). A point without a finite x and y is listed as n/a in
    the legend."""
    drawn = {label: (x, y) for label, x, y in points if finite(x[0], y[0])}
    if not drawn:
        return None
    fig, ax = _figure(title, 3.6)
    line = [drawn[n] for n in curve if n in drawn]
    if len(line) > 1:
        ax.plot([x[0] for x, _ in line], [y[0] for _, y in line], color="#888888", linestyle="--", linewidth=1,
                zorder=1)
    handles = []  # the legend in the order of `points`, n/a ones included
    for label, (x, xlo, xhi), (y, ylo, yhi) in points:
        s = _style(st, label)
        if label not in drawn:
            handles += ax.plot([], [], linestyle="none", marker=s.marker, color=s.color,
                               label=f"{wrap(label, LABEL_CHARS)} (n/a)")
            continue
        _interval(ax, y, xlo, xhi, "x", s.color)
        _interval(ax, x, ylo, yhi, "y", s.color)
        handles += ax.plot(x, y, linestyle="none", marker=s.marker, markersize=6, color=s.color,
                           label=wrap(label, LABEL_CHARS), zorder=4)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(wrap(ylabel, 40), fontsize=FONT)
    ax.margins(0.08)
    _legend(ax, handles)
    return fig


def to_svg(fig: Figure | None) -> str:
    """The figure as an inline SVG element (no XML prolog), titled for screen readers; "" for None.
    The same figure gives the same bytes."""
    if fig is None:
        return ""
    buf = io.StringIO()
    with matplotlib.rc_context(SVG_RC):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    title = escape(fig.get_label(), quote=True)
    # the <svg ...> opening tag: add the role and a <title> as its first child
    return re.sub(r"<svg\b([^>]*)>", lambda m: f'<svg{m.group(1)} role="img" aria-label="{title}"><title>{title}'
                  "</title>", svg, count=1)
