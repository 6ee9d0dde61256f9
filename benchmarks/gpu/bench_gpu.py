"""GPU benchmark: the prior's training speed and the CLIP vision towers' encode speed, vs FLOP bounds.

    python benchmarks/gpu/bench_gpu.py [--peak-tflops 989] [--skip-vision] [--skip-prior]

One GPU, under 8 minutes. Needs CUDA: without it, it says so and exits with status 2.
  1. the kandinsky22 ECLIPSE prior (34.2M parameters), batch 1024, bf16 autocast, torch.compile,
     fused AdamW, ECLIPSE loss: steps/s, samples/s, model FLOP utilisation (MFU), and the time
     the paper's 60,000-step schedule would take;
  2. ViT-L/14 (karlo) and ViT-bigG/14 (kandinsky22) vision towers, random weights built from
     their configs (transformers CLIPVisionModelWithProjection, bf16, SDPA), 224 px:
     images/s and the fraction of the FLOP bound (peak bf16 FLOP/s / FLOPs per image).
FLOPs are counted analytically by training/cost.py (matmuls and attention; 2 per multiply-add; training = 3 x
forward); the peaks per device kind and their datasheet sources are there too.
Batches are synthetic tensors already on the GPU: this measures the model, not the input path
(benchmarks/train.py measures that).
Prints prior_steps_per_s=<x>, prior_60k_steps_hours=<x> and, when the peak is known, prior_mfu=<x>; per tower
<tower>_images_per_s=<x> (ViT_L_14_images_per_s=...) and <tower>_fraction_of_flop_bound=<x>.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.cost import (  # noqa: E402  (the FLOP model and the device peaks: one copy, in the library)
    TOWER_NAMES,
    VISION_TOWERS,
    peak_flops,
    prior_train_flops_per_sample,
    vision_flops_per_image,
)

# (the tower's config kwargs, batch) per benchmarked image tower
BENCH_TOWERS = {f"{TOWER_NAMES[dec]} ({dec})": (VISION_TOWERS[dec], batch)
                for dec, batch in (("karlo", 512), ("kandinsky22", 256))}


def sync_time(fn, n: int) -> float:
    """Seconds per call of fn over n calls, GPU work included."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def bench_prior(batch: int, warmup: int, steps: int, compile_model: bool, peak: float | None) -> None:
    from training.objectives import EclipseObjective, PriorBatch
    from training.prior import build_prior, count_parameters, preset_config

    dev = torch.device("cuda")
    cfg = preset_config("kandinsky22")
    torch.manual_seed(0)
    model = build_prior("kandinsky22").to(dev).train()
    n_params = count_parameters(model)
    fwd_model = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, fused=True)
    d = cfg["embedding_dim"]
    g = torch.Generator(device=dev).manual_seed(0)
    lengths = torch.randint(5, 40, (batch,), device=dev, generator=g)
    mask = torch.arange(77, device=dev)[None] < lengths[:, None]
    data = PriorBatch(torch.randn(batch, d, device=dev, generator=g), torch.randn(batch, d, device=dev, generator=g),
                      torch.randn(batch, 77, d, device=dev, generator=g) * mask[..., None], mask)
    objective = EclipseObjective()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = objective.loss(fwd_model, data, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):  # includes compilation
        step()
    torch.cuda.synchronize()
    print(f"prior: warm-up ({warmup} steps{', compile' if compile_model else ''}) {time.perf_counter() - t0:.1f} s",
          flush=True)
    sec = sync_time(step, steps)
    flops = prior_train_flops_per_sample(cfg) * batch
    print(f"prior kandinsky22 ({n_params:,} parameters), batch {batch}, bf16{', compiled' if compile_model else ''}: "
          f"{1 / sec:.2f} steps/s, {batch / sec:,.0f} samples/s, {flops / sec / 1e12:.1f} TFLOP/s")
    if peak:
        print(f"prior_mfu={flops / sec / peak:.3f}")
    print(f"prior_steps_per_s={1 / sec:.3f}")
    print(f"the paper's 60,000 steps at batch {batch} (the paper: 256 x 4 GPUs):")
    print(f"prior_60k_steps_hours={60_000 * sec / 3600:.2f}")


@torch.inference_mode()
def bench_vision(name: str, kwargs: dict, batch: int, warmup: int, iters: int, peak: float | None) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**kwargs)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: random init of 1.8B parameters on CPU takes minutes
        model = CLIPVisionModelWithProjection(config)
    model = model.to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    pixels = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)

    def run() -> torch.Tensor:
        return model(pixel_values=pixels).image_embeds

    for _ in range(warmup):
        run()
    sec = sync_time(run, iters)
    ips = batch / sec
    flops = vision_flops_per_image(kwargs)
    key = name.split(" ")[0].replace("/", "_").replace("-", "_")
    line = (f"{name}: {n_params / 1e6:.0f}M parameters, {flops / 1e9:.0f} GFLOP/image, batch {batch}, "
            f"attention {model.config._attn_implementation}: {ips:,.0f} images/s")
    if peak:
        bound = peak / flops
        line += f", FLOP bound {bound:,.0f} images/s"
        print(line)
        print(f"{key}_fraction_of_flop_bound={ips / bound:.3f}")
    else:
        print(line)
    print(f"{key}_images_per_s={ips:.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU (default: from its name)")
    ap.add_argument("--batch", type=int, default=1024, help="prior batch")
    ap.add_argument("--prior-steps", type=int, default=100)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip-prior", action="store_true")
    ap.add_argument("--skip-vision", action="store_true")
    ap.add_argument("--vision-batch", type=int, help="one batch for every image tower (default: per tower, "
                    + ", ".join(f"{t} {b}" for t, (_, b) in BENCH_TOWERS.items()) + ")")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py measures GPU throughput and needs a CUDA GPU; torch.cuda.is_available() is False "
              "here. Run it on a GPU machine (CPU numbers: benchmarks/train.py).", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    peak = peak_flops(name, args.peak_tflops)
    print(f"device: {name}, torch {torch.__version__}, peak bf16 "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (pass --peak-tflops for MFU)'}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    if not args.skip_prior:
        bench_prior(args.batch, warmup=15, steps=args.prior_steps, compile_model=not args.no_compile, peak=peak)
        torch.cuda.empty_cache()  # the prior's memory is freed on return; hand it back before the towers
    if not args.skip_vision:
        for tower, (kwargs, batch) in BENCH_TOWERS.items():
            bench_vision(tower, kwargs, args.vision_batch or batch, warmup=3, iters=10, peak=peak)
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
