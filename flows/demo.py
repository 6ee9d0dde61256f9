"""Prefect flow `demo`: the whole DAG on a CPU, on a synthetic compositional world.

world -> teacher CLIP (trained here) + its testbed figures -> url list served on loopback ->
precompute (img2dataset + encode) -> projection, eclipse at several λ and diffusion priors on
held-in compositions, several seeds, one training budget -> evaluate on held-in rows and on
held-out compositions -> DIR/metrics.json + DIR/report.html (with the λ trade-off plot).
Every stage skips what an earlier run finished.
"""

import json
import os
import socket
import time
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.futures import as_completed
from pydantic import Field

from demo.server import WorldServer
from demo.world import World, demo_world, description, split_by_pairs, write_url_list
from flows.evaluate import evaluate
from flows.params import ClusterParams, DownloadParams, EncodeParams, TrainParams, _Params
from flows.precompute import precompute
from flows.train import finished_prior, train
from pipeline.cluster import ClusterConfig, dask_task_runner
from storage_schema import EmbeddingStore
from storage_schema.atomic import atomic_write_text
from training.objectives import DEFAULT_REDUCTION, objective_type

PAPER_LAMBDA = 0.2  # the eclipse run the diffusion baseline is paired with
STATE_FILE = "demo_state.json"  # the settings and world-server port of the run in a folder


class DemoParams(_Params):
    images: int = Field(8000, gt=0, description="rendered image-caption pairs")
    heldout_pair_fraction: float = Field(0.75, gt=0, lt=1, description="color x shape pairs the priors never see")
    teacher_steps: int = Field(600, gt=0)
    prior_steps: int = Field(500, gt=0, description="steps of every prior (one budget for all objectives)")
    prior_preset: Literal["tiny", "demo"] = Field("demo", description="prior size (training.prior.PRIOR_PRESETS)")
    # the paper's 0.2, a tenth and ten times it (L_proj averaged over D, the trainer's default: training.objectives)
    lambdas: list[float] = Field([0.02, 0.2, 2.0], min_length=1, description="eclipse's λ values (projection is λ=0)")
    sum_lambdas: list[float] = Field([0.2], description="eclipse's λ values with Eq. 3 summed over D (its letter, "
                                     "proj_reduction=sum), a column each beside the sweep")
    seeds: int = Field(3, gt=0, description="training seeds per objective")
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    shard_size: int = Field(500, gt=0, description="images per shard")
    eval_seeds: int = Field(3, ge=3, description="noise seeds per prior in the evaluation")
    eval_rows: int = Field(1000, gt=0, description="rows per split the priors are evaluated on (a seeded sample)")
    gap_captions: int = Field(300, gt=0, description="held-out captions the testbed gap is measured on")
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoParams":
        """The same path, small: fewer images, prior steps, seeds and λ values (CI). The teacher is the full
        demo's: a 250-step one left too little room beyond text-shift on the store (oracle - text-shift 0.077)."""
        return cls(images=1600, prior_steps=150, seeds=1, lambdas=[0.2], shard_size=200, gap_captions=100,
                   eval_rows=400)

    def objectives(self) -> dict[str, tuple[str, float | None, str]]:
        """Run name -> (objective, λ, proj_reduction): projection (λ = 0), eclipse at each λ (the default
        reduction) and at each of `sum_lambdas` summed over D, diffusion."""
        runs: dict[str, tuple[str, float | None, str]] = {"projection": ("projection", 0.0, DEFAULT_REDUCTION)}
        runs.update({f"eclipse-{lam:g}": ("eclipse", lam, DEFAULT_REDUCTION) for lam in self.lambdas})
        runs.update({f"eclipse-sum-{lam:g}": ("eclipse", lam, "sum") for lam in self.sum_lambdas})
        runs["diffusion"] = ("diffusion", None, DEFAULT_REDUCTION)
        return runs

    def sweep(self) -> dict[str, float]:
        """The λ sweep's runs (the trade-off plot's curve): projection at λ = 0 and eclipse at each of `lambdas`."""
        return {name: lam for name, (_, lam, red) in self.objectives().items()
                if lam is not None and red == DEFAULT_REDUCTION}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@task(name="teacher")
def teacher_task(world: World, steps: int, seed: int, out: str) -> dict:
    from demo.teacher import teacher_metrics, train_teacher
    from pipeline.encoders import load_encoder

    path = Path(out)
    report_file = path / "teacher_report.json"
    if report_file.exists():
        return json.loads(report_file.read_text())["report"]
    if (path / "encoder.json").exists():  # saved, but killed before its report: measure it again
        report = teacher_metrics(load_encoder(path), world).to_dict()
        report_file.write_text(json.dumps({"report": report, "world": world.to_dict(), "seed": seed}, indent=2))
        return report
    return train_teacher(world, steps=steps, seed=seed, out_dir=path).to_dict()


