"""Why do the demo's priors generalise worse to held-out compositions than ridge regression? (issue #16 §3)

One factor at a time from a baseline close to the demo's (1,500 held-in rows, 500 steps x batch 64, lr 1e-3,
the `demo` preset, the projection objective): data size, epochs (steps), capacity, dropout, and the text
hidden-state input. Every cell trains with the project's trainer (`training.trainer.train`) on the held-in
shards of a `world:N` store (`eclipse-prior reproduce --datasets world:1500 world:6000 ...` builds one under
OUT/world), under several training seeds, and is scored with the evaluation's own pieces
(`evaluation.predict.predict_heldout`, `evaluation.baselines`):

- caption R@1 as `demo.experiment.caption_retrieval` measures it (the nearest mean real image embedding among
  every caption description's prototype; checked against that function on one prior, `--no-check` skips it),
- cosine to the real image,
- the held-out rows' "snap rate": the share whose predicted prototype is a *held-in* composition (a prior
  that memorises compositions answers a new composition with a seen one),

on two row sets: held-in compositions (the key-hash held-out rows of every held-in shard: no cell trains on
them) and the held-out compositions (whole shards no prior reads). Ridge and TextEmb are fitted / scored on
the same rows, per training-row set. Each factor's level is compared with the baseline seed by seed (same
training seed); the interval is Student's t over seeds, and a difference is an effect only when its interval
excludes 0 by at least `--min-effect` (0.01; `evaluation.metrics.verdict`).

    python benchmarks/memorisation.py --world /tmp/memo-grid/world --out /tmp/memo-study --seeds 3

Prints a table and writes OUT/memorisation.json. Runs are kept under OUT/runs (a rerun skips finished ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from demo.world import description  # noqa: E402
from evaluation import metrics as M  # noqa: E402
from evaluation.baselines import Baselines, scan_training_split  # noqa: E402
from evaluation.predict import predict_heldout  # noqa: E402
from evaluation.priors import open_prior  # noqa: E402
from evaluation.split import Split  # noqa: E402
from storage_schema import CAPTION, IMAGE_EMBED, EmbeddingStore  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.trainer import train  # noqa: E402

HELDOUT_FRACTION = 0.1  # the demo's: 1 key-hash row in 10 of the held-in shards is never trained on
BASE = {"rows": 1500, "steps": 500, "preset": "demo", "num_layers": None, "dropout": 0.0, "text_hidden": True,
        "objective": "projection", "eclipse_lambda": None}
FACTORS: dict[str, list[tuple[str, dict]]] = {  # in the order they run
    "inputs": [("text embedding only (no hidden states)", {"text_hidden": False})],
    "data": [("3000 held-in rows", {"rows": 3000}), ("6000 held-in rows", {"rows": 6000})],
    "dropout": [("dropout 0.1", {"dropout": 0.1}), ("dropout 0.3", {"dropout": 0.3})],
    "capacity": [("tiny preset", {"preset": "tiny"}), ("demo, 1 layer", {"num_layers": 1}),
                 ("demo, 4 layers", {"num_layers": 4})],
    "epochs": [("100 steps", {"steps": 100}), ("250 steps", {"steps": 250}), ("1000 steps", {"steps": 1000}),
               ("2000 steps", {"steps": 2000})],
}
METRICS = ("heldin_r1", "heldout_r1", "gap_r1", "heldin_cos", "heldout_cos", "snap")


@dataclass
class Cell:
    factor: str
    label: str
    settings: dict
    runs: list[str] = field(default_factory=list)  # one run folder per training seed

    @property
    def key(self) -> str:
        s = self.settings
        parts = [f"rows{s['rows']}", f"steps{s['steps']}", s["preset"]]
        if s["num_layers"] is not None:
            parts.append(f"L{s['num_layers']}")
        if s["dropout"]:
            parts.append(f"drop{s['dropout']:g}")
        if not s["text_hidden"]:
            parts.append("nohidden")
        if s["objective"] != "projection":
            parts.append(f"{s['objective']}{s['eclipse_lambda']:g}")
        return "-".join(parts)


def world_layout(world: Path) -> tuple[EmbeddingStore, list[str], list[str], int]:
    """(store, held-in shards in order, held-out-composition shards, shard size) of a reproduce world folder."""
    state = json.loads((world / "demo_state.json").read_text())["params"]
    shard, sizes_max = int(state["shard_size"]), int(state["sizes_max"])
    st = EmbeddingStore(world / "data" / "store")  # flows.reproduce: the precompute of OUT/world/data
    n_in = sizes_max // shard
    return st, st.shards[:n_in], st.shards[n_in:], shard


def cells(factors: list[str], lam: float | None, scale: float = 1.0) -> list[Cell]:
    out = [Cell("baseline", "demo-like baseline", dict(BASE))]
    for f in factors:
        out += [Cell(f, label, {**BASE, **change}) for label, change in FACTORS[f]]
    if lam is not None:
        out.append(Cell("objective", f"eclipse λ {lam:g}", {**BASE, "objective": "eclipse", "eclipse_lambda": lam}))
    if scale != 1.0:  # a smaller study (a smoke run): every cell's rows and steps alike, the labels say so
        for c in out:
            c.label += f" (rows, steps x {scale:g})"
            rows, steps = c.settings["rows"], c.settings["steps"]
            c.settings |= {"rows": round(rows * scale), "steps": max(1, round(steps * scale))}
    return out


def train_cell(cell: Cell, st: EmbeddingStore, heldin: list[str], shard: int, seeds: int, out: Path,
               batch_size: int, lr: float, threads: int, part: tuple[int, int] = (0, 1), first: int = 0) -> None:
    """Train the cell's seeds (those of this `part` K/N of the study's runs, numbered from `first`)."""
    s = cell.settings
    n = s["rows"] // shard
    if n == 0:
        raise SystemExit(f"{cell.label}: {s['rows']} held-in rows are less than one shard of {shard}: use a larger "
                         f"--scale or a world with smaller shards")
    if n > len(heldin):
        raise SystemExit(f"{cell.label}: {s['rows']} held-in rows need {n} shards; the world has {len(heldin)} "
                         f"(build it with a larger world:N)")
    for seed in range(seeds):
        run = out / "runs" / f"{cell.key}-s{seed}"
        cell.runs.append(str(run))
        if (run / "prior" / "config.json").exists() or (first + seed) % part[1] != part[0]:
            continue
        if run.exists():  # a killed earlier attempt: start it over
            import shutil

            shutil.rmtree(run)
        t0 = time.perf_counter()
        cfg = TrainConfig(
            store=str(st.dir), out=str(run), objective=s["objective"], preset=s["preset"],
            embedding_dim=st.encoder.image_dim, text_length=st.encoder.context_length, shards=heldin[:n],
            steps=s["steps"], batch_size=batch_size, lr=lr, seed=seed, heldout_fraction=HELDOUT_FRACTION,
            eval_every=0, ckpt_every=s["steps"], keep_checkpoints=1, log_every=max(1, s["steps"] // 10),
            num_threads=threads, progress=False, num_layers=s["num_layers"], dropout=s["dropout"],
            text_hidden=s["text_hidden"], **({"eclipse_lambda": s["eclipse_lambda"]} if s["eclipse_lambda"] else {}),
        )
        train(cfg)
        print(f"  trained {run.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def prototypes(st: EmbeddingStore) -> tuple[list[str], np.ndarray]:
    """Every caption description and its prototype, the mean real image embedding (as caption_retrieval)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for b in st.iter_batches(4096, [CAPTION, IMAGE_EMBED]):
        for c, e in zip(b[CAPTION], b[IMAGE_EMBED].astype(np.float64), strict=True):
            k = description(str(c))
            sums[k] = sums.get(k, 0) + e
            counts[k] = counts.get(k, 0) + 1
    names = sorted(sums)
    return names, M.l2_normalize(np.stack([sums[c] / counts[c] for c in names]))


