"""The HTML report: self-contained, its plots are well-formed SVG, its images are embedded and decodable."""

import base64
import io
import math
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from storefixtures import random_rows, tiny_info

from evaluation.evaluate import evaluate
from evaluation.report import image_data_uri, svg_bars, svg_grouped_bars, svg_lines, svg_scatter, write_report
from storage_schema import StoreWriter, build_table
from training.prior import build_prior

NASTY = '<script>alert("x")</script> & a red square'


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.tags: list[str] = []
        self.refs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A small random store (storage_schema's writer), one image per row in a folder named by key."""
    root = tmp_path_factory.mktemp("report")
    info = tiny_info(dim=16, hidden=16)
    writer = StoreWriter(root / "store", info)
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for s in range(2):
        rows = random_rows(60, info, seed=s, prefix=f"s{s}-")
        rows["captions"][0] = NASTY  # must come out escaped
        writer.write_shard(f"{s:05d}", build_table(info, **rows))
        for k in rows["keys"]:
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "images" / f"{k}.png")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build_prior("tiny", embedding_dim=16).save_pretrained(root / "prior")
    out = root / "out"
    res = evaluate([root / "prior"], root / "store", out, heldout_fraction=0.5, seeds=3, n_boot=100,
                   prompt_suite=True, image_source=root / "images", n_examples=60, device="cpu")
    return res, out


def test_report_is_self_contained_and_embeds_its_images(evaluated):
    res, out = evaluated
    html = (out / "report.html").read_text(encoding="utf-8")
    p = Collect()
    p.feed(html)
    assert p.imgs, "example images should be embedded"
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert im.format == "PNG" and min(im.size) > 0
    assert not [r for r in p.refs if not r.startswith("data:")], "nothing may be fetched from elsewhere"
    assert "<script>" not in html and "&lt;script&gt;" in html  # captions are escaped
    assert p.tags.count("svg") >= 5 and "table" in p.tags
    text = " ".join(p.text)
    for section in ("Embedding metrics on the held-out split", "TextEmb", "text-shift", "mean-image", "ridge",
                    "Paired differences", "Examples"):
        assert section in text
    # the store's encoder ("test-enc") cannot be loaded: the suite is skipped, and the report says why
    assert "skipped" in res["prompts"] and "test-enc" in res["prompts"]["skipped"]
    assert "Prompt suites" in text and "unavailable" in text
    assert "skipped" in res["probe"]  # random captions: no attribute word to probe


def test_every_svg_is_well_formed(evaluated):
    _, out = evaluated
    html = (out / "report.html").read_text(encoding="utf-8")
    svgs = [s.split("</svg>")[0] + "</svg>" for s in html.split("<svg")[1:]]
    assert svgs
    for body in svgs:
        root = ET.fromstring("<svg" + body)
        assert root.tag.endswith("svg") and root.find("{http://www.w3.org/2000/svg}text") is not None


def test_chart_helpers():
    bars = ET.fromstring(svg_bars("cos", [("a", 0.5, 0.4, 0.6, "#123456"), ("b", -0.2, -0.3, -0.1, "#654321"),
                                          ("c", None, None, None, "#000000"), ("d", math.nan, None, None, "#000")]))
    rects = bars.findall("{http://www.w3.org/2000/svg}rect")
    assert len(rects) == 2  # n/a values draw no bar
    assert "a: 0.5 [0.4, 0.6]" in rects[0].find("{http://www.w3.org/2000/svg}title").text
    grouped = ET.fromstring(svg_grouped_bars("swap", ["color", "shape"], [
        ("p", "#111111", [(0.7, 0.6, 0.8), (None, None, None)]), ("q", "#222222", [(0.5, 0.4, 0.6), (0.4, 0.3, 0.5)])]))
    assert len(grouped.findall("{http://www.w3.org/2000/svg}rect")) == 3 + 2  # bars + legend swatches
    lines = ET.fromstring(svg_lines("loss", [("run", "#111111", [1, 2, 3], [3.0, math.nan, 1.0])]))
    assert lines.find("{http://www.w3.org/2000/svg}polyline").get("points").count(",") == 2
    assert svg_lines("empty", [("run", "#111111", [], [])]) == ""
    uri = image_data_uri(Image.new("RGB", (1000, 500), (255, 0, 0)), max_side=100)
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (100, 50)


def test_write_report_renders_a_result_again(evaluated, tmp_path):
    res, _ = evaluated
    path = write_report(res, tmp_path / "r.html", images={})
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "no image" in html  # examples without their images


def test_scatter_draws_points_whiskers_and_the_curve():
    svg = ET.fromstring(svg_scatter("trade-off", [
        ("λ=0", "#111111", (0.9, 0.88, 0.92), (0.5, 0.4, 0.6)),
        ("λ=0.2", "#222222", (0.8, 0.79, 0.81), (0.7, None, None)),  # no y interval: no vertical whisker
        ("λ=2", "#333333", (None, None, None), (0.9, 0.8, 1.0)),  # no x: legend only
    ], "cos", "R@1", curve=["λ=0", "λ=0.2", "λ=2"]))
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f"{ns}circle")) == 2
    whiskers = [line for g in svg.findall(f"{ns}g") for line in g.findall(f"{ns}line")]
    assert len(whiskers) == 3  # x and y for the first point, x for the second
    assert svg.find(f"{ns}polyline").get("points").count(",") == 2  # the curve joins the drawn points
    assert any("(n/a)" in (t.text or "") for t in svg.findall(f"{ns}text"))
    assert svg_scatter("empty", [("a", "#000", (None, None, None), (None, None, None))], "x", "y") == ""


def test_scatter_keeps_every_point_and_whisker_inside_the_axes():
    # the demo's figures: a prior past the last "nice" tick (0.932 > 0.9) and a baseline high above the rest
    width, height, left, right, top, bottom = 560, 340, 56, 170, 28, 44
    svg = ET.fromstring(svg_scatter("trade-off", [
        ("projection", "#111111", (0.932, 0.929, 0.935), (0.358, 0.281, 0.436)),
        ("diffusion", "#222222", (0.890, 0.871, 0.909), (0.313, 0.235, 0.392)),
        ("TextEmb", "#333333", (0.612, None, None), (0.727, None, None)),
    ], "cos", "R@1", width=width, height=height))
    ns = "{http://www.w3.org/2000/svg}"
    xs = [float(c.get("cx")) for c in svg.findall(f"{ns}circle")]
    ys = [float(c.get("cy")) for c in svg.findall(f"{ns}circle")]
    for g in svg.findall(f"{ns}g"):
        for line in g.findall(f"{ns}line"):
            xs += [float(line.get("x1")), float(line.get("x2"))]
            ys += [float(line.get("y1")), float(line.get("y2"))]
    assert len(xs) > 3 and all(left - 0.01 <= x <= width - right + 0.01 for x in xs)
    assert all(top - 0.01 <= y <= height - bottom + 0.01 for y in ys)
