"""The paper's Table 2 as data: a grid of (dataset, decoder) rows × objective columns, seeds per cell.

A *cell* is one trained prior: (dataset, decoder, objective, seed). Its record (written by the
reproduce flow once its training and evaluation finished, or failed) holds the figures read off its
`evaluate` result: the attribute-probe AUC per family (color, shape, texture, spatial: the
T2I-CompBench categories an embedding-level probe can score) and the cosine to the real image, plus
the baselines of the same evaluation. `build_table` folds the records into one table: per row and
objective the mean over seeds with a t-interval, and the paired differences eclipse − projection and
eclipse − diffusion (seed s against seed s), read as the demo reads them (an effect only where the
interval excludes 0). Failed cells stay in the table with their reason.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evaluation import metrics as M
from storage_schema.atomic import atomic_write_text
from training.objectives import objective_type

FAMILIES = ("color", "shape", "texture", "spatial")
METRICS = tuple(f"probe_{f}" for f in FAMILIES) + ("cos_image", "r1")
METRIC_LABELS = {**{f"probe_{f}": f"{f} probe AUC" for f in FAMILIES}, "cos_image": "cos to real image",
                 "r1": "R@1 (image retrieval)", "caption_r1": "caption R@1 (prototypes)"}
BASELINES = ("TextEmb", "text-shift", "ridge", "mean-image")
MIN_EFFECT = M.MIN_EFFECT  # the smallest paired difference the table calls an effect


def objective_label(objective: str, lam: float | None = None) -> str:
    """A column name: an objective with a swept value carries it (`eclipse-0.2`), the others their name."""
    return objective_type(objective).label(lam)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


@dataclass(frozen=True)
class Cell:
    dataset: str  # the row's dataset label (a preset, a url list's name, `world-1500`)
    decoder: str
    objective: str  # projection | eclipse | diffusion
    lam: float | None  # eclipse's λ; None for the others
    seed: int

    @property
    def column(self) -> str:
        return objective_label(self.objective, self.lam)

    @property
    def row(self) -> str:
        return f"{_slug(self.dataset)}__{_slug(self.decoder)}"

    @property
    def name(self) -> str:
        """The run folder's name, which is also the prior's name in its evaluation."""
        return f"{self.column}-s{self.seed}"


@dataclass
class CellRecord:
    cell: Cell
    status: str  # "done" | "failed"
    values: dict[str, float | None] = field(default_factory=dict)
    baselines: dict[str, dict[str, float | None]] = field(default_factory=dict)
    reason: str | None = None  # why a failed cell failed


def _value(summary: Mapping | None) -> float | None:
    v = None if summary is None else summary.get("value")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def model_figures(result: Mapping, name: str) -> dict[str, float | None]:
    """The grid's figures of model `name` (a prior or a baseline) in one `evaluate` result (metrics.json)."""
    families = result.get("probe", {}).get("families", {})
    out = {f"probe_{f}": _value(families.get(f, {}).get("models", {}).get(name)) for f in FAMILIES}
    model = result.get("models", {}).get(name, {})
    for m in ("cos_image", "r1"):
        out[m] = _value(model.get("metrics", {}).get(m))
    return out


def cell_record(cell: Cell, result: Mapping) -> CellRecord:
    """A finished cell's record from its evaluation (which names the prior after its run folder)."""
    if cell.name not in result.get("models", {}):
        raise KeyError(f"the evaluation of cell {cell.name} has no model of that name "
                       f"(models: {sorted(result.get('models', {}))})")
    baselines = {b: model_figures(result, b) for b in BASELINES if b in result.get("models", {})}
    return CellRecord(cell, "done", model_figures(result, cell.name), baselines)


def _pairs(columns: Sequence[str]) -> list[tuple[str, str]]:
    eclipses = [c for c in columns if c.startswith("eclipse-")]
    return [(e, b) for e in eclipses for b in ("projection", "diffusion") if b in columns]