@task(name="testbed-gap")
def gap_task(world: World, held_pairs: list[tuple[str, str]], n_captions: int, teacher_dir: str, seed: int) -> dict:
    from demo.teacher import heldout_gap
    from pipeline.encoders import load_encoder

    path = Path(teacher_dir) / "heldout_gap.json"
    if path.exists():
        return json.loads(path.read_text())
    gap = heldout_gap(load_encoder(teacher_dir), world, held_pairs, n_captions=n_captions,
                      fit_n=max(800, 6 * n_captions), seed=seed)
    atomic_write_text(path, json.dumps(gap, indent=1))
    return gap


def format_timings(seconds: dict[str, float]) -> str:
    """One line per stage, with its share of the run; parts of a stage are indented under it."""
    total = sum(v for k, v in seconds.items() if not k.startswith(" ")) or 1.0
    lines = [f"  {k:<18} {v:7.1f}  {100 * v / total:4.0f} %" for k, v in seconds.items()]
    return "\n".join(lines + [f"  {'total':<18} {total:7.1f}"])


def load_state(root: Path, params: dict, what: str = "demo run") -> dict:
    """What an earlier run in `root` recorded (its world server's port); refuses other settings."""
    state_file = root / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("params", params) != params:
        raise ValueError(f"{root} holds a {what} with other settings ({state['params']}); resume it with the same "
                         f"flags, or use another --out")
    return state


