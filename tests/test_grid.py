"""The Table-2 grid: cell figures from an evaluation, means and t-intervals over seeds, paired differences."""

import csv
import io

import pytest
from scipy import stats

from evaluation.grid import (
    METRICS,
    Cell,
    CellRecord,
    build_table,
    cell_record,
    format_table,
    model_figures,
    objective_label,
    table_csv,
    write_grid_report,
)


def _result(models: dict[str, dict[str, float]]) -> dict:
    """An evaluate() result shaped like metrics.json: per-model metrics, and the probe's families."""
    fams = {f: {"words": ["w"], "models": {n: {"value": v[f"probe_{f}"]} for n, v in models.items()
                                           if f"probe_{f}" in v}}
            for f in ("color", "shape", "texture", "spatial")}
    return {"models": {n: {"metrics": {m: {"value": v[m]} for m in ("cos_image", "r1") if m in v}}
                       for n, v in models.items()},
            "probe": {"families": fams}}


def _rec(obj: str, seed: int, cos: float, color: float, lam: float | None = None, row: str = "world-300",
         status: str = "done") -> CellRecord:
    cell = Cell(row, "teacher", obj, lam, seed)
    if status != "done":
        return CellRecord(cell, status, reason="RuntimeError: out of memory")
    return CellRecord(cell, "done", {"cos_image": cos, "probe_color": color, "r1": None},
                      {"ridge": {"cos_image": 0.5}})


def test_a_cell_reads_its_own_prior_and_the_baselines_from_the_evaluation():
    cell = Cell("world-300", "teacher", "eclipse", 0.2, 1)
    assert cell.name == "eclipse-0.2-s1" and cell.column == "eclipse-0.2" and cell.row == "world-300__teacher"
    result = _result({"eclipse-0.2-s1": {"cos_image": 0.9, "r1": 0.4, "probe_color": 0.8},
                      "ridge": {"cos_image": 0.7, "r1": 0.5}, "mean-image": {"cos_image": 0.6}})
    rec = cell_record(cell, result)
    assert rec.values["cos_image"] == 0.9 and rec.values["probe_color"] == 0.8 and rec.values["probe_shape"] is None
    assert set(rec.baselines) == {"ridge", "mean-image"} and rec.baselines["ridge"]["r1"] == 0.5
    assert set(model_figures(result, "ridge")) == set(METRICS)
    with pytest.raises(KeyError, match="eclipse-0.2-s1"):
        cell_record(cell, _result({"other": {"cos_image": 0.1}}))
    with pytest.raises(ValueError, match="unknown objective"):
        objective_label("ddpm")


def test_means_intervals_and_paired_differences_are_computed_over_seeds():
    proj = [0.80, 0.82, 0.78]
    ecl = [0.85, 0.88, 0.86]
    records = [_rec("projection", s, c, 0.6 + s / 100) for s, c in enumerate(proj)]
    records += [_rec("eclipse", s, c, 0.7, lam=0.2) for s, c in enumerate(ecl)]
    table = build_table(records)
    assert table["columns"] == ["projection", "eclipse-0.2"]
    (row,) = table["rows"]
    cos = row["cells"]["projection"]["cos_image"]
    assert cos["mean"] == pytest.approx(0.80) and cos["n"] == 3
    lo, hi = stats.t.interval(0.95, 2, loc=0.80, scale=stats.sem(proj))
    assert cos["ci"] == pytest.approx([lo, hi])
    assert row["cells"]["projection"]["r1"] == {"mean": None, "ci": None, "n": 0, "seeds": [None] * 3}
    (diff,) = [p for p in row["paired"] if p["metric"] == "cos_image"]
    d = [e - p for e, p in zip(ecl, proj, strict=True)]
    assert (diff["a"], diff["b"]) == ("eclipse-0.2", "projection") and diff["per_seed"] == pytest.approx(d)
    assert diff["ci"] == pytest.approx(list(stats.t.interval(0.95, 2, loc=sum(d) / 3, scale=stats.sem(d))))
    assert diff["verdict"] == "a > b"  # +0.063 with every seed above 0.04
    color = next(p for p in row["paired"] if p["metric"] == "probe_color")
    assert color["mean"] == pytest.approx(0.09) and color["verdict"] == "a > b"
    assert row["cells"]["eclipse-0.2"]["probe_color"]["ci"] == [0.7, 0.7]  # equal seeds: no NaN interval
    assert row["baselines"] == {"ridge": {"cos_image": 0.5}}


