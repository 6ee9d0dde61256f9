"""Training input efficiency and cache speed-up, measured side by side in one run (CPU-sized).

    python benchmarks/train.py [--rounds 6] [--batch-size 32]

Three ways to run the same training steps (same prior, same batches, same optimizer):
  memory  batches already in memory as device tensors: the model alone
  store   batches streamed from an embedding store by training.data.StoreLoader (read-ahead thread)
  clip    every batch encoded on the fly by a CLIP (vision + text towers) from in-memory images
          and token ids, then the same step: what training without the cache costs. Images are
          already decoded and resized here, so this is a lower bound on the on-the-fly cost.

The modes alternate step by step and the ratios are medians over adjacent pairs of steps:
this machine is shared and its speed drifts by 2-5x within a minute. Prints, as its last lines:
  train_input_efficiency=<steps/s from the store / steps/s from memory>   (goal >= 0.95)
  cache_speedup=<steps/s from the store / steps/s with on-the-fly CLIP>

Sizes are scaled to a 2-core CPU and stated in the output: the store has the kandinsky22
dims (D = H = 1280, ~17 real tokens per caption, so the bytes per sample are real); the prior
is the released ECLIPSE width (16 heads x 32) with fewer layers; the CLIP is a random,
shallow transformers CLIP with the same output dims. On a GPU the prior step is far cheaper
relative to reading, so run this there too before trusting the first ratio for GPU training.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage_schema import EmbeddingStore  # noqa: E402
from training.data import StoreLoader, write_synthetic_store  # noqa: E402
from training.objectives import EclipseObjective, PriorBatch  # noqa: E402
from training.prior import PriorTransformer, count_parameters, preset_config  # noqa: E402

D = 1280  # kandinsky22: image/text embedding dim and text tower width


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


def build_clip(dim: int, seed: int = 0):
    """A random, shallow transformers CLIP with kandinsky22 output dims (projection D, text width D)."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12, image_size=224,
        patch_size=32, projection_dim=dim)).eval()
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=2, num_attention_heads=16,
        max_position_embeddings=77, projection_dim=dim, vocab_size=49408)).eval()
    return vision, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="rounds of k memory/store pairs + 1 clip step")
    ap.add_argument("--steps", type=int, default=2, help="memory and store steps per round (clip: 1)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2, help="prior layers (the released prior has 10)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bs, k = args.batch_size, args.steps
    n_batches = 1 + args.rounds * k  # one warm-up batch, then k per round

    with tempfile.TemporaryDirectory() as tmp:
        rows = n_batches * bs + 64
        t0 = time.perf_counter()
        write_synthetic_store(tmp, rows=rows, dim=D, shards=4, seed=0, tokens=(5, 30))
        store = EmbeddingStore(tmp)
        print(f"store: {rows} rows, D=H={D}, 5-30 tokens/caption, written in {time.perf_counter() - t0:.1f} s")
        cfg = preset_config("kandinsky22") | {"num_layers": args.layers}

        def fresh_step():
            torch.manual_seed(0)
            return make_step(PriorTransformer(**cfg))

        def loader() -> StoreLoader:
            return StoreLoader(store, bs, seed=0, infinite=True, prefetch=4)

        # memory: exactly the batches the store mode reads, already converted
        it = iter(loader())
        in_memory = [next(it).to("cpu") for _ in range(n_batches)]
        it.close()
        lengths = [b.text_mask.sum(1) for b in in_memory]

        vision, text = build_clip(D)
        gen = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (bs, 3, 224, 224), dtype=torch.uint8, generator=gen)
        mean = torch.tensor([0.481, 0.458, 0.408]).view(1, 3, 1, 1)
        std = torch.tensor([0.269, 0.261, 0.276]).view(1, 3, 1, 1)

        @torch.no_grad()
        def encode(i: int) -> PriorBatch:
            pixels = (images.float() / 255.0 - mean) / std
            image_embeds = vision(pixel_values=pixels).image_embeds
            mask = torch.arange(77)[None] < lengths[i][:, None]
            ids = torch.randint(1, 49406, (bs, 77), generator=gen) * mask
            ids[torch.arange(bs), lengths[i] - 1] = 49407  # EOS (the highest id) ends each caption
            out = text(input_ids=ids, attention_mask=mask.long())
            hidden = out.last_hidden_state * mask[..., None]
            return PriorBatch(image_embeds, out.text_embeds, hidden, mask)

        memory_step, store_step, clip_step = fresh_step(), fresh_step(), fresh_step()
        stream = iter(loader())
        modes = {
            "memory": lambda i: memory_step(in_memory[i]),
            "store": lambda i: store_step(next(stream).to("cpu")),  # read, pad, wrap, cast: all timed
            "clip": lambda i: clip_step(encode(i)),
        }
        print(f"prior: ECLIPSE layout, D={D}, {args.layers} layers, "
              f"{count_parameters(PriorTransformer(**cfg)):,} parameters; batch {bs}; {args.threads} threads; "
              f"CLIP: vision {count_parameters(vision):,} + text {count_parameters(text):,} parameters")
        for run_one in modes.values():  # warm-up, untimed
            run_one(0)
        # Interleaved: shared machines drift, so each store step is paired with the memory step right
        # before it, each clip step with the store step before it; ratios are medians over the pairs.
        ratios_input, ratios_cache = [], []
        totals = dict.fromkeys(modes, 0.0)
        for r in range(args.rounds):
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
        stream.close()
        for name, total in totals.items():
            sps = args.rounds * (1 if name == "clip" else k) / total
            print(f"{name:6s}: {sps:.3f} steps/s ({sps * bs:.1f} samples/s), mean over rounds")

    print(f"train_input_efficiency={statistics.median(ratios_input):.3f}")
    print(f"cache_speedup={statistics.median(ratios_cache):.2f}")


if __name__ == "__main__":
    main()
