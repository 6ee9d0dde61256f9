"""Training input efficiency and the cache speed-up at the real pair's ratio, scaled to a CPU.

    python benchmarks/train.py [--rounds 4] [--batch-size 16] [--width-scale 0.25] [--depth-scale 0.5]

Three ways to run the same training steps (same prior, same batches, same optimizer):
  memory  batches already in memory as tensors: the model alone
  store   batches streamed from an embedding store by training.data.StoreLoader (read-ahead thread)
  clip    every batch's image embeddings computed on the fly by a CLIP image tower from in-memory
          images, then the same step: what training without the cache costs. Images are already
          decoded and resized and the text tower is not run, so this is a lower bound on that cost.

The pair is kandinsky22's: the ViT-bigG/14 image tower (width 1664, 48 layers, 16 heads, MLP 8192,
patch 14, 224 px) and the 34M ECLIPSE prior (16 heads x 32, 10 layers, D = 1280). Both are scaled
down by the same factors (widths and D by --width-scale, depths by --depth-scale; heads, patch,
image size and the 77 text positions kept), so their FLOPs shrink alike and the CPU ratio stands
for the real one. The FLOP model (training/cost.py's count: matmuls and attention,
2 FLOPs per multiply-add, image tower forward per sample vs prior forward + backward per sample)
predicts the speed-up for the scaled and for the real pair; the run measures the scaled one.

The modes alternate step by step and the ratios are medians over adjacent pairs of steps:
this machine is shared and its speed drifts by 2-5x within a minute. Prints, as its last lines:
  train_input_efficiency=<steps/s from the store / steps/s from memory>   (goal >= 0.95)
  cache_speedup=<steps/s from the store / steps/s with the on-the-fly image tower>   (scaled pair)
  cache_speedup_flop_model_real_pair=<the FLOP model's prediction for ViT-bigG/14 + the 34M prior>
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic inputs shared with the tests

from storefixtures import write_synthetic_store  # noqa: E402

from storage_schema import EmbeddingStore  # noqa: E402
from training.cost import (  # noqa: E402
    TOWER_NAMES,
    VISION_TOWERS,
    prior_train_flops_per_sample,
    vision_flops_per_image,
)
from training.data import StoreLoader  # noqa: E402
from training.objectives import EclipseObjective, PriorBatch  # noqa: E402
from training.prior import PriorTransformer, count_parameters, preset_config  # noqa: E402

PAIR = "kandinsky22"  # the decoder family whose image tower and prior preset make the real pair


def make_step(model: torch.nn.Module, seed: int = 0):
    """One ECLIPSE training step (loss, backward, AdamW): identical in every mode."""
    objective = EclipseObjective()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    gen = torch.Generator().manual_seed(seed)

    def step(batch: PriorBatch) -> float:
        loss, _ = objective.loss(model, batch, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def seconds(run_one, i: int) -> float:
    start = time.perf_counter()
    run_one(i)
    return time.perf_counter() - start


def scaled_pair(width: float, depth: float) -> tuple[dict, dict]:
    """(CLIPVisionConfig kwargs, prior config) of kandinsky22's pair, widths x `width`, depths x `depth`."""
    real = VISION_TOWERS[PAIR]
    vision = real | {"hidden_size": round(real["hidden_size"] * width),
                     "intermediate_size": round(real["intermediate_size"] * width),
                     "num_hidden_layers": max(1, round(real["num_hidden_layers"] * depth)),
                     "projection_dim": round(real["projection_dim"] * width)}
    prior = preset_config(PAIR)
    prior |= {"embedding_dim": round(prior["embedding_dim"] * width),
              "attention_head_dim": max(1, round(prior["attention_head_dim"] * width)),
              "num_layers": max(1, round(prior["num_layers"] * depth))}
    heads = real["num_attention_heads"]
    if vision["hidden_size"] % heads:
        raise SystemExit(f"--width-scale {width} gives the image tower width {vision['hidden_size']}, not a multiple "
                         f"of its {heads} heads: pick a scale that keeps {real['hidden_size']} x scale a multiple "
                         f"of {heads} (0.25, 0.125, 1/26)")
    return vision, prior


def predicted_speedup(vision: dict, prior: dict) -> tuple[float, float, float]:
    """(image tower GFLOP per image, prior training GFLOP per sample, predicted cache speed-up)."""
    v, p = vision_flops_per_image(vision), prior_train_flops_per_sample(prior)
    return v / 1e9, p / 1e9, (v + p) / p


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="rounds of k memory/store pairs + 1 clip step")
    ap.add_argument("--steps", type=int, default=2, help="memory and store steps per round (clip: 1)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--width-scale", type=float, default=0.25, help="widths and D, both models (default 1/4)")
    ap.add_argument("--depth-scale", type=float, default=0.5, help="layers, both models (default 1/2)")
    # One thread: on a shared 2-core machine a second OpenMP thread spins at barriers and made the
    # small prior ~10x slower while the image tower's big matmuls barely noticed, skewing the ratio.
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


