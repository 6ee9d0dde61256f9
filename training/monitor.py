"""What a training run records, and what it watches while it trains.

`Logger` writes logs/train.jsonl and TensorBoard (rank 0); `LossWindow` sums the loss and the
objective's parts on the device between logging steps (no host sync on the step path);
`grad_ratio` measures the balance of Eq. 5, ||grad lambda*L_CLS|| / ||grad L_proj|| at the
prior's output layer (`output_layer_params`), and `BalanceWatch` + `balance_warning` say once
when the contrastive term is doing next to nothing (README, "The objectives, as the paper
writes them").
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
RATIO_FLOOR, RATIO_WINDOW = 0.01, 0.1  # warn when the ratio stays below 0.01 over the first 10 % of the steps


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
    """Warns once when `grad_ratio` stayed below RATIO_FLOOR at every measurement up to the first
    logging step at or past RATIO_WINDOW of the run's steps (a resumed run judges what it measures)."""

    def __init__(self, steps: int, start: int):
        self.until = max(1, math.ceil(RATIO_WINDOW * steps))
        self.ratios: list[float] = []
        self.done = start >= self.until

    def add(self, step: int, ratio: float) -> bool:
        """Record a measurement; True once, when the warning is due."""
        if self.done:
            return False
        self.ratios.append(ratio)
        if step < self.until:
            return False
        self.done = True
        return max(self.ratios) < RATIO_FLOOR


def balance_warning(cfg: TrainConfig, dim: int, ratios: list[float], step: int) -> str:
    """The warning's text: the setting, the measured ratio and what to do about it."""
    best = max(ratios)
    how = "summed over" if cfg.proj_reduction == "sum" else "averaged over"
    return (f"the contrastive term is doing next to nothing: {GRAD_RATIO} = ||grad lambda*L_CLS|| / ||grad L_proj|| "
            f"(at the output layer) stayed below {RATIO_FLOOR:g} over the first {step} of {cfg.steps} steps "
            f"(max {best:.2g}, last {ratios[-1]:.2g}; measured {len(ratios)}x) at lambda = {cfg.eclipse_lambda:g}, "
            f"D = {dim}, Eq. 3 {how} D. The update follows L_proj almost alone until the projection error has "
            f"shrunk. The ratio grows in proportion to lambda: for the contrastive term to act from the start, train "
            f"with eclipse_lambda ~ {cfg.eclipse_lambda * 0.1 / best:.3g} (ratio ~0.1) to "
            f"{cfg.eclipse_lambda / best:.3g} (ratio ~1); lambda = 0.2 with Eq. 3 summed over D is the paper's "
            f"setting (README: 'The objectives, as the paper writes them').")
