"""The cost model: FLOPs of the prior and of the decoders' CLIP towers, and the GPU kinds they run on.

FLOPs are counted analytically: matmuls and attention, 2 FLOPs per multiply-add, training = 3 x
forward (forward + backward), layer norms, softmax and activations left out. One copy, used by
:mod:`training.plan` (the cost plan) and by ``benchmarks/gpu/bench_gpu.py`` and
``benchmarks/train.py`` (which measure against it).

Time = FLOPs / (peak x MFU). The peaks are the vendors' datasheet figures (dense bf16 tensor
core, no sparsity). The model FLOP utilisations are **assumptions**, not measurements:
``benchmarks/gpu/bench_gpu.py`` measures both (``prior_mfu=``, ``*_fraction_of_flop_bound=``) on
a GPU, and ``eclipse-prior plan --prior-mfu / --encoder-mfu`` take what it prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.families import FAMILIES
from training.objectives import objective_type
from training.prior import preset_config

#: CLIPVisionConfig / CLIPTextConfig kwargs of the decoders' towers, and their names: the families' records.
VISION_TOWERS: dict[str, dict] = {name: f.vision_tower for name, f in FAMILIES.items()}
TEXT_TOWERS: dict[str, dict] = {name: f.text_tower for name, f in FAMILIES.items()}
TOWER_NAMES = {name: f.tower for name, f in FAMILIES.items()}


def _blocks(layers: int, tokens: int, width: int, mlp: int) -> float:
    """Forward FLOPs of `layers` transformer blocks over `tokens` positions (qkv + out, MLP, scores + mix)."""
    return layers * (2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width)


def prior_train_flops_per_sample(cfg: dict) -> float:
    """Training FLOPs of one sample through the prior (forward x 3). `cfg`: PriorTransformer kwargs."""
    d, inner = cfg["embedding_dim"], cfg["num_attention_heads"] * cfg["attention_head_dim"]
    text, length = cfg["num_embeddings"], cfg["num_embeddings"] + cfg["additional_embeddings"]
    fwd = 2 * text * d * inner  # text hidden-state projection
    fwd += 2 * 2 * d * inner  # text embedding + noise projections
    fwd += _blocks(cfg["num_layers"], length, inner, 4 * inner)
    fwd += 2 * inner * d  # output projection (prd token only)
    return 3.0 * fwd


def objective_train_flops_per_sample(preset: str, objective: str) -> float:
    """Training FLOPs per sample of a prior preset under an objective. The diffusion baseline's prior has
    one more position (the timestep token); its small time-embedding MLP is not counted (< 0.1 %)."""
    cfg = preset_config(preset)
    cfg["additional_embeddings"] += objective_type(objective).extra_tokens
    return prior_train_flops_per_sample(cfg)


def vision_flops_per_image(c: dict) -> float:
    """Forward FLOPs of one image through a CLIP ViT tower (patch embedding, blocks, projection)."""
    w, mlp, p = c["hidden_size"], c["intermediate_size"], c["patch_size"]
    patches = (c["image_size"] // p) ** 2
    flops = 2 * patches * (3 * p * p) * w
    flops += _blocks(c["num_hidden_layers"], patches + 1, w, mlp)
    return flops + 2 * w * c["projection_dim"]


def text_flops_per_caption(c: dict, tokens: int | None = None) -> float:
    """Forward FLOPs of one caption through a CLIP text tower at `tokens` positions (default: the full
    context, what a batch padded to 77 costs; the encode stage pads to the batch's longest caption)."""
    w, tokens = c["hidden_size"], tokens or c["max_position_embeddings"]
    return _blocks(c["num_hidden_layers"], tokens, w, c["intermediate_size"]) + 2 * w * c["projection_dim"]


def encoder_dims(decoder: str) -> tuple[int, int]:
    """(D, H) of a decoder's store: the projected embedding dim and the text tower's hidden width."""
    return int(VISION_TOWERS[decoder]["projection_dim"]), int(TEXT_TOWERS[decoder]["hidden_size"])


# Model FLOP utilisation assumed when nothing measured is given. Assumptions, stated as such: the
# 34M prior (inner width 512, 80 positions) is small for a GPU; the ViT towers are large matmuls in
# inference. benchmarks/gpu/bench_gpu.py measures both; until it has run, these are guesses.
ASSUMED_PRIOR_MFU = 0.30
ASSUMED_ENCODER_MFU = 0.40
MFU_SOURCE = ("assumed, not measured: prior training 30 %, encoder inference 40 % of the bf16 peak; "
              "benchmarks/gpu/bench_gpu.py measures both on a GPU (pass them with --prior-mfu / --encoder-mfu)")


@dataclass(frozen=True)
class DeviceKind:
    """A GPU kind: dense bf16 tensor-core peak (FLOP/s, no sparsity) and where the figure comes from."""

    name: str
    peak_bf16: float
    source: str
    match: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that mean this kind
    prior_mfu: float = ASSUMED_PRIOR_MFU
    encoder_mfu: float = ASSUMED_ENCODER_MFU


def _kind(name: str, tflops: float, sheet: str, *match: str) -> DeviceKind:
    return DeviceKind(name, tflops * 1e12, f"NVIDIA {sheet} datasheet, dense bf16 (half the with-sparsity figure)",
                      match)


# Ordered: the first kind whose substring is in a device name wins ("H100 NVL" before "H100").
DEVICES: dict[str, DeviceKind] = {k.name: k for k in (
    _kind("gh200", 989, "GH200 Grace Hopper Superchip", "GH200"),
    _kind("h200", 989, "H200 Tensor Core GPU", "H200"),
    _kind("h100-nvl", 835, "H100 NVL", "H100 NVL"),
    _kind("h100-pcie", 756, "H100 Tensor Core GPU (PCIe)", "H100 PCIe"),
    _kind("h100", 989, "H100 Tensor Core GPU (SXM)", "H100"),
    _kind("b200", 2250, "HGX B200", "B200"),
    _kind("a100", 312, "A100 Tensor Core GPU", "A100"),
    _kind("l40s", 362, "L40S", "L40S"),
    _kind("a6000", 154.8, "RTX A6000", "A6000"),
    _kind("l4", 121, "L4 Tensor Core GPU", "L4"),
)}
DEFAULT_DEVICE = "a100"  # the usual cloud training GPU; `a6000` is the paper's (4 x RTX A6000)


def device_kind(name: str) -> DeviceKind:
    """A kind by its key (`a100`) or by a CUDA device name (`NVIDIA A100-SXM4-80GB`)."""
    if name.lower() in DEVICES:
        return DEVICES[name.lower()]
    found = next((k for k in DEVICES.values() if any(m in name for m in k.match)), None)
    if found is None:
        raise ValueError(f"unknown device kind {name!r}; choose one of {', '.join(DEVICES)}")
    return found


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak of a CUDA device by its name (None when unknown), or the override in TFLOP/s."""
    if override_tflops:
        return override_tflops * 1e12
    try:
        return device_kind(device_name).peak_bf16
    except ValueError:
        return None


def gpu_hours(flops: float, peak: float, mfu: float) -> float:
    """GPU-hours that `flops` take at `mfu` of a `peak` FLOP/s device."""
    return flops / (peak * mfu) / 3600.0
