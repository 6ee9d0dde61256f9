"""Prefect flow `reproduce`: the paper's Table 2 for your decoders and data, as one resumable run.

    plan (cost, before anything runs) -> precompute once per (dataset, decoder) -> every cell
    (objective x λ x seed) trained and evaluated, in parallel on the workers -> OUT/table.json,
    OUT/table.csv, OUT/report.html

A cell is the existing `train` flow then the existing `evaluate` flow, run as one task on a Dask
worker (one GPU each where there are GPUs; CPU processes, one core each, here). Every cell has one
training budget (steps x batch). Its record, OUT/cells/ROW/NAME.json, is written last; a rerun skips
recorded cells, retries failed ones, and continues an interrupted cell from its last checkpoint (the
train flow resumes). A failed cell is a row of the table with its reason, not the end of the run.

Datasets: a dataset preset or a local url list (precomputed with the decoder's encoder), a store
folder (used as it is), or `world:N`: the demo's synthetic world with N held-in rows, encoded by the
demo's teacher CLIP (the CPU rehearsal). All world sizes share one store: size N trains on its first
N rows (nested subsets) and every size is evaluated on the same held-out-composition shards.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from evaluation.grid import (
    METRICS,
    Cell,
    CellRecord,
    build_table,
    cell_record,
    format_table,
    table_csv,
    write_grid_report,
)
from flows.demo import load_state, serve_and_precompute, teacher_task
from flows.evaluate import evaluate
from flows.params import ClusterParams, DownloadParams, EncodeParams, TrainParams, _Params
from flows.precompute import precompute
from flows.train import train
from pipeline.cluster import ClusterConfig, dask_task_runner
from pipeline.families import DEFAULT_FAMILY, FAMILIES
from storage_schema import EmbeddingStore
from storage_schema.atomic import atomic_write_text
from training.objectives import ObjectiveName, objective_type
from training.prior import PresetName

WORLD_PREFIX = "world:"
TEACHER = "teacher"  # the decoder column of world rows: the demo's teacher CLIP stands in for a decoder
Decoder = Literal[tuple(FAMILIES)]


class WorldParams(_Params):
    """The demo world behind `world:N` datasets (one teacher, one store for every size)."""

    teacher_steps: int = Field(600, gt=0)
    heldout_pair_fraction: float = Field(0.75, gt=0, lt=1, description="color x shape pairs no prior sees")
    heldout_rows: int = Field(2000, gt=0, description="held-out-composition rows every size is evaluated on")
    shard_size: int = Field(500, gt=0, description="images per shard (world sizes are whole shards)")
    prior_preset: PresetName = "demo"
    seed: int = 0


class ReproduceParams(_Params):
    datasets: list[str] = Field(min_length=1, description="dataset presets, url lists, store folders, or world:N")
    decoders: list[Decoder] = Field([DEFAULT_FAMILY], min_length=1, description="each row is dataset x decoder")
    pairs: list[tuple[str, Decoder]] | None = Field(None, description="explicit (dataset, decoder) rows instead of "
                                                    "datasets x decoders (the paper's Table 2 pairs them)")
    objectives: list[ObjectiveName] = Field(["projection", "eclipse", "diffusion"], min_length=1)
    lambdas: list[float] = Field([0.2], min_length=1, description="eclipse's λ values (one column each)")
    seeds: int = Field(3, gt=0, description="training seeds per cell")
    steps: int = Field(60_000, gt=0, description="training steps of every cell (one budget for all)")
    batch_size: int = Field(256, gt=0, description="per worker")
    lr: float = Field(5e-5, gt=0)
    heldout_fraction: float = Field(0.01, gt=0, lt=1, description="rows held out of training (the evaluation's "
                                    "rows; world rows are evaluated on held-out compositions instead)")
    eval_seeds: int = Field(3, ge=3, description="noise seeds per prior in each evaluation")
    eval_rows: int = Field(2000, gt=0, description="held-out rows each cell is evaluated on (a seeded sample)")
    workers: int | None = Field(None, gt=0, description="parallel cells (None: one per GPU, else one per core)")
    plan_device: str = Field("a100", description="GPU kind the cost plan is priced for (training.cost.DEVICES)")
    world: WorldParams = WorldParams()
    download: DownloadParams = DownloadParams()
    encode: EncodeParams = EncodeParams()
    cluster: ClusterParams = ClusterParams()

    @classmethod
    def quick(cls) -> ReproduceParams:
        """The whole path, small (CI): two world sizes, every objective, one seed; the teacher of `demo --quick`
        (same world, steps and seed)."""
        return cls(datasets=["world:300", "world:600"], seeds=1, steps=60, batch_size=32, lr=1e-3, eval_rows=300,
                   workers=2, world=WorldParams(heldout_rows=300, shard_size=150))

    @classmethod
    def rehearsal(cls) -> ReproduceParams:
        """The paper's data-size claim in miniature on 2 cores: 1.5k and 12k held-in rows, 3 seeds; eclipse at the
        paper's λ = 0.2, with the trainer's defaults (L_proj averaged over D: training.objectives)."""
        return cls(datasets=["world:1500", "world:12000"], lambdas=[0.2], seeds=3, steps=600, batch_size=64,
                   lr=1e-3, eval_rows=1000, world=WorldParams(heldout_rows=2000))

    @classmethod
    def paper(cls) -> ReproduceParams:
        """The paper's grid (ECLIPSE, CVPR 2024, Table 2): Karlo on MS-COCO, CC3M and CC12M, Kandinsky v2.2 on
        MS-COCO and LAION-HighRes, the three objectives, 60k steps x 1024 (4 GPUs x 256); the same pairs as
        `eclipse-prior plan --paper` (training.plan.PAPER_PAIRS)."""
        from training.plan import PAPER_DEVICE, PAPER_PAIRS

        return cls(datasets=sorted({d for d, _ in PAPER_PAIRS}), pairs=[list(x) for x in PAPER_PAIRS],
                   steps=60_000, batch_size=1024, lr=5e-5, plan_device=PAPER_DEVICE)  # one GPU per cell

    def data_rows(self) -> list[tuple[str, str]]:
        """(dataset, decoder) of every non-world row."""
        if self.pairs:
            return [(d, dec) for d, dec in self.pairs if not d.startswith(WORLD_PREFIX)]
        return [(d, dec) for d in self.datasets if not d.startswith(WORLD_PREFIX) for dec in self.decoders]

    def columns(self) -> list[tuple[str, float | None]]:
        out: list[tuple[str, float | None]] = []
        for o in self.objectives:
            out += [(o, lam) for lam in self.lambdas] if objective_type(o).sweep_key else [(o, None)]
        return out


@dataclass
class Row:
    """One dataset x decoder row, once its store exists (or why it cannot)."""

    dataset: str  # label
    decoder: str
    store: str | None = None
    error: str | None = None
    train_shards: list[str] | None = None  # world rows: the size's held-in shards
    heldout_shards: list[str] | None = None  # world rows: the held-out compositions
    images: str | None = None  # webdataset folder, for the report's nearest-real-image examples
    preset: str = DEFAULT_FAMILY  # the prior's size
    dims: tuple[int, int] | None = None  # (embedding_dim, text_length) overrides for small encoders
    probe_families: dict[str, list[str]] | None = None


@dataclass
class CellJob:
    """Everything a worker needs to train and evaluate one cell (picklable)."""

    cell: Cell
    row: Row
    record: str  # OUT/cells/ROW/NAME.json
    steps: int
    train: dict  # TrainParams fields
    eval_seeds: int
    eval_rows: int
    heldout_fraction: float | None


def _record_dict(rec: CellRecord) -> dict:
    return {"cell": asdict(rec.cell), "status": rec.status, "values": rec.values, "baselines": rec.baselines,
            "reason": rec.reason}


def read_record(path: Path) -> CellRecord | None:
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    return CellRecord(Cell(**d["cell"]), d["status"], d["values"], d["baselines"], d["reason"])


class CellBusy(RuntimeError):
    """Another process holds the cell (e.g. a worker of a killed run that has not exited yet)."""


def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - held for the cell's lifetime, released when the process dies
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        f.close()
        raise CellBusy(f"{path.parent.name}/{path.stem.lstrip('.')}: another process is running this cell; rerun "
                       f"when it has finished") from e
    return f


def run_cell(job: CellJob) -> CellRecord:
    """Train (resuming) and evaluate one cell; a failure becomes the cell's record, not an exception."""
    record = Path(job.record)
    run_dir, eval_dir = record.with_suffix(""), record.with_suffix(".eval")
    lock = _lock(record.with_name(f".{record.stem}.lock"))
    try:
        row, cell = job.row, job.cell
        train(store=row.store, out=str(run_dir), objective=cell.objective, preset=row.preset, steps=job.steps,
              params=TrainParams(**job.train), shards=row.train_shards)
        result = evaluate(priors=[str(run_dir)], store=row.store, out=str(eval_dir), seeds=job.eval_seeds,
                          max_rows=job.eval_rows, heldout_fraction=job.heldout_fraction,
                          prompt_suite=row.heldout_shards is None, heldout_shards=row.heldout_shards,
                          image_source=row.images, probe_families=row.probe_families)
        rec = cell_record(cell, result)
    except Exception as e:  # the cell fails, the grid goes on; the reason is the table's
        rec = CellRecord(job.cell, "failed", reason=f"{type(e).__name__}: {e}")
    try:
        atomic_write_text(record, json.dumps(_record_dict(rec), indent=1))  # completion recorded last
    finally:
        lock.close()
    return rec


