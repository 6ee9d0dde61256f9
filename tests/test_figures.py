"""The report's charts: what each builder draws (read back from the matplotlib figure), and the SVG."""

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib.collections import LineCollection
from matplotlib.colors import to_hex
from matplotlib.patches import Rectangle

from evaluation.figures import (
    PALETTE,
    TITLE_CHARS,
    bar_chart,
    grouped_bar_chart,
    line_chart,
    scatter_chart,
    styles,
    to_svg,
)

SVG = "{http://www.w3.org/2000/svg}"


def bars(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def intervals(ax) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The error-bar segments drawn, each ((x0, y0), (x1, y1))."""
    segs = [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    return [tuple(map(tuple, np.round(s, 9))) for s in segs]


def test_every_name_gets_its_own_style_even_past_the_palette():
    names = [f"run{i}" for i in range(25)]
    st = styles(names)
    assert [st[f"run{i}"].color for i in range(10)] == list(PALETTE)  # tab10, in order
    assert len({(s.color, s.marker, s.hatch) for s in st.values()}) == 25
    assert st["run10"].color == st["run0"].color and st["run10"].marker != st["run0"].marker
    assert styles(["a", "b", "a"]) == styles(["a", "b"])


def test_bar_chart_draws_values_and_intervals_and_says_na():
    st = styles(["a", "b", "c"])
    fig = bar_chart("cos", [("a", 0.5, 0.4, 0.6), ("b", -0.2, -0.3, -0.1), ("c", None, None, None),
                            ("d", math.nan, None, None)], st, note="better: higher")
    ax = fig.axes[0]
    drawn = bars(ax)
    assert [(b.get_x(), b.get_width()) for b in drawn] == [(0, 0.5), (0, -0.2)]  # from zero; n/a draws none
    assert [to_hex(b.get_facecolor()) for b in drawn] == [st["a"].color, st["b"].color]
    assert sorted(intervals(ax)) == [((-0.3, 1.0), (-0.1, 1.0)), ((0.4, 0.0), (0.6, 0.0))]
    assert [t.get_text() for t in ax.texts] == ["n/a", "n/a"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c", "d"]
    lo, hi = ax.get_xlim()
    assert lo <= -0.3 and hi >= 0.6  # no bar or interval past the axis
    assert bar_chart("empty", [("a", None, None, None)], st) is None


def test_an_interval_that_misses_its_value_is_drawn_as_it_is():
    # a bootstrap interval of a biased statistic (the Fréchet distance) may lie beside the estimate
    fig = bar_chart("fd", [("a", 5.0, 5.5, 7.0)], styles(["a"]))
    assert intervals(fig.axes[0]) == [((5.5, 0.0), (7.0, 0.0))]


def test_a_long_title_wraps_and_fits_the_figure():
    title = "cos_image_minus_baseline: " + "a description of the metric that goes on and on " * 4
    fig = bar_chart(title, [("a", 0.5, 0.4, 0.6)], styles(["a"]))
    text = fig.axes[0].title
    assert text.get_text().replace("\n", " ") == title.strip()
    assert all(len(line) <= TITLE_CHARS for line in text.get_text().splitlines())
    fig.draw_without_rendering()
    assert text.get_window_extent().width <= fig.bbox.width


def test_grouped_bars_one_per_finite_value_with_their_intervals():
    st = styles(["p", "q"])
    fig = grouped_bar_chart("swap", ["color", "shape"], [("p", [(0.7, 0.6, 0.8), (None, None, None)]),
                                                         ("q", [(0.5, 0.4, 0.6), (0.4, 0.3, 0.5)])], st)
    ax = fig.axes[0]
    heights = sorted((round(b.get_x() + b.get_width() / 2, 6), b.get_height()) for b in bars(ax))
    assert heights == [(-0.2, 0.7), (0.2, 0.5), (1.2, 0.4)]
    assert sorted(intervals(ax)) == [((-0.2, 0.6), (-0.2, 0.8)), ((0.2, 0.4), (0.2, 0.6)), ((1.2, 0.3), (1.2, 0.5))]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["p", "q"]


def test_a_one_point_series_is_a_marker_on_an_open_axis():
    st = styles(["run", "other"])
    fig = line_chart("held-out loss", [("run", [800], [0.5]), ("other", [800], [0.7])], st)
    ax = fig.axes[0]
    assert [(line.get_linestyle(), line.get_marker()) for line in ax.lines] == [("None", "o"), ("None", "o")]
    assert [to_hex(line.get_color()) for line in ax.lines] == [st["run"].color, st["other"].color]
    lo, hi = ax.get_xlim()
    assert (lo, hi) == (400, 1200)  # not a 799-801 axis


def test_line_chart_skips_non_finite_points():
    fig = line_chart("loss", [("run", [1, 2, 3], [3.0, math.nan, 1.0]), ("none", [], [])], styles(["run"]))
    (line,) = fig.axes[0].lines
    assert line.get_linestyle() == "-" and list(line.get_xdata()) == [1, 3]
    assert line_chart("empty", [("run", [], [])], {}) is None


def test_a_log_line_chart_skips_non_positive_points_and_draws_its_reference_lines():
    fig = line_chart("ratio", [("run", [1, 2, 3, 4], [0.001, 0.0, -1.0, 0.5]), ("zero", [1], [0.0])], styles(["run"]),
                     log_y=True, hlines=((0.01, "floor"), (10.0, "ceiling")))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    run, floor, ceiling = ax.lines
    assert list(run.get_xdata()) == [1, 4] and list(run.get_ydata()) == [0.001, 0.5]  # "zero" has no point left
    assert floor.get_label() == "floor" and floor.get_linestyle() == "--" and list(floor.get_ydata()) == [0.01, 0.01]
    assert list(ceiling.get_ydata()) == [10.0, 10.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["run", "floor", "ceiling"]
    assert line_chart("ratio", [("run", [1], [0.0])], {}, log_y=True) is None
    assert line_chart("loss", [("run", [1, 2], [0.0, 1.0])], {}).axes[0].get_yscale() == "linear"


def test_scatter_points_intervals_curve_and_na_legend():
    st = styles(["λ=0", "λ=0.2", "λ=2"])
    fig = scatter_chart("trade-off", [
        ("λ=0", (0.9, 0.88, 0.92), (0.5, 0.4, 0.6)),
        ("λ=0.2", (0.8, 0.79, 0.81), (0.7, None, None)),  # no y interval: no vertical bar
        ("λ=2", (None, None, None), (0.9, 0.8, 1.0)),  # no x: in the legend only
    ], st, "cos", "R@1", curve=["λ=0", "λ=0.2", "λ=2"])
    ax = fig.axes[0]
    (curve,) = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert list(curve.get_xdata()) == [0.9, 0.8]  # joins the drawn points, in the curve's order
    points = [line for line in ax.lines if not line.get_label().startswith("_")]  # not error-bar caps
    assert [(list(p.get_xdata()), list(p.get_ydata())) for p in points] == [([0.9], [0.5]), ([0.8], [0.7]), ([], [])]
    assert sorted(intervals(ax)) == [((0.79, 0.7), (0.81, 0.7)), ((0.88, 0.5), (0.92, 0.5)), ((0.9, 0.4), (0.9, 0.6))]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["λ=0", "λ=0.2", "λ=2 (n/a)"]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 < 0.79 and x1 > 0.92 and y0 < 0.4 and y1 > 0.7  # every point and interval inside the axes
    assert scatter_chart("empty", [("a", (None, None, None), (None, None, None))], st, "x", "y") is None


def test_tick_labels_of_a_narrow_range_do_not_overlap():
    # The demo's two λ points differ in the fourth decimal: labels such as 0.918875 are long.
    st = styles(["λ=0", "λ=0.2"])
    fig = scatter_chart("narrow", [("λ=0", (0.918862, None, None), (0.0716, None, None)),
                                   ("λ=0.2", (0.919025, None, None), (0.0692, None, None))], st, "cos", "R@1")
    fig.draw_without_rendering()
    boxes = sorted((b.x0, b.x1) for b in (t.get_window_extent() for t in fig.axes[0].get_xticklabels()
                                          if t.get_text()))
    assert len(boxes) >= 2
    gap = fig.axes[0].get_xticklabels()[0].get_window_extent().height  # about two characters: labels read apart
    assert all(next_left - right >= gap for (_, right), (next_left, _) in zip(boxes, boxes[1:], strict=False)), boxes


@pytest.mark.parametrize("n", [3, 12])
def test_legends_sit_outside_the_plot(n):
    names = [f"a-rather-long-model-name-{i}" for i in range(n)]
    fig = line_chart("loss", [(name, [0, 1], [i, i + 1]) for i, name in enumerate(names)], styles(names))
    fig.draw_without_rendering()
    ax = fig.axes[0]
    legend = fig.legends[0] if fig.legends else ax.get_legend()
    assert len(legend.get_texts()) == n
    plot, box = ax.get_window_extent(), legend.get_window_extent()
    assert not plot.overlaps(box)


def test_svg_is_inline_titled_and_deterministic():
    def draw():
        return to_svg(bar_chart("cos & <more>", [("a", 0.5, 0.4, 0.6)], styles(["a"])))

    svg = draw()
    assert svg.startswith("<svg") and svg == draw()  # no XML prolog; the same bytes twice
    root = ET.fromstring(svg)
    assert root.get("role") == "img" and root.get("aria-label") == "cos & <more>"
    assert root.find(f"{SVG}title").text == "cos & <more>"
    assert "Date" not in svg and to_svg(None) == ""