def build_table(records: Iterable[CellRecord], metrics: Sequence[str] = METRICS) -> dict:
    """Rows dataset × decoder, columns objectives; means over seeds with t-intervals and paired differences.

    Every cell appears once, whatever order or how many times its record was given (the last wins).
    """
    cells: dict[Cell, CellRecord] = {}
    for r in records:
        cells[r.cell] = r
    columns: list[str] = []
    rows: dict[tuple[str, str], dict] = {}
    for cell, rec in cells.items():
        if cell.column not in columns:
            columns.append(cell.column)
        row = rows.setdefault((cell.dataset, cell.decoder), {"dataset": cell.dataset, "decoder": cell.decoder,
                                                              "records": {}})
        row["records"].setdefault(cell.column, {})[cell.seed] = rec
    order = {c: i for i, c in enumerate(("projection",))}
    columns.sort(key=lambda c: (order.get(c, 1 if c.startswith("eclipse-") else 2), c))
    out_rows = []
    for (dataset, decoder), row in rows.items():
        out_cells, failed = {}, []
        seeds_of: dict[str, dict[int, CellRecord]] = row["records"]
        for col in columns:
            by_seed = dict(sorted(seeds_of.get(col, {}).items()))
            done = {s: r for s, r in by_seed.items() if r.status == "done"}
            failed += [{"objective": col, "seed": s, "reason": r.reason} for s, r in by_seed.items()
                       if r.status != "done"]
            out_cells[col] = {"status": _status(len(done), len(by_seed)), "seeds": list(done),
                              **{m: M.over_seeds([r.values.get(m) for r in done.values()]) for m in metrics}}
        baselines = next((r.baselines for col in columns for r in seeds_of.get(col, {}).values()
                          if r.status == "done" and r.baselines), {})
        paired = []
        for a, b in _pairs(columns):
            ra, rb = seeds_of.get(a, {}), seeds_of.get(b, {})
            common = sorted(s for s in ra if s in rb and ra[s].status == rb[s].status == "done")
            for m in metrics:
                per_seed = [ra[s].values.get(m) for s in common], [rb[s].values.get(m) for s in common]
                diffs = [x - y for x, y in zip(*per_seed, strict=True) if x is not None and y is not None]
                if not diffs:
                    continue
                ci = M.t_interval(diffs)
                paired.append({"a": a, "b": b, "metric": m, "seeds": common, "per_seed": diffs,
                               "mean": float(np.mean(diffs)), "ci": ci, "verdict": M.verdict(ci, MIN_EFFECT)})
        out_rows.append({"dataset": dataset, "decoder": decoder, "cells": out_cells, "baselines": baselines,
                         "paired": paired, "failed": failed})
    return {"metrics": list(metrics), "metric_labels": {m: METRIC_LABELS.get(m, m) for m in metrics},
            "columns": columns, "rows": out_rows}


def _status(done: int, total: int) -> str:
    if total == 0:
        return "missing"
    return "done" if done == total else ("failed" if done == 0 else "partial")


def table_csv(table: Mapping) -> str:
    """Long format, one line per (row, column, metric): what pandas and spreadsheets read directly."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "decoder", "objective", "metric", "mean", "ci_low", "ci_high", "seeds", "status"])
    for row in table["rows"]:
        for col, cell in row["cells"].items():
            for m in table["metrics"]:
                s = cell[m]
                lo, hi = s["ci"] if s["ci"] else ("", "")
                w.writerow([row["dataset"], row["decoder"], col, m, "" if s["mean"] is None else f"{s['mean']:.6g}",
                            lo if lo == "" else f"{lo:.6g}", hi if hi == "" else f"{hi:.6g}", s["n"], cell["status"]])
        for p in row["paired"]:
            lo, hi = p["ci"] if p["ci"] else ("", "")
            w.writerow([row["dataset"], row["decoder"], f"{p['a']} - {p['b']}", p["metric"], f"{p['mean']:.6g}",
                        lo if lo == "" else f"{lo:.6g}", hi if hi == "" else f"{hi:.6g}", len(p["per_seed"]),
                        p["verdict"]])
    return buf.getvalue()


def _f(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _ci(ci: Sequence[float] | None, signed: bool = False) -> str:
    return f"[{_f(ci[0], signed)}, {_f(ci[1], signed)}]" if ci else "(1 seed)"


def format_table(table: Mapping) -> str:
    """The table for a terminal: one block per row, objectives across, then the paired differences."""
    lines = []
    metrics, columns = table["metrics"], table["columns"]
    for row in table["rows"]:
        lines.append(f"{row['dataset']} × {row['decoder']}")
        lines.append(f"  {'metric':<24}" + "".join(f"{c:>26}" for c in columns))
        for m in metrics:
            cells = []
            for c in columns:
                s = row["cells"][c][m]
                cells.append(f"{_f(s['mean'])} {_ci(s['ci'])}" if s["mean"] is not None else row["cells"][c]["status"])
            lines.append(f"  {table['metric_labels'][m]:<24}" + "".join(f"{x:>26}" for x in cells))
        for f in row["failed"]:
            lines.append(f"  FAILED {f['objective']} seed {f['seed']}: {f['reason']}")
        for p in row["paired"]:
            lines.append(f"  {p['a']} − {p['b']:<12} {table['metric_labels'][p['metric']]:<24} "
                         f"{_f(p['mean'], True)} {_ci(p['ci'], True)}  {p['verdict']}")
        lines.append("")
    return "\n".join(lines)


def grid_context(table: Mapping, notes: str = "") -> dict:
    """What the grid's page (evaluation/templates/grid.html) shows."""
    return {"rows": table["rows"], "columns": table["columns"], "metrics": table["metrics"],
            "labels": table["metric_labels"], "notes": notes, "f": _f, "ci": _ci, "min_effect": MIN_EFFECT}


def write_grid_report(path: str | os.PathLike, table: Mapping, notes: str = "") -> Path:
    """OUT/report.html: the table as one self-contained page."""
    from evaluation.report import environment

    path = Path(path)
    atomic_write_text(path, environment().get_template("grid.html").render(grid_context(table, notes)))
    return path