def clip_mode_batches(vision_cfg: dict, in_memory: list[PriorBatch], bs: int):
    """(batch i -> batch i with image embeddings from a fresh image tower on fixed images, the tower)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_cfg)).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (bs, 3, 224, 224), dtype=torch.uint8, generator=gen)
    mean = torch.tensor([0.481, 0.458, 0.408]).view(1, 3, 1, 1)
    std = torch.tensor([0.269, 0.261, 0.276]).view(1, 3, 1, 1)

    @torch.no_grad()
    def encode(i: int) -> PriorBatch:
        pixels = (images.float() / 255.0 - mean) / std
        b = in_memory[i]
        return PriorBatch(vision(pixel_values=pixels).image_embeds, b.text_embed, b.text_hidden, b.text_mask)

    return encode, vision


def time_rounds(modes: dict, rounds: int, k: int) -> tuple[list[float], list[float], dict[str, float]]:
    """(memory/store time ratios, clip/store time ratios, total seconds per mode) over `rounds` rounds.

    Interleaved: shared machines drift, so each store step is paired with the memory step right
    before it, each clip step with the store step before it; ratios are medians over the pairs.
    """
    ratios_input, ratios_cache = [], []
    totals = dict.fromkeys(modes, 0.0)
    for r in range(rounds):
        idx = list(range(1 + r * k, 1 + (r + 1) * k))
        for i in idx:
            t_mem, t_store = seconds(modes["memory"], i), seconds(modes["store"], i)
            ratios_input.append(t_mem / t_store)
            totals["memory"] += t_mem
            totals["store"] += t_store
        t_clip = seconds(modes["clip"], idx[0])
        totals["clip"] += t_clip
        ratios_cache.append(t_clip / t_store)
        print(f"round {r}: memory {1 / t_mem:.3f}, store {1 / t_store:.3f}, clip {1 / t_clip:.3f} steps/s "
              f"(last step of each)")
    return ratios_input, ratios_cache, totals


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    bs, k = args.batch_size, args.steps
    n_batches = 1 + args.rounds * k  # one warm-up batch, then k per round
    vision_cfg, prior_cfg = scaled_pair(args.width_scale, args.depth_scale)
    dim = prior_cfg["embedding_dim"]
    real_v, real_p, real_speedup = predicted_speedup(VISION_TOWERS[PAIR], preset_config(PAIR))
    v_gflop, p_gflop, scaled_speedup = predicted_speedup(vision_cfg, prior_cfg)

    with tempfile.TemporaryDirectory() as tmp:
        rows = n_batches * bs + 64
        t0 = time.perf_counter()
        write_synthetic_store(tmp, rows=rows, dim=dim, shards=4, seed=0, tokens=(5, 30))
        store = EmbeddingStore(tmp)
        print(f"store: {rows} rows, D=H={dim}, 5-30 tokens/caption, written in {time.perf_counter() - t0:.1f} s")

        def fresh_step():
            torch.manual_seed(0)
            return make_step(PriorTransformer(**prior_cfg))

        def loader() -> StoreLoader:
            return StoreLoader(store, bs, seed=0, infinite=True, prefetch=4, pad_on_device=True)

        # memory: exactly the batches the store mode reads, already converted
        it = iter(loader())
        in_memory = [next(it).to("cpu") for _ in range(n_batches)]
        it.close()
        encode, vision = clip_mode_batches(vision_cfg, in_memory, bs)

        memory_step, store_step, clip_step = fresh_step(), fresh_step(), fresh_step()
        stream = iter(loader())
        modes = {
            "memory": lambda i: memory_step(in_memory[i]),
            "store": lambda i: store_step(next(stream).to("cpu")),  # read, pad, wrap, cast: all timed
            "clip": lambda i: clip_step(encode(i)),
        }
        print(f"scaled pair (widths x {args.width_scale}, depths x {args.depth_scale}): image tower "
              f"{count_parameters(vision):,} parameters (width {vision_cfg['hidden_size']}, "
              f"{vision_cfg['num_hidden_layers']} layers), {v_gflop:.2f} GFLOP/image; prior "
              f"{count_parameters(PriorTransformer(**prior_cfg)):,} parameters (D={dim}, "
              f"{prior_cfg['num_layers']} layers), {p_gflop:.3f} GFLOP/sample forward+backward; "
              f"batch {bs}; {args.threads} threads")
        print(f"real pair: {TOWER_NAMES[PAIR]} image tower {real_v:.0f} GFLOP/image; 34M prior {real_p:.1f} "
              f"GFLOP/sample forward+backward")
        for run_one in modes.values():  # warm-up, untimed
            run_one(0)
        ratios_input, ratios_cache, totals = time_rounds(modes, args.rounds, k)
        stream.close()
        flops = {"memory": p_gflop, "store": p_gflop, "clip": v_gflop + p_gflop}
        for name, total in totals.items():
            sps = args.rounds * (1 if name == "clip" else k) / total
            print(f"{name:6s}: {sps:.3f} steps/s ({sps * bs:.1f} samples/s, {sps * bs * flops[name]:.1f} GFLOP/s), "
                  f"mean over rounds")

    print(f"FLOP model: cache speed-up {scaled_speedup:.1f}x for the scaled pair, {real_speedup:.1f}x for the real "
          f"pair; measured on the scaled pair: {statistics.median(ratios_cache):.1f}x")
    print(f"train_input_efficiency={statistics.median(ratios_input):.3f}")
    print(f"cache_speedup={statistics.median(ratios_cache):.2f}")
    print(f"cache_speedup_flop_model_real_pair={real_speedup:.1f}")


if __name__ == "__main__":
    main()