def test_a_failed_cell_stays_in_the_table_with_its_reason_and_leaves_its_pairs_out():
    records = [_rec("projection", 0, 0.8, 0.6), _rec("projection", 1, 0.8, 0.6),
               _rec("eclipse", 0, 0.9, 0.7, lam=0.2), _rec("eclipse", 1, 0.0, 0.0, lam=0.2, status="failed"),
               _rec("diffusion", 0, 0.0, 0.0, status="failed")]
    (row,) = build_table(records)["rows"]
    assert row["cells"]["eclipse-0.2"]["status"] == "partial" and row["cells"]["eclipse-0.2"]["seeds"] == [0]
    assert row["cells"]["diffusion"]["status"] == "failed" and row["cells"]["diffusion"]["cos_image"]["mean"] is None
    assert {(f["objective"], f["seed"]) for f in row["failed"]} == {("eclipse-0.2", 1), ("diffusion", 0)}
    assert all(f["reason"] == "RuntimeError: out of memory" for f in row["failed"])
    pairs = {(p["a"], p["b"], p["metric"]): p for p in row["paired"]}
    assert pairs[("eclipse-0.2", "projection", "cos_image")]["seeds"] == [0]  # seed 1's eclipse failed
    assert pairs[("eclipse-0.2", "projection", "cos_image")]["ci"] is None  # one seed: no interval
    assert not any(b == "diffusion" for _, b, _ in pairs)
    text = format_table(build_table(records))
    assert "FAILED diffusion seed 0: RuntimeError: out of memory" in text


def test_every_cell_is_one_entry_however_often_its_record_comes():
    twice = [_rec("projection", 0, 0.5, 0.5), _rec("projection", 0, 0.7, 0.5), _rec("projection", 1, 0.9, 0.5)]
    (row,) = build_table(twice)["rows"]
    assert row["cells"]["projection"]["cos_image"]["seeds"] == [0.7, 0.9]  # the last record of seed 0 wins


def test_the_csv_is_one_line_per_row_column_and_metric(tmp_path):
    records = [_rec("projection", s, 0.8, 0.6) for s in range(2)] + [_rec("eclipse", s, 0.9, 0.7, lam=2.0)
                                                                      for s in range(2)]
    records += [_rec("projection", 0, 0.7, 0.6, row="world-600")]
    table = build_table(records)
    rows = list(csv.DictReader(io.StringIO(table_csv(table))))
    cells = [r for r in rows if " - " not in r["objective"]]
    assert len(cells) == 2 * 2 * len(METRICS)  # every row has every column
    assert {r["status"] for r in cells if r["dataset"] == "world-600" and r["objective"] == "eclipse-2"} == {"missing"}
    first = next(r for r in cells if r["dataset"] == "world-300" and r["objective"] == "eclipse-2"
                 and r["metric"] == "cos_image")
    assert float(first["mean"]) == pytest.approx(0.9) and first["seeds"] == "2" and first["status"] == "done"
    assert any(r["objective"] == "eclipse-2 - projection" and r["status"] == "a > b" for r in rows)
    page = write_grid_report(tmp_path / "report.html", table, notes="two rows").read_text()
    assert "world-300 × teacher" in page and "world-600 × teacher" in page and "eclipse-2 − projection" in page


@pytest.mark.slow
def test_the_grid_page_fits_a_1400px_browser_window(tmp_path):
    import json

    from test_report import MEASURE, WIDTH, browse, chromium

    exe = chromium()
    records = []
    for row in ("world-1500", "world-12000"):
        for obj, lam in (("projection", None), ("eclipse", 0.2), ("eclipse", 20.0), ("diffusion", None)):
            for s in range(3):
                rec = _rec(obj, s, 0.9 + s / 1000, 0.7 - s / 1000, lam=lam, row=row)
                rec.values.update({"probe_shape": 0.61, "probe_texture": 0.55, "probe_spatial": 0.52, "r1": 0.4})
                rec.baselines = {b: dict.fromkeys(METRICS, 0.5) for b in ("TextEmb", "text-shift", "ridge",
                                                                          "mean-image")}
                records.append(rec)
    long = "StoreError: " + "a long reason that names the store, the shard and what to do about it " * 5
    records[-1] = CellRecord(records[-1].cell, "failed", reason=long)
    page = write_grid_report(tmp_path / "report.html", build_table(records), notes="a rehearsal")
    html = page.read_text(encoding="utf-8")
    page.write_text(html.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = browse(exe, page, "--dump-dom").stdout
    m = json.loads(dom.split('<pre id="measure">', 1)[1].split("</pre>", 1)[0].replace("&amp;", "&"))
    assert m["scrollWidth"] <= WIDTH and m["scrolls"] == []  # nothing clipped or scrolled sideways
    assert len(m["tables"]) == html.count("<table") == 4 and max(m["tables"]) <= WIDTH
