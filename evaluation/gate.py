"""The promoted prior of a retraining line, and the gate that decides a promotion.

A registry folder holds `promoted.json` (which prior is live, which store shards it was
trained on, its held-out metrics) and `decisions.jsonl` (every decision with its numbers).
"""

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from storage_schema.atomic import atomic_write_text

PROMOTED = "promoted.json"
DECISIONS = "decisions.jsonl"


@dataclass
class Gate:
    """Promote only if no listed held-out metric regresses by more than `tolerance` (absolute)."""

    metrics: list[str] = field(default_factory=lambda: ["cos_image", "r1"])
    tolerance: float = 0.005


def read_promoted(registry: str | os.PathLike) -> dict | None:
    path = Path(registry) / PROMOTED
    return json.loads(path.read_text()) if path.exists() else None


def _metric(result: dict, model: str, name: str) -> float:
    try:
        return float(result["models"][model]["metrics"][name]["value"])
    except KeyError as e:
        raise KeyError(f"evaluation has no metric {name!r} for {model!r}") from e


def decide(result: dict, candidate: str, incumbent: str | None, gate: Gate) -> dict:
    """Compare two priors of one evaluation (same held-out rows, same seeds)."""
    if incumbent is None:
        return {"promote": True, "reason": "no promoted prior yet", "checks": []}
    better = {k: v["better"] for k, v in result.get("metric_info", {}).items()}
    checks = []
    for name in gate.metrics:
        new, old = _metric(result, candidate, name), _metric(result, incumbent, name)
        direction = better.get(name, "higher")
        if direction == "higher":
            drop = old - new
        elif direction == "lower":
            drop = new - old
        else:  # a target value, e.g. a norm ratio of 1
            target = float(direction)
            drop = abs(new - target) - abs(old - target)
        checks.append({"metric": name, "candidate": new, "promoted": old, "better": direction,
                       "regression": drop, "ok": drop <= gate.tolerance})
    failed = [c["metric"] for c in checks if not c["ok"]]
    reason = f"regressed on {failed} (tolerance {gate.tolerance})" if failed else "no regression beyond tolerance"
    return {"promote": not failed, "reason": reason, "checks": checks}


def record(registry: str | os.PathLike, decision: dict, promoted_entry: dict | None) -> None:
    """Append the decision; if it promotes, replace promoted.json atomically."""
    reg = Path(registry)
    reg.mkdir(parents=True, exist_ok=True)
    decision = {"time": time.time(), **decision}
    with open(reg / DECISIONS, "a") as f:
        f.write(json.dumps(decision) + "\n")
    if decision.get("promote") and promoted_entry is not None:
        atomic_write_text(reg / PROMOTED, json.dumps(promoted_entry, indent=1))
