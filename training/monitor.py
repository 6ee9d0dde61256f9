"""What a training run records, and what it watches while it trains.

`Logger` writes logs/train.jsonl and TensorBoard (rank 0); `LossWindow` sums the loss and the
objective's parts on the device between logging steps (no host sync on the step path);
`grad_ratio` measures the balance of Eq. 5, ||grad lambda*L_CLS|| / ||grad L_proj|| at the
prior's output layer (`output_layer_params`), and `BalanceWatch` + `balance_warning` say once
when either term swamps the other early in the run (docs/objectives.md, "The objectives and the balance of
Eq. 5").
"""

import json
import math
import sys
import time
from pathlib import Path

import torch

from storage_schema.atomic import atomic_write_text
from training.config import TrainConfig
from training.export import LOGS, TRAIN_LOG
from training.objectives import unwrap

GRAD_RATIO = "grad_ratio_cls_proj"  # the log key of ||grad lambda*L_CLS|| / ||grad L_proj||
# Warn when the ratio stays outside [RATIO_FLOOR, RATIO_CEILING] over the first RATIO_WINDOW of the steps. Below
# 0.01 the update follows L_proj alone (eclipse trains as projection); above 10 it follows L_CLS alone, which only
# asks for the right text to be nearest, not for an image embedding: the paper's "large lambda" end, whose
# predictions leave the image space. Symmetric about the balanced 1, a factor of 100 either way of it.
RATIO_FLOOR, RATIO_CEILING, RATIO_WINDOW = 0.01, 10.0, 0.1


class Logger:
    """JSONL + TensorBoard, rank 0 only. On resume, drops records past the checkpoint step."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        logs = run_dir / LOGS
        logs.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / TRAIN_LOG
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")
        # purge_step hides events a killed run wrote past the checkpoint
        self.tb = SummaryWriter(str(logs / "tb"), purge_step=(resume_step + 1) if resume_step is not None else None)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"type": kind, "step": step, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "time"):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def warn(self, step: int, message: str) -> None:
        """A warning: on stderr, as a "warning" record in train.jsonl and as TensorBoard text."""
        if not self.enabled:
            return
        print(f"warning: {message}", file=sys.stderr)
        self.log("warning", step, {"message": message})
        self.tb.add_text("warning", message, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


class LossWindow:
    """Loss sums since the last log line, kept on the device so that a step needs no host sync."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.parts: dict[str, torch.Tensor] = {}
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.loss += loss.detach()
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0) + v.detach()  # the objective's parts are still on the graph
        self.steps += 1


def output_layer_params(model: torch.nn.Module) -> list[torch.nn.Parameter] | None:
    """The parameters of the last layer that every term of the loss shares: the prior's output
    projection `proj_to_clip_embeddings` (weight [D, inner] and bias [D]); None for a model without it.

    Every term is a function of the prediction, which is this layer's output, so its gradient is
    where each term's gradient enters the network (every other parameter's gradient is
    backpropagated from it), and the cheapest to reach: one [D, B] x [B, inner] product per term.
    """
    layer = getattr(unwrap(model), "proj_to_clip_embeddings", None)
    return [p for p in layer.parameters() if p.requires_grad] if layer is not None else None


def grad_ratio(numerator: torch.Tensor, denominator: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """||d numerator / d params|| / ||d denominator / d params|| (L2 over all of `params`), a 0-dim
    tensor on the device (no host sync). The graph is kept for the step's own backward, and no
    .grad is touched: the update is the same with or without it."""

    def norm(term: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads
                                                     if g is not None]))

    return norm(numerator) / norm(denominator).clamp_min(torch.finfo(torch.float32).tiny)


class BalanceWatch:
    """Says once whether `grad_ratio` stayed below RATIO_FLOOR ("low") or above RATIO_CEILING ("high") at every
    measurement up to the first logging step at or past RATIO_WINDOW of the run's steps (a resumed run judges
    what it measures)."""

    def __init__(self, steps: int, start: int):
        self.until = max(1, math.ceil(RATIO_WINDOW * steps))
        self.ratios: list[float] = []
        self.done = start >= self.until

    def add(self, step: int, ratio: float) -> str | None:
        """Record a measurement; "low" or "high" once, when a warning is due, else None."""
        if self.done:
            return None
        self.ratios.append(ratio)
        if step < self.until:
            return None
        self.done = True
        if max(self.ratios) < RATIO_FLOOR:
            return "low"
        if min(self.ratios) > RATIO_CEILING:
            return "high"
        return None


def balance_warning(cfg: TrainConfig, dim: int, ratios: list[float], step: int, side: str = "low") -> str:
    """The warning's text for a `BalanceWatch` verdict: the setting, the measured ratio and the lambda to use."""
    how = "summed over" if cfg.proj_reduction == "sum" else "averaged over"
    lam = cfg.eclipse_lambda
    if side == "low":
        edge, what = max(ratios), (f"the contrastive term is doing next to nothing: {GRAD_RATIO} stayed below "
                                   f"{RATIO_FLOOR:g}")
        effect = "The update follows L_proj alone: eclipse trains as projection."
        bound = "max"
    else:
        edge, what = min(ratios), (f"the contrastive term swamps the projection term: {GRAD_RATIO} stayed above "
                                   f"{RATIO_CEILING:g}")
        effect = ("The update follows L_CLS alone, which pulls the predictions out of the image space (the paper's "
                  "too-large lambda).")
        bound = "min"
    fix = (f"The ratio grows in proportion to lambda: for a ratio of ~0.1 to ~1 train with eclipse_lambda ~ "
           f"{lam * 0.1 / edge:.3g} to {lam / edge:.3g}" if edge > 0 and lam > 0 else
           "No lambda changes that: L_CLS has no gradient here (lambda = 0, or no other row in the batch to contrast "
           "with)")
    return (f"{what} (||grad lambda*L_CLS|| / ||grad L_proj|| at the output layer) over the first {step} of "
            f"{cfg.steps} steps ({bound} {edge:.2g}, last {ratios[-1]:.2g}; measured {len(ratios)}x) at "
            f"lambda = {lam:g}, D = {dim}, proj_reduction = {cfg.proj_reduction} (Eq. 3 {how} D). {effect} {fix} "
            f"(docs/objectives.md: 'The objectives and the balance of Eq. 5').")
