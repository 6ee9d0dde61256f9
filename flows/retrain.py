"""Prefect flow `retrain`: continue the promoted prior on shards added since it was trained,
evaluate candidate and promoted prior side by side, promote only if the gate passes.

The registry folder keeps promoted.json (the live prior) and decisions.jsonl (every
decision and its numbers). With no promoted prior yet, the first run trains from scratch
and is promoted. With no store yet either (the weekly schedule starts before anyone ran the
precompute), the run ends in a Completed state named "Skipped" whose message names the
precompute to run: a schedule that fires early is not a failure, and it picks up the
store on the first run after it exists.
"""

import json
import time
import uuid
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from evaluation.gate import Gate, decide, read_promoted, record
from flows.evaluate import evaluate
from flows.failures import missing_store_message, require_store, store_exists
from flows.params import GateParams, TrainParams
from flows.train import train
from pipeline.families import DEFAULT_FAMILY
from storage_schema import EmbeddingStore
from training.export import STATE, latest_checkpoint
from training.objectives import ObjectiveName
from training.prior import PresetName


def _model_name(result: dict, prior: str) -> str:
    run = str(Path(prior).parent)
    for name, model in result["models"].items():
        if model.get("kind") == "prior" and model["path"] in (prior, run):
            return name
    raise KeyError(f"{prior} not found in the evaluation")


@flow(name="retrain", log_prints=True)
def retrain(
    store: str,
    registry: str,
    objective: ObjectiveName = "eclipse",
    preset: PresetName = DEFAULT_FAMILY,
    steps: int = 5_000,
    data: Literal["all", "new"] = "all",
    params: TrainParams = TrainParams(),
    gate: GateParams = GateParams(),
    eval_seeds: int = 3,
    eval_max_rows: int = 2000,
) -> dict:
    """`data`: train the candidate on all shards (from the promoted weights) or only the new ones."""
    logger = get_run_logger()
    reg = Path(registry)
    promoted = read_promoted(reg)
    if not promoted and not store_exists(store):
        message = missing_store_message(store) + "; the next scheduled run starts from it"
        logger.warning("skipped: %s", message)
        return Completed(name="Skipped", message=message, data={"promote": False, "reason": message})
    require_store(store)  # a promoted prior whose store vanished is a real failure
    shards = EmbeddingStore(store).shards
    new = sorted(set(shards) - set(promoted["trained_shards"])) if promoted else shards
    if promoted and not new:
        logger.info("no store shards added since %s was trained; nothing to do", promoted["prior"])
        return {"promote": False, "reason": "no new shards", "promoted": promoted["prior"]}

    run = reg / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    candidate = train(store=store, out=str(run), objective=objective, preset=preset, steps=steps, params=params,
                      init_from=promoted["prior"] if promoted else None,
                      shards=new if (promoted and data == "new") else None)
    priors = [candidate] + ([promoted["prior"]] if promoted else [])
    result = evaluate(priors=priors, store=store, out=str(run / "evaluation"), seeds=eval_seeds,
                      max_rows=eval_max_rows, prompt_suite=False)
    cand_name = _model_name(result, candidate)
    inc_name = _model_name(result, promoted["prior"]) if promoted else None
    decision = decide(result, cand_name, inc_name, Gate(**gate.model_dump()))
    decision |= {"candidate": candidate, "incumbent": promoted["prior"] if promoted else None,
                 "new_shards": new, "evaluation": str(run / "evaluation" / "metrics.json")}
    trained = json.loads((latest_checkpoint(run) / STATE).read_text())["store_shards"]
    entry = {"prior": candidate, "run": str(run), "store": store,
             "trained_shards": sorted(set(trained) | set(promoted["trained_shards"] if promoted else [])),
             "metrics": {c["metric"]: c["candidate"] for c in decision["checks"]}}
    record(reg, decision, entry)
    verdict = "PROMOTED" if decision["promote"] else "kept the promoted prior"
    lines = [f"# retrain: {verdict}", decision["reason"], "",
             "| metric | candidate | promoted | regression | ok |", "|---|---|---|---|---|"]
    lines += [f"| {c['metric']} | {c['candidate']:.4f} | {c['promoted']:.4f} | {c['regression']:+.4f} | {c['ok']} |"
              for c in decision["checks"]]
    create_markdown_artifact("\n".join(lines), key="retrain-decision", description="promotion decision")
    logger.info("decision: %s (%s)", "promote" if decision["promote"] else "keep", decision["reason"])
    return decision