@task(name="reproduce-cell")
def cell_task(job: CellJob) -> dict:
    return _record_dict(run_cell(job))


@flow(name="reproduce-cells")
def cells_flow(jobs: list[CellJob]) -> list[dict]:
    """Every cell as one task on the flow's (Dask) task runner; a lost worker fails only its own cell."""
    futures = [(job, cell_task.submit(job)) for job in jobs]
    out = []
    for job, fut in futures:
        try:
            out.append(fut.result())
        except Exception as e:
            out.append(_record_dict(CellRecord(job.cell, "failed", reason=f"{type(e).__name__}: {e}")))
    return out


def _world_rows(p: ReproduceParams, root: Path) -> list[Row]:
    """One teacher, one store for every world:N dataset; row N trains on the first N held-in rows."""
    from demo.world import POSITIONS, TEXTURE_WORDS, demo_world, split_by_pairs

    sizes = sorted({_world_size(d) for d in p.datasets if d.startswith(WORLD_PREFIX)})
    if not sizes:
        return []
    w, shard = p.world, p.world.shard_size
    for n in sizes:
        if n % shard:
            raise ValueError(f"world:{n}: a world size must be whole shards of {shard} rows (world.shard_size)")
    folder = root / "world"
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"sizes_max": sizes[-1], **w.model_dump()}
    state = load_state(folder, settings, "reproduce world")
    world = demo_world(seed=w.seed, image_size=32)
    held_pairs = world.holdout_pairs(w.heldout_pair_fraction, seed=w.seed)
    teacher_task(world, w.teacher_steps, w.seed, str(folder / "teacher"))
    held_rows = -(-w.heldout_rows // shard) * shard  # whole shards
    kept, held, n = [], [], sizes[-1] + held_rows
    while len(kept) < sizes[-1] or len(held) < held_rows:  # the world's split is ~1:3 kept:held
        n *= 2
        kept, held = split_by_pairs(world.sample_specs(n, seed=w.seed), held_pairs)
    kept, held = kept[: sizes[-1]], held[:held_rows]
    pre = serve_and_precompute(world, kept + held, shard, folder, state, settings)
    st = EmbeddingStore(pre["store"])
    heldin, heldout = st.shards[: len(kept) // shard], st.shards[len(kept) // shard:]
    families = {"color": list(world.colors), "shape": list(world.shapes), "texture": list(TEXTURE_WORDS.values()),
                "spatial": [*POSITIONS, "above", "below"]}
    return [Row(dataset=f"world-{n}", decoder=TEACHER, store=pre["store"], train_shards=heldin[: n // shard],
                heldout_shards=heldout, images=pre["images"], preset=w.prior_preset,
                dims=(st.encoder.image_dim, st.encoder.context_length), probe_families=families) for n in sizes]


def _world_size(spec: str) -> int:
    try:
        n = int(spec.removeprefix(WORLD_PREFIX))
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(f"{spec!r}: a world dataset is world:N with N > 0 held-in rows")
    return n


def _data_row(dataset: str, decoder: str, p: ReproduceParams, root: Path) -> Row:
    """A preset or url list precomputed with the decoder's own encoder, or a store folder used as it is."""
    label = Path(dataset).stem if Path(dataset).suffix else Path(dataset).name
    row = Row(dataset=label, decoder=decoder, preset=decoder)
    if (Path(dataset) / "_manifest.json").exists():
        st = EmbeddingStore(dataset)
        if st.encoder.preset != decoder:
            row.error = (f"store {dataset} was encoded by {st.encoder.preset!r}, not by {decoder}'s encoder; "
                         f"give a store of that encoder or the url list to encode")
        row.store = str(st.dir)
        return row
    try:
        pre = precompute(urls=dataset, encoder=decoder, out=str(root / "data" / f"{label}__{decoder}"),
                         download=p.download, encode=p.encode, cluster=p.cluster)
        row.store, row.images = pre["store"], pre["images"]
    except Exception as e:  # the row fails, the grid goes on (unless every row fails: see reproduce)
        row.error = f"{type(e).__name__}: {e}"
    return row


def _plan_artifact(p: ReproduceParams, root: Path) -> dict:
    """The cost plan of the non-world rows, before anything runs (OUT/plan.json and an artifact)."""
    from training.plan import PlanConfig, format_plan, make_plan

    real = [(d, dec) for d, dec in p.data_rows() if not (Path(d) / "_manifest.json").exists()]
    if not real:
        return {}
    try:
        plan = make_plan(PlanConfig(pairs=tuple(real), objectives=tuple(p.objectives), seeds=p.seeds, steps=p.steps,
                                    batch_size=p.batch_size, device=p.plan_device))
    except Exception as e:  # a plan that cannot be made must not stop the run
        get_run_logger().warning("no cost plan: %s: %s", type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}
    text = format_plan(plan)
    print(text)
    create_markdown_artifact(f"```\n{text}\n```", key="reproduce-plan", description="cost plan of the grid")
    out = plan.to_dict()
    atomic_write_text(root / "plan.json", json.dumps(out, indent=1, default=str))
    return out


def _jobs(rows: list[Row], p: ReproduceParams, root: Path, threads: int) -> tuple[list[CellJob], list[CellRecord]]:
    """(cells still to run, the records of finished cells and of cells whose row has no store)."""
    jobs, known = [], []
    for row in rows:
        for objective, lam in p.columns():
            for seed in range(p.seeds):
                cell = Cell(row.dataset, row.decoder, objective, lam, seed)
                record = root / "cells" / cell.row / f"{cell.name}.json"
                if row.error:
                    known.append(CellRecord(cell, "failed", reason=f"no store for this row: {row.error}"))
                    continue
                done = read_record(record)
                if done is not None and done.status == "done":
                    known.append(done)
                    continue
                dims = {"embedding_dim": row.dims[0], "text_length": row.dims[1]} if row.dims else {}
                train = TrainParams(batch_size=p.batch_size, lr=p.lr, seed=seed,
                                    heldout_fraction=p.heldout_fraction,  # world rows too: the baselines' split
                                    ckpt_every=max(p.steps // 4, 1), eval_every=0, num_threads=threads,
                                    **objective_type(objective).sweep(lam), **dims)
                jobs.append(CellJob(cell, row, str(record), p.steps, train.model_dump(), p.eval_seeds, p.eval_rows,
                                    None if row.heldout_shards else p.heldout_fraction))
    return jobs, known


def _notes(p: ReproduceParams) -> str:
    return (f"One training budget for every cell: {p.steps:,} steps × batch {p.batch_size} per worker, lr {p.lr:g}; "
            f"{p.seeds} training seed(s); each cell evaluated with {p.eval_seeds} noise seeds on up to "
            f"{p.eval_rows:,} held-out rows. World rows (the demo's synthetic world, its teacher CLIP in the decoder "
            f"column) train on the first N held-in rows and are evaluated on the same held-out compositions.")


def _workers(p: ReproduceParams) -> tuple[int, int]:
    """(parallel cells, torch threads per cell)."""
    import torch

    gpus = torch.cuda.device_count()
    cores = os.cpu_count() or 1
    n = p.workers or gpus or cores
    return n, max(1, cores // n)


@flow(name="reproduce", log_prints=True)
def reproduce(out: str = "runs/reproduce", params: ReproduceParams = ReproduceParams(datasets=["world:1500"])) -> dict:
    """The grid of `params` into folder `out`: plan.json, cells/, table.json, table.csv, report.html."""
    p = params
    root = Path(out).absolute()
    root.mkdir(parents=True, exist_ok=True)
    worlds = sum(d.startswith(WORLD_PREFIX) for d in p.datasets)
    print(f"1/4 cost plan ({len(p.data_rows())} dataset x decoder rows and {worlds} world rows, {len(p.columns())} "
          f"objective columns, {p.seeds} seeds)")
    _plan_artifact(p, root)
    print("2/4 precompute, once per dataset x decoder")
    rows = _world_rows(p, root)
    rows += [_data_row(d, dec, p, root) for d, dec in p.data_rows()]
    if rows and all(r.error for r in rows):  # nothing can run: fail as the precompute would, with its reason
        raise RuntimeError(f"no row of the grid has a store: {rows[0].dataset} x {rows[0].decoder}: {rows[0].error}")
    n_workers, threads = _workers(p)
    jobs, known = _jobs(rows, p, root, threads)
    print(f"3/4 {len(jobs)} cells to train and evaluate on {n_workers} workers ({len(known)} recorded already)")
    records = list(known)
    if jobs:
        runner = dask_task_runner(ClusterConfig(n_workers=n_workers, address=p.cluster.address,
                                                wait_timeout=p.cluster.wait_timeout))
        done = cells_flow.with_options(task_runner=runner)(jobs)
        records += [read_record(Path(j.record)) or CellRecord(j.cell, "failed", reason=d["reason"])
                    for j, d in zip(jobs, done, strict=True)]
    print("4/4 table")
    worlds = [r for r in rows if r.heldout_shards]
    if worlds:
        records = [*_with_caption_r1(worlds, [r for r in records if r.cell.decoder == TEACHER], root, p),
                   *(r for r in records if r.cell.decoder != TEACHER)]
    return write_outputs(root, records, p, METRICS + ("caption_r1",) if worlds else METRICS)


def _with_caption_r1(rows: list[Row], records: list[CellRecord], root: Path, p: ReproduceParams) -> list[CellRecord]:
    """World rows: caption R@1 among caption prototypes (demo.experiment.caption_retrieval, the demo's figure),
    every finished prior of a row and its TextEmb/text-shift/ridge baselines at once. Kept in
    OUT/cells/ROW/_caption_r1.json for the priors it was computed for, so a rerun does not redo it."""
    from demo.experiment import caption_retrieval
    from demo.world import description
    from evaluation.predict import PREDICTIONS_FILE

    out = []
    for row in rows:
        mine = [r for r in records if r.cell.dataset == row.dataset]
        done = sorted(r.cell.name for r in mine if r.status == "done")
        folder = root / "cells" / mine[0].cell.row if mine else None
        cache = folder / "_caption_r1.json" if folder else None
        models: dict = {}
        if cache is not None and done:
            cached = json.loads(cache.read_text()) if cache.exists() else {}
            if cached.get("priors") == done:
                models = cached["models"]
            else:
                st = EmbeddingStore(row.store)
                rows_held = sum(st.shard_rows[s] for s in row.heldout_shards)
                # the cells' own evaluations kept their predictions on these rows: score those, not predict again
                saved = [folder / f"{n}.eval" / PREDICTIONS_FILE for n in done]
                res = caption_retrieval(st, [str(folder / n) for n in done], row.train_shards, row.heldout_shards,
                                        seeds=p.eval_seeds, keep=min(1.0, p.eval_rows / rows_held), group=description,
                                        predictions=saved if all(f.exists() for f in saved) else None)
                models = {k: v["value"] for k, v in res["models"].items()}
                atomic_write_text(cache, json.dumps({"priors": done, "models": models}, indent=1))
        for r in mine:
            if r.status == "done":
                r = CellRecord(r.cell, r.status, {**r.values, "caption_r1": models.get(r.cell.name)},
                               {b: {**v, "caption_r1": models.get(b)} for b, v in r.baselines.items()})
            out.append(r)
    return out


def write_outputs(root: Path, records: list[CellRecord], p: ReproduceParams, metrics=METRICS) -> dict:
    table = build_table(records, metrics)
    table["params"] = p.model_dump()
    atomic_write_text(root / "table.json", json.dumps(table, indent=1))
    atomic_write_text(root / "table.csv", table_csv(table))
    write_grid_report(root / "report.html", table, notes=_notes(p))
    text = format_table(table)
    print(text)
    failed = sum(len(r["failed"]) for r in table["rows"])
    create_markdown_artifact(f"```\n{text}\n```\n\nReport: `{root / 'report.html'}`", key="reproduce-table",
                             description=f"the grid's table ({failed} failed cells)")
    return {"table": str(root / "table.json"), "csv": str(root / "table.csv"), "report": str(root / "report.html"),
            "failed_cells": failed}