def descriptions_of(st: EmbeddingStore, shards: list[str]) -> set[str]:
    seen: set[str] = set()
    for b in st.iter_batches(4096, [CAPTION], shards=shards):
        seen.update(description(str(c)) for c in b[CAPTION])
    return seen


def score(preds: np.ndarray, image: np.ndarray, target: np.ndarray, protos: np.ndarray,
          seen_proto: np.ndarray) -> dict:
    """preds [S, N, D] (noise seeds) -> R@1, cosine to the real image and snap rate, each averaged over S."""
    preds = preds[None] if preds.ndim == 2 else preds
    nearest = np.stack([np.argmax(M.l2_normalize(p) @ protos.T, axis=1) for p in preds])
    cos = np.stack([M.rowwise_cosine(p, image) for p in preds])
    return {"r1": float((nearest == target[None]).mean()), "cos": float(cos.mean()),
            "snap": float(seen_proto[nearest].mean())}


def evaluate_cells(all_cells: list[Cell], st: EmbeddingStore, heldin: list[str], heldout: list[str], shard: int,
                   eval_seeds: int, check: bool) -> tuple[dict, dict]:
    """(per run: metrics, per training-row count: the baselines' metrics)."""
    names, protos = prototypes(st)
    index = {c: i for i, c in enumerate(names)}
    seen = descriptions_of(st, heldin)
    seen_proto = np.array([n in seen for n in names])
    max_rows = max(c.settings["rows"] for c in all_cells)
    heldin_eval = heldin[: max_rows // shard]  # every cell's held-in rows: key-hash rows no cell trains on
    handles = {r: open_prior(r, "cpu") for c in all_cells for r in c.runs}
    results: dict[str, dict] = {}
    baselines: dict[str, dict] = {}
    for split_name, split in (("heldin", Split(HELDOUT_FRACTION, 0, "memorisation", tuple(heldin_eval))),
                              ("heldout", Split(HELDOUT_FRACTION, 0, "memorisation", tuple(heldin), tuple(heldout)))):
        held = predict_heldout(st, split, list(handles.values()), eval_seeds, 1.0, 256)
        target = np.array([index[description(c)] for c in held.captions])
        for run, h in handles.items():
            results.setdefault(run, {})[split_name] = score(held.preds[h.name], held.image, target, protos,
                                                            seen_proto) | {"rows": len(held.keys)}
        for rows in sorted({c.settings["rows"] for c in all_cells}):
            train_split = Split(HELDOUT_FRACTION, 0, "memorisation", tuple(heldin[: rows // shard]), tuple(heldout))
            base = Baselines.fit(scan_training_split(st, train_split, 1.0, 0.0))
            for bname, pred in base.predict(held.text).items():
                if bname in ("ridge", "TextEmb"):
                    baselines.setdefault(str(rows), {}).setdefault(bname, {})[split_name] = score(
                        pred, held.image, target, protos, seen_proto)
    if check:  # the R@1 here is the demo's caption_retrieval: same rows, same noise seeds, same number
        try:
            from demo.experiment import caption_retrieval
        except ImportError as e:  # a working tree mid-edit: say so rather than fail the study
            print(f"  check skipped: demo.experiment does not import ({e})", file=sys.stderr)
            return results, baselines
        run = all_cells[0].runs[0]
        n = all_cells[0].settings["rows"] // shard
        ref = caption_retrieval(st, [run], heldin[:n], heldout, seeds=eval_seeds, group=description)
        theirs, ours = ref["models"][Path(run).name]["value"], results[run]["heldout"]["r1"]
        if abs(theirs - ours) > 1e-9:
            raise SystemExit(f"held-out R@1 {ours} differs from demo.experiment.caption_retrieval's {theirs}")
        print(f"  check: held-out R@1 of {Path(run).name} = caption_retrieval's ({theirs:.4f})", file=sys.stderr)
    return results, baselines


def run_metrics(r: dict) -> dict:
    return {"heldin_r1": r["heldin"]["r1"], "heldout_r1": r["heldout"]["r1"],
            "gap_r1": r["heldin"]["r1"] - r["heldout"]["r1"], "heldin_cos": r["heldin"]["cos"],
            "heldout_cos": r["heldout"]["cos"], "snap": r["heldout"]["snap"]}


def summarise(all_cells: list[Cell], results: dict, min_effect: float) -> list[dict]:
    base = all_cells[0]
    base_vals = [run_metrics(results[r]) for r in base.runs]
    rows = []
    for c in all_cells:
        vals = [run_metrics(results[r]) for r in c.runs]
        row = {"factor": c.factor, "label": c.label, "settings": c.settings, "runs": c.runs, "metrics": {}}
        for m in METRICS:
            per_seed = [v[m] for v in vals]
            entry = {"mean": float(np.mean(per_seed)), "seeds": per_seed, "ci": M.t_interval(per_seed)}
            if c is not base:
                diff = [a[m] - b[m] for a, b in zip(vals, base_vals, strict=True)]
                ci = M.t_interval(diff)
                entry |= {"diff": float(np.mean(diff)), "diff_seeds": diff, "diff_ci": list(ci) if ci else None,
                          "verdict": M.verdict(ci, min_effect)}
            row["metrics"][m] = entry
        rows.append(row)
    return rows


def _ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "—"


def format_table(rows: list[dict], baselines: dict) -> str:
    lines = [f"{'factor':<10} {'cell':<40} {'held-in R@1':>12} {'held-out R@1':>13} {'Δ held-out R@1 [t-CI]':>30} "
             f"{'gap':>7} {'held-out cos':>13} {'snap':>6}"]
    for r in rows:
        m = r["metrics"]
        d = m["heldout_r1"]
        delta = f"{d['diff']:+.3f} {_ci(d['diff_ci'])}" if "diff" in d else "(reference)"
        lines.append(f"{r['factor']:<10} {r['label']:<40} {m['heldin_r1']['mean']:>12.3f} "
                     f"{m['heldout_r1']['mean']:>13.3f} {delta:>30} {m['gap_r1']['mean']:>7.3f} "
                     f"{m['heldout_cos']['mean']:>13.3f} {m['snap']['mean']:>6.3f}")
    for rows_n, by_name in baselines.items():
        for name, v in by_name.items():
            lines.append(f"{'baseline':<10} {f'{name} ({rows_n} rows)':<40} {v['heldin']['r1']:>12.3f} "
                         f"{v['heldout']['r1']:>13.3f} {'':>30} {v['heldin']['r1'] - v['heldout']['r1']:>7.3f} "
                         f"{v['heldout']['cos']:>13.3f} {v['heldout']['snap']:>6.3f}")
    lines.append("")
    lines.append("paired differences from the baseline cell (same training seed; t-interval over seeds):")
    for r in rows[1:]:
        for m in METRICS:
            e = r["metrics"][m]
            lines.append(f"  {r['label']:<40} {m:<11} {e['diff']:+.3f} {_ci(e['diff_ci'])}  {e['verdict']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--world", required=True, type=Path,
                    help="a reproduce world folder (OUT/world of `eclipse-prior reproduce --datasets world:...`)")
    ap.add_argument("--out", required=True, type=Path, help="study folder: runs/ and memorisation.json")
    ap.add_argument("--factors", nargs="+", default=list(FACTORS), choices=list(FACTORS))
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per cell (>= 2 for an interval)")
    ap.add_argument("--eval-seeds", type=int, default=2, help="noise seeds per prior in the evaluation")
    ap.add_argument("--eclipse-lambda", type=float, default=None, help="also an eclipse cell at this λ")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="CPU threads per run")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every cell's held-in rows and training steps (a smoke run: 0.03)")
    ap.add_argument("--min-effect", type=float, default=0.01, help="smallest difference called an effect")
    ap.add_argument("--train-only", action="store_true", help="train the cells, skip the evaluation")
    ap.add_argument("--part", default="0/1", help="K/N: train only every N-th run from the K-th (with --train-only, "
                    "N processes in parallel; a last run without it evaluates)")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the cross-check of R@1 against demo.experiment.caption_retrieval")
    args = ap.parse_args(argv)

    st, heldin, heldout, shard = world_layout(args.world)
    all_cells = cells(args.factors, args.eclipse_lambda, args.scale)
    t0 = time.perf_counter()
    k, n = (int(x) for x in args.part.split("/"))
    if n > 1 and not args.train_only:
        raise SystemExit("--part K/N trains part of the study: use it with --train-only")
    for i, c in enumerate(all_cells):
        print(f"[{i + 1}/{len(all_cells)}] {c.factor}: {c.label}", file=sys.stderr, flush=True)
        train_cell(c, st, heldin, shard, args.seeds, args.out, args.batch_size, args.lr, args.threads, (k, n),
                   i * args.seeds)
    train_s = time.perf_counter() - t0
    if args.train_only:
        return 0
    results, baselines = evaluate_cells(all_cells, st, heldin, heldout, shard, args.eval_seeds, args.check)
    rows = summarise(all_cells, results, args.min_effect)
    print(format_table(rows, baselines))
    report = {"store": str(st.dir), "heldin_shards": heldin, "heldout_shards": heldout, "seeds": args.seeds,
              "eval_seeds": args.eval_seeds, "batch_size": args.batch_size, "lr": args.lr,
              "min_effect": args.min_effect, "factors": args.factors, "eclipse_lambda": args.eclipse_lambda,
              "cells": rows, "baselines": baselines, "per_run": results, "train_seconds": round(train_s, 1),
              "eval_seconds": round(time.perf_counter() - t0 - train_s, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memorisation.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'memorisation.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