def _split(world: World, held_pairs: set[tuple[str, str]], p: DemoParams) -> tuple[list, list]:
    """(held-in, held-out-composition) specs. Held-in first, cut to whole shards: shard i of the url
    list is rows [i*N, (i+1)*N) in img2dataset, so the split is a split of store shards."""
    specs = world.sample_specs(p.images, seed=p.seed)
    kept, held = split_by_pairs(specs, held_pairs)
    kept = kept[: (len(kept) // p.shard_size) * p.shard_size]
    if not kept or not held:
        raise ValueError(f"{p.images} images leave {len(kept)} held-in (whole shards of {p.shard_size}) and "
                         f"{len(held)} held-out rows; use more images or smaller shards")
    return kept, held


def serve_and_precompute(world: World, specs: list, shard_size: int, root: Path, state: dict, params: dict) -> dict:
    """Serve the world on loopback and run the real precompute flow over its url list (ROOT/data).

    `state` and `params` are what `load_state` read and checked: the port of an earlier run in `root`
    is reused, so its url list (which names the port) and its download resume."""
    port = state.get("port", 0)
    overwrite = bool(port) and not _port_free(port)  # urls of an unfinished earlier run cannot be resumed
    with WorldServer(world, port=0 if overwrite else port) as server:
        atomic_write_text(root / STATE_FILE, json.dumps({"port": server.port, "params": params}))
        write_url_list(specs, server.base_url, root / "urls.parquet", fmt="png")
        return precompute(
            urls=str(root / "urls.parquet"), encoder=str(root / "teacher"), out=str(root / "data"),
            # png: the teacher sees exactly the pixels it was trained on
            download=DownloadParams(image_size=32, encode_format="png", encode_quality=1,
                                    processes_count=min(2, os.cpu_count() or 1), thread_count=16,
                                    number_sample_per_shard=shard_size, timeout=20, overwrite=overwrite),
            encode=EncodeParams(batch_size=256), cluster=ClusterParams(n_workers=1),
        )


@task(name="demo-prior")
def prior_task(store: str, out: str, objective: str, preset: str, steps: int, params: TrainParams,
               shards: list[str]) -> str:
    return train(store=store, out=out, objective=objective, preset=preset, steps=steps, params=params, shards=shards)


@flow(name="demo-priors")
def priors_flow(jobs: list[dict]) -> list[str]:
    """Every prior as one task on the flow's (Dask) task runner: one per core at a time, one thread each (a
    500-step demo prior: 10.8 s alone on two threads, ~15 s each for two side by side on one: BENCHMARKS.md)."""
    futures = {prior_task.submit(**job): Path(job["out"]).name for job in jobs}
    for k, fut in enumerate(as_completed(list(futures)), 1):
        fut.result()
        print(f"    [{k}/{len(jobs)}] {futures[fut]} done")
    return [f.result() for f in futures]


def _train_priors(st: EmbeddingStore, shards: list[str], kept_rows: int, p: DemoParams, root: Path
                  ) -> tuple[dict[str, list[str]], dict]:
    """Every objective and seed on the held-in shards, one budget: (run names per objective, the budget)."""
    from training.prior import build_prior, count_parameters

    dim, context = st.encoder.image_dim, st.encoder.context_length
    objectives = p.objectives()
    runs: dict[str, list[str]] = {o: [] for o in objectives}
    n_params = count_parameters(build_prior(p.prior_preset, dim, context))
    budget = {"steps": p.prior_steps, "batch_size": p.batch_size, "samples_seen": p.prior_steps * p.batch_size,
              "lr": p.lr, "preset": p.prior_preset, "prior_parameters": n_params, "heldin_rows": kept_rows,
              "epochs": round(p.prior_steps * p.batch_size / (0.9 * kept_rows), 1)}
    jobs = []
    for s in range(p.seeds):
        for key, (obj, lam, reduction) in objectives.items():
            name = f"{key}-s{s}"
            runs[key].append(name)
            jobs.append(dict(store=str(st.dir), out=str(root / "runs" / name), objective=obj, preset=p.prior_preset,
                             steps=p.prior_steps, shards=shards,
                             params=TrainParams(batch_size=p.batch_size, lr=p.lr, seed=s, embedding_dim=dim,
                                                text_length=context, heldout_fraction=0.1,
                                                ckpt_every=max(p.prior_steps // 4, 1), eval_every=0, num_threads=1,
                                                proj_reduction=reduction,
                                                **objective_type(obj).sweep(lam))))
    todo = [j for j in jobs if finished_prior(Path(j["out"]), p.prior_steps) is None]  # a rerun skips finished ones
    workers = max(1, min(os.cpu_count() or 1, len(todo)))
    print(f"3/5 training {len(jobs)} priors ({len(jobs) - len(todo)} finished earlier) on the held-in shards {shards}, "
          f"{workers} at a time: every objective gets the same budget, {p.prior_steps} steps x batch {p.batch_size} "
          f"(~{budget['epochs']} epochs), {n_params:,}-parameter '{p.prior_preset}' prior")
    if todo:
        priors_flow.with_options(task_runner=dask_task_runner(ClusterConfig(n_workers=workers)))(todo)
    return runs, budget


def _evaluate(st: EmbeddingStore, images: str, runs: dict[str, list[str]], heldin_shards: list[int],
              heldout_shards: list[int], p: DemoParams, root: Path) -> tuple[dict, dict]:
    """(results per split, oracle figures): every prior on held-in rows and on held-out compositions."""
    from demo.experiment import caption_retrieval, oracle_metrics
    from evaluation.predict import PREDICTIONS_FILE

    store = str(st.dir)
    priors = [str(root / "runs" / n) for key in p.objectives() for n in runs[key]]
    common = dict(priors=priors, store=store, seeds=p.eval_seeds, max_rows=p.eval_rows, prompt_suite=False,
                  device="cpu", image_source=images)
    results = {"heldin": evaluate(out=str(root / "eval-heldin"), **common),
               "heldout": evaluate(out=str(root / "eval-heldout"), heldout_shards=heldout_shards, **common)}
    # Templates are drawn independently of the image: group renders by the caption without its template.
    oracle = {"heldout": oracle_metrics(st, heldout_shards, group=description)}
    for split, held_shards in (("heldin", None), ("heldout", heldout_shards)):
        # the rows and predictions of that split's evaluation (predicted once; a folder evaluated before
        # evaluate kept its predictions: predicted again, on the same rows)
        saved = root / f"eval-{split}" / PREDICTIONS_FILE
        results[split]["caption_retrieval"] = caption_retrieval(
            st, priors, heldin_shards, held_shards, seeds=p.eval_seeds, group=description,
            keep=min(1.0, p.eval_rows / max(results[split]["split"]["heldout_rows_in_store"], 1)),
            predictions=saved if saved.exists() else None)
    return results, oracle


@flow(name="demo", log_prints=True)
def demo(out: str = "runs/demo", params: DemoParams = DemoParams()) -> dict:
    from demo.experiment import (
        format_table,
        format_testbed,
        format_tradeoff,
        store_gap,
        summarize,
        summarize_testbed,
        tradeoff,
        write_demo_report,
    )

    log = get_run_logger()
    root = Path(out).absolute()
    root.mkdir(parents=True, exist_ok=True)
    p = params
    state = load_state(root, p.model_dump())
    world = demo_world(seed=p.seed, image_size=32)
    held_pairs = world.holdout_pairs(p.heldout_pair_fraction, seed=p.seed)

    clock = [time.perf_counter()]
    seconds: dict[str, float] = {}

    def lap(stage: str) -> None:  # the wall time since the last lap, for the time profile
        now = time.perf_counter()
        seconds[stage] = round(now - clock[0], 1)
        clock[0] = now

    print("1/5 teacher CLIP on the synthetic world, and the testbed figures")
    teacher = teacher_task(world, p.teacher_steps, p.seed, str(root / "teacher"))
    lap("teacher")
    gap = gap_task(world, sorted(held_pairs), p.gap_captions, str(root / "teacher"), p.seed)
    lap("testbed gap")
    bed = summarize_testbed(teacher, gap)
    print(format_testbed(bed))

    kept, held = _split(world, held_pairs, p)
    print(f"2/5 precompute: {len(kept)} held-in + {len(held)} held-out-composition images, served on loopback")
    pre = serve_and_precompute(world, kept + held, p.shard_size, root, state, p.model_dump())
    lap("precompute")
    seconds.update({f"  {k}": v for k, v in pre["seconds"].items()})  # its parts (the rest: Dask start-up)
    st = EmbeddingStore(pre["store"])
    n_in_shards = len(kept) // p.shard_size
    heldin_shards, heldout_shards = st.shards[:n_in_shards], st.shards[n_in_shards:]
    runs, budget = _train_priors(st, heldin_shards, len(kept), p, root)
    lap("training priors")

    print("4/5 evaluating on held-in rows and on held-out compositions")
    results, oracle = _evaluate(st, pre["images"], runs, heldin_shards, heldout_shards, p, root)
    lap("evaluation")

    print("5/5 report")
    paper = f"eclipse-{PAPER_LAMBDA:g}" if PAPER_LAMBDA in p.lambdas else f"eclipse-{p.lambdas[0]:g}"
    pairs = [(f"eclipse-{lam:g}", "projection") for lam in p.lambdas]
    pairs += [(f"eclipse-sum-{lam:g}", "projection") for lam in p.sum_lambdas] + [(paper, "diffusion")]
    table = summarize(results, runs, oracle, pairs=pairs)
    bed = summarize_testbed(teacher, gap, store_gap(table))
    lambdas = p.sweep()
    points = tradeoff(table, lambdas)
    metrics = {"teacher": teacher, "testbed": bed, "budget": budget, "tradeoff": points,
               "tradeoff_heldin": tradeoff(table, lambdas, split="heldin"),
               "world": world.to_dict(), "params": p.model_dump(),
               "split": {"heldin_shards": heldin_shards, "heldout_shards": heldout_shards,
                         "heldout_pairs": sorted(map(list, held_pairs)), "heldin_rows": len(kept),
                         "heldout_rows": len(held)},
               "experiment": table, "heldin": results["heldin"], "heldout": results["heldout"],
               "oracle": oracle}
    atomic_write_text(root / "metrics.json", json.dumps(metrics, indent=1, default=str))
    notes = (f"{len(kept)} held-in and {len(held)} held-out-composition images; "
             f"{len(held_pairs)} of {len(world.colors) * len(world.shapes)} color × shape pairs never reach a prior. "
             f"Training budget, the same for every objective: {p.prior_steps} steps × batch {p.batch_size} "
             f"(~{budget['epochs']} epochs of the held-in rows), lr {p.lr:g}, {budget['prior_parameters']:,}-parameter "
             f"'{p.prior_preset}' prior, {p.seeds} training seed(s). "
             "The evaluation below is the held-out-composition split; held-in figures are in the table above "
             "and in eval-heldin/report.html.")
    write_demo_report(root / "report.html", root / "eval-heldout", table, teacher, notes, testbed_figures=bed,
                      points=points)
    lap("report")
    atomic_write_text(root / "timings.json", json.dumps(seconds, indent=1))
    text = "\n".join([format_table(table), "", "testbed:", format_testbed(bed), "",
                      "λ trade-off on held-out compositions (mean, t-interval over seeds):", format_tradeoff(points),
                      "", "time profile of this run (s; a stage an earlier run finished only checks its work):",
                      format_timings(seconds)])
    print(text)
    print(f"report: {root / 'report.html'}")
    log.info("demo finished")
    return {"table": text, "report": str(root / "report.html"), "metrics": str(root / "metrics.json")}
