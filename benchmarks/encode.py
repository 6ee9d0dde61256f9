"""Encode-stage efficiency: the full shard -> store path vs the bare model on the same batches.

Prints, last: encode_pipeline_efficiency=<x> = rows/s of `encode_shard` (tar read, JPEG
decode, the encoder's own preprocessing, image + text forward, fp16 store write) / rows/s
of the bare image + text forward on the same, already preprocessed batches. The CLIP is a
random CLIP of ViT-B/32's architecture (224 px; `--small` halves it), the smallest standard
CLIP, so the model dominates as it does on a GPU.

`--captions-per-image K` writes MS-COCO-like shards: each image carries K captions (the first in
KEY.txt, the others in KEY.json's `alt_captions`, as img2dataset saves MS-COCO's), so a shard gives
K rows per image. The bare model then does the least work those rows need: the image forward once
per distinct image and the text forward once per row. Also printed: encode_ms_per_row=<x>, the full
path's milliseconds per store row.
"""

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic inputs shared with the tests
from wdsfixtures import write_tar  # noqa: E402

from pipeline.encode import EncodeConfig, encode_shard, iter_webdataset  # noqa: E402
from pipeline.encoders import HFClipEncoder, build_tiny_tokenizer, get_encoder, save_encoder  # noqa: E402
from storage_schema import EncoderInfo  # noqa: E402

# openai/clip-vit-base-patch32's architecture (random weights): the smallest standard CLIP.
VIT_B32 = dict(vision_width=768, vision_layers=12, text_width=512, text_layers=12, dim=512)
SMALL = dict(vision_width=384, vision_layers=6, text_width=384, text_layers=6, dim=384)


def build_cpu_clip(path: Path, vision_width: int, vision_layers: int, text_width: int, text_layers: int,
                   dim: int) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=224, patch_size=32, hidden_size=vision_width, intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers, num_attention_heads=vision_width // 64, projection_dim=dim))
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_layers,
        num_attention_heads=text_width // 64, projection_dim=dim, max_position_embeddings=77,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    info = EncoderInfo(preset="bench-cpu-clip", image_model="bench/vision", text_model="bench/text",
                       image_dim=dim, text_dim=dim, hidden_dim=text_width, tokenizer="bench/tok", context_length=77)
    enc = HFClipEncoder(vision, text, tok, CLIPImageProcessor(), info, torch.device("cpu"), torch.float32)
    save_encoder(enc, path)


def make_shards(img_dir: Path, shards: int, per_shard: int, size: int = 256, captions_per_image: int = 1) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            captions = [f"a photo of object number {i} on a wooden table in shard {s}, view {c}"
                        for c in range(captions_per_image)]
            samples.append({"key": f"{s:05d}{i:04d}", "jpg": buf.getvalue(), "txt": captions[0],
                            "alt_captions": captions[1:]})
        write_tar(img_dir / f"{s:05d}.tar", samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--small", action="store_true", help="a half-width 6-layer CLIP instead of ViT-B/32 (faster)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-threads", type=int, default=EncodeConfig.decode_threads)
    ap.add_argument("--captions-per-image", type=int, default=1, help="rows per image (MS-COCO: 5)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_cpu_clip(tmp / "clip", **(SMALL if args.small else VIT_B32))
        make_shards(tmp / "img", args.shards, args.per_shard, captions_per_image=args.captions_per_image)
        cfg = EncodeConfig(encoder=str(tmp / "clip"), batch_size=args.batch_size, decode_threads=args.decode_threads)
        enc = get_encoder(cfg.encoder)  # the pipeline reuses this cached instance
        tars = sorted((tmp / "img").glob("*.tar"))

        # Bare model: the same images (once each) and captions in batches, decoded and preprocessed beforehand.
        pixel_batches, caption_batches = [], []
        for tar in tars:
            rows = list(iter_webdataset(tar, alt_captions=True))
            images = list({s.image: None for s in rows})  # distinct images, in order
            for i in range(0, len(images), args.batch_size):
                part = images[i : i + args.batch_size]
                pixel_batches.append(enc.preprocess([Image.open(io.BytesIO(b)).convert("RGB") for b in part]))
            for i in range(0, len(rows), args.batch_size):
                caption_batches.append([s.caption for s in rows[i : i + args.batch_size]])
        n = sum(len(c) for c in caption_batches)
        with torch.inference_mode():
            enc.encode_images(pixel_batches[0][:2])  # warm-up

        def bare_pass() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                for px in pixel_batches:
                    enc.encode_images(px)
                for caps in caption_batches:
                    enc.encode_texts(caps)
            return n / (time.perf_counter() - t0)

        def full_pass(store: Path) -> float:
            t0 = time.perf_counter()
            rows = sum(encode_shard(tar, store, cfg).rows for tar in tars)
            assert rows == n
            return rows / (time.perf_counter() - t0)

        # Alternate the two and keep each one's best round: the machine is shared and noisy.
        bare = full = 0.0
        for r in range(args.rounds):
            bare = max(bare, bare_pass())
            full = max(full, full_pass(tmp / f"store{r}"))
        images = sum(len(px) for px in pixel_batches)
        print(f"rows={n} images={images} batch={args.batch_size} torch_threads={torch.get_num_threads()}")
        print(f"bare model: {bare:.1f} rows/s; full shard->store path: {full:.1f} rows/s")
        print(f"encode_ms_per_row={1000 / full:.2f}")
        print(f"encode_pipeline_efficiency={full / bare:.3f}")


if __name__ == "__main__":
    main()
