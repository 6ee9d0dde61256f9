"""Prefect flow `evaluate`: metrics.json + report.html for one or more priors, as artifacts too.

A rerun with the same priors (same weights), store and settings is a no-op (`evaluation.evaluate.evaluate`)."""

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from evaluation.decoders import DecoderKind
from evaluation.evaluate import EvalConfig
from evaluation.evaluate import evaluate as evaluate_priors
from flows.failures import require_store

SUMMARY_METRICS = ("cos_image", "r1", "r5", "frechet", "norm_ratio")


@task(name="evaluate-priors")
def evaluate_task(priors: list[str], store: str, out: str, settings: dict) -> dict:
    return evaluate_priors(EvalConfig(priors=priors, store=store, out=out, **settings))


@flow(name="evaluate", log_prints=True)
def evaluate(
    priors: list[str],
    store: str,
    out: str,
    seeds: int = 3,
    max_rows: int = 2000,
    heldout_fraction: float | None = None,
    prompt_suite: bool = True,
    decoder: DecoderKind | None = None,
    decoder_path: str | None = None,
    device: str | None = None,
    heldout_shards: list[str] | None = None,
    image_source: str | None = None,
    probe_families: dict[str, list[str]] | None = None,
) -> dict:
    """Evaluate `priors` (prior, run or checkpoint folders) on the store's held-out split into `out`.

    heldout_shards: evaluate every row of these shards (a composition hold-out the priors never read).
    image_source: folder of the webdataset image shards, for the report's nearest-real-image examples.
    probe_families: the attribute probe's word families (None: color, shape, texture, spatial).
    """
    require_store(store)  # names the precompute to run first, instead of a FileNotFoundError
    settings = {"seeds": seeds, "max_rows": max_rows, "heldout_fraction": heldout_fraction,
                "prompt_suite": prompt_suite, "decoder": decoder, "decoder_path": decoder_path, "device": device,
                "heldout_shards": heldout_shards, "image_source": image_source,
                "probe_families": probe_families}
    result = evaluate_task(priors, store, out, settings)  # a no-op when `out` holds this evaluation

    rows = []
    for name, model in result["models"].items():
        m = model["metrics"]
        rows.append({"model": name, "kind": model["kind"],
                     **{k: round(m[k]["value"], 4) for k in SUMMARY_METRICS if k in m}})
    create_table_artifact(rows, key="evaluate-metrics", description="held-out metrics (mean over seeds)")
    create_markdown_artifact(
        "| model | " + " | ".join(SUMMARY_METRICS) + " |\n|---|" + "---|" * len(SUMMARY_METRICS) + "\n"
        + "\n".join(f"| {r['model']} | " + " | ".join(str(r.get(k, "")) for k in SUMMARY_METRICS) + " |"
                    for r in rows) + f"\n\nReport: `{Path(out) / 'report.html'}`",
        key="evaluate-summary", description="held-out metrics of every prior and baseline",
    )
    return result
