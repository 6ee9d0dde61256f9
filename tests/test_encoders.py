"""CLIP encoder backends: outputs equal a direct transformers/open_clip forward; folders round-trip.

Everything runs on tiny random models built from configs: no test downloads weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from pipeline.encoders import (
    ENCODER_PRESETS,
    ClipEncoder,
    build_tiny_tokenizer,
    check_encoder,
    clear_encoder_cache,
    get_encoder,
    load_encoder,
    resolve_device_dtype,
    save_encoder,
)
from pipeline.errors import EncoderLoadError

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5
CAPTIONS = [
    "a photo of a cat",
    "A Painting of two red horses standing on the beach at sunset, café-style, 🚀!",
    "x",
    "a photo of a dog " * 30,  # ~150 tokens: over the 77-token context
]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Odd sizes and a grayscale image: the encoder's own processor must resize, crop and convert.
    shapes = [(40, 50, 3), (64, 33, 3), (32, 32, 3), (45, 45)]
    return [Image.fromarray(rng.integers(0, 256, shapes[i % 4], dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny() -> ClipEncoder:
    return load_encoder("tiny-clip", device="cpu")


@pytest.fixture(scope="module")
def tiny_dir(tiny: ClipEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_encoder(tiny, tmp_path_factory.mktemp("enc") / "tiny-clip")


def _check_against_hf(enc: ClipEncoder, vision, text, tokenizer, processor, captions=CAPTIONS) -> None:
    """encoder outputs == a direct forward of the transformers classes on the same inputs."""
    images = _images(4)
    pixels = enc.preprocess(images)
    ref_pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, ref_pixels.float(), atol=0, rtol=0)
    with torch.inference_mode():
        ref_img = vision(pixel_values=pixels).image_embeds
        # The reference pads to 77 and passes the mask, as the ECLIPSE/Kandinsky pipelines do.
        tok = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ref = text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    img = enc.encode_images(pixels)
    assert img.shape == (4, enc.info.image_dim) and img.dtype == torch.float32
    torch.testing.assert_close(img, ref_img, atol=ATOL, rtol=1e-4)
    # Raw, not L2-normalised.
    assert not torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-3)

    out = enc.encode_texts(captions)
    assert out.text_embeds.shape == (len(captions), enc.info.text_dim)
    torch.testing.assert_close(out.text_embeds, ref.text_embeds, atol=ATOL, rtol=1e-4)
    lengths = tok["attention_mask"].sum(1).tolist()
    assert out.lengths == lengths
    for i, n in enumerate(lengths):
        assert out.hidden[i].shape == (n, enc.info.hidden_dim)
        assert out.hidden[i].dtype == np.float32
        np.testing.assert_allclose(out.hidden[i], ref.last_hidden_state[i, :n].numpy(), atol=ATOL, rtol=1e-4)
        # BOS..EOS: the last real token is the EOS the projection pools from.
        assert tok["input_ids"][i, n - 1].item() == tokenizer.eos_token_id
    assert out.truncated == [False, False, False, True]


def test_tiny_clip_matches_direct_transformers_forward(tiny: ClipEncoder, tiny_dir: Path) -> None:
    # Reference models are independent objects loaded back from the saved subfolders.
    _check_against_hf(
        tiny,
        CLIPVisionModelWithProjection.from_pretrained(tiny_dir / "image_encoder").eval(),
        CLIPTextModelWithProjection.from_pretrained(tiny_dir / "text_encoder").eval(),
        CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer"),
        CLIPImageProcessor.from_pretrained(tiny_dir / "image_processor"),
    )
    info = tiny.info
    assert (info.preset, info.image_dim, info.text_dim, info.hidden_dim, info.context_length) == (
        "tiny-clip", 32, 32, 32, 77)


def test_hidden_states_do_not_depend_on_padding(tiny: ClipEncoder) -> None:
    short = CAPTIONS[0]
    alone = tiny.encode_texts([short])
    batched = tiny.encode_texts([short, CAPTIONS[3], CAPTIONS[1]])  # padded to 77 in the batch
    np.testing.assert_allclose(alone.hidden[0], batched.hidden[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(alone.text_embeds[0], batched.text_embeds[0], atol=ATOL, rtol=1e-4)


def test_truncation_flag_and_exact_fit(tiny: ClipEncoder) -> None:
    # "a" is one token: 75 of them + BOS + EOS fill the 77 positions exactly; 76 overflow.
    out = tiny.encode_texts(["a " * 75, "a " * 76, CAPTIONS[3], "a cat"])
    assert out.truncated == [False, True, True, False]
    assert out.lengths[:3] == [77, 77, 77]
    np.testing.assert_allclose(out.hidden[0], out.hidden[1], atol=ATOL)  # truncated to the same tokens


def test_shared_encoder_is_safe_across_threads(tiny: ClipEncoder) -> None:
    # Dask runs several tasks per worker on one cached encoder.
    from concurrent.futures import ThreadPoolExecutor

    ref = tiny.encode_texts(CAPTIONS).text_embeds
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: tiny.encode_texts(CAPTIONS).text_embeds, range(16)))
    for o in outs:
        torch.testing.assert_close(o, ref, atol=ATOL, rtol=1e-4)


def test_tiny_clip_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b = load_encoder("tiny-clip", device="cpu"), load_encoder("tiny-clip", device="cpu")
    assert torch.equal(state, torch.random.get_rng_state())
    for m in ("vision", "text"):
        sa, sb = getattr(a, m).state_dict(), getattr(b, m).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(a.encode_texts(CAPTIONS).text_embeds, b.encode_texts(CAPTIONS).text_embeds,
                               atol=0, rtol=0)


def test_save_and_load_round_trip(tiny: ClipEncoder, tiny_dir: Path) -> None:
    assert {p.name for p in tiny_dir.iterdir()} >= {"encoder.json", "image_encoder", "text_encoder",
                                                    "tokenizer", "image_processor"}
    back = load_encoder(tiny_dir, device="cpu")
    assert back.info == tiny.info  # a snapshot keeps the identity the store checks
    pixels = tiny.preprocess(_images(3))
    torch.testing.assert_close(back.preprocess(_images(3)), pixels, atol=0, rtol=0)
    torch.testing.assert_close(back.encode_images(pixels), tiny.encode_images(pixels), atol=0, rtol=0)
    a, b = tiny.encode_texts(CAPTIONS), back.encode_texts(CAPTIONS)
    torch.testing.assert_close(a.text_embeds, b.text_embeds, atol=0, rtol=0)
    assert all(np.array_equal(x, y) for x, y in zip(a.hidden, b.hidden, strict=True))
    with pytest.raises(FileExistsError):
        save_encoder(tiny, tiny_dir)


def _tiny_hf_parts(image_size: int, hidden: int, dim: int, seed: int):
    tok = build_tiny_tokenizer()
    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                              projection_dim=dim, eos_token_id=2)  # 2: legacy argmax pooling, as in the hub repos
    vision_cfg = CLIPVisionConfig(image_size=image_size, patch_size=16, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, projection_dim=dim)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return text_cfg, vision_cfg, tok, processor


def test_kandinsky22_shaped_folder_loads(tmp_path: Path) -> None:
    # The kandinsky-2-2-prior repo layout: diffusers subfolders, no encoder.json.
    text_cfg, vision_cfg, tok, processor = _tiny_hf_parts(image_size=64, hidden=40, dim=24, seed=1)
    vision, text = CLIPVisionModelWithProjection(vision_cfg).eval(), CLIPTextModelWithProjection(text_cfg).eval()
    vision.save_pretrained(tmp_path / "image_encoder")
    text.save_pretrained(tmp_path / "text_encoder")
    tok.save_pretrained(tmp_path / "tokenizer")
    processor.save_pretrained(tmp_path / "image_processor")
    (tmp_path / "prior").mkdir()  # the prior repo's other subfolders are ignored
    enc = load_encoder(tmp_path, device="cpu")
    assert (enc.info.image_dim, enc.info.text_dim, enc.info.hidden_dim) == (24, 24, 40)
    assert enc.image_size == (64, 64)
    assert enc.info.image_model.endswith("image_encoder")
    _check_against_hf(enc, vision, text, tok, processor)


def test_flat_clipmodel_folder_loads(tmp_path: Path) -> None:
    # The openai/clip-vit-large-patch14 layout (karlo): one CLIPModel checkpoint, files at the root.
    text_cfg, vision_cfg, tok, processor = _tiny_hf_parts(image_size=32, hidden=32, dim=16, seed=2)
    CLIPModel(CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(),
                         projection_dim=16)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    enc = load_encoder(str(tmp_path), device="cpu")
    _check_against_hf(enc, CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval(),
                      CLIPTextModelWithProjection.from_pretrained(tmp_path).eval(), tok, processor)


TINY_OPEN_CLIP = {
    "model_cfg": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 40, "heads": 4, "layers": 2},
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
}


def test_open_clip_backend(tmp_path: Path) -> None:
    import open_clip

    cfg_dir = tmp_path / "oc"
    cfg_dir.mkdir()
    (cfg_dir / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    torch.manual_seed(3)
    enc = load_encoder(f"open_clip:local-dir:{cfg_dir}", device="cpu")  # config only: random init
    assert (enc.info.image_dim, enc.info.text_dim, enc.info.hidden_dim, enc.info.context_length) == (24, 24, 40, 77)
    model = enc.model
    images = _images(4)
    pixels = enc.preprocess(images)
    assert pixels.shape == (4, 3, 32, 32)
    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{cfg_dir}")
    torch.testing.assert_close(pixels, torch.stack([transform(im) for im in images]), atol=0, rtol=0)

    tokenizer = open_clip.get_tokenizer(f"local-dir:{cfg_dir}")
    tokens = tokenizer(CAPTIONS)
    seen: list[torch.Tensor] = []  # the text tower's ln_final output == last_hidden_state
    hook = model.ln_final.register_forward_hook(lambda _m, _i, o: seen.append(o.detach().clone()))
    with torch.inference_mode():
        ref_img = model.encode_image(pixels)
        ref_txt = model.encode_text(tokens)
    hook.remove()
    torch.testing.assert_close(enc.encode_images(pixels), ref_img, atol=ATOL, rtol=1e-4)
    out = enc.encode_texts(CAPTIONS)
    torch.testing.assert_close(out.text_embeds, ref_txt, atol=ATOL, rtol=1e-4)
    lengths = (tokens.argmax(-1) + 1).tolist()  # SimpleTokenizer: EOS has the highest id
    assert out.lengths == lengths
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(out.hidden[i], seen[0][i, :n].numpy(), atol=ATOL, rtol=1e-4)
    assert out.truncated == [False, False, False, True]
    edge = enc.encode_texts(["a " * 75, "a " * 76])
    assert edge.truncated == [False, True] and edge.lengths == [77, 77]

    # Round trip through our folder layout, and by plain folder path.
    saved = save_encoder(enc, tmp_path / "saved")
    back = load_encoder(saved, device="cpu")
    assert back.info == enc.info
    torch.testing.assert_close(back.encode_images(pixels), enc.encode_images(pixels), atol=0, rtol=0)
    torch.testing.assert_close(back.encode_texts(CAPTIONS).text_embeds, out.text_embeds, atol=0, rtol=0)


def test_unknown_name_lists_presets(tmp_path: Path) -> None:
    with pytest.raises(EncoderLoadError) as err:
        load_encoder("kandinsky-2.2-typo")
    for preset in ENCODER_PRESETS:
        assert preset in str(err.value)
    with pytest.raises(EncoderLoadError, match="not an encoder folder"):
        load_encoder(tmp_path)  # an empty folder


def test_check_encoder_gives_the_store_label_or_the_problem_without_loading_weights(tiny_dir: Path,
                                                                                  tmp_path: Path) -> None:
    assert check_encoder("tiny-clip") == "tiny-clip"
    assert check_encoder(tiny_dir) == "tiny-clip"  # a saved folder keeps the identity it was saved with
    assert check_encoder("open_clip:ViT-B-32") == "open_clip:ViT-B-32"
    (tmp_path / "k" / "image_encoder").mkdir(parents=True)
    (tmp_path / "k" / "text_encoder").mkdir()
    assert check_encoder(tmp_path / "k") == str((tmp_path / "k").absolute())  # what load_encoder records
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    assert check_encoder(tmp_path / "oc") == load_encoder(tmp_path / "oc", device="cpu").info.preset
    (tmp_path / "empty").mkdir()
    for name, problem in (("kandinsky-2.2-typo", "not a preset and not a folder"),
                          (tmp_path / "empty", "not an encoder folder"),
                          ("open_clip:ViT-Q-99", "unknown open_clip model 'ViT-Q-99'"),
                          ("open_clip:ViT-B-32/laion9z", "no pretrained tag 'laion9z'; its tags: "),
                          (f"open_clip:local-dir:{tmp_path / 'nowhere'}", "does not exist")):
        with pytest.raises(EncoderLoadError, match=problem):
            check_encoder(name)


def test_check_encoder_fails_for_a_hub_preset_neither_cached_nor_reachable(tmp_path: Path) -> None:
    script = (
        "from pipeline.encoders import check_encoder\n"
        "from pipeline.errors import EncoderLoadError\n"
        "try:\n"
        "    check_encoder('karlo')\n"
        "except EncoderLoadError as e:\n"
        "    print('ERR', str(e).replace(chr(10), ' '))\n"
    )
    out = _run_offline(tmp_path / "hf", script)  # an empty cache
    assert "ERR could not load the image encoder config from 'openai/clip-vit-large-patch14'" in out
    assert "`hf download openai/clip-vit-large-patch14`" in out


def test_get_encoder_caches_per_process(tiny_dir: Path) -> None:
    clear_encoder_cache()
    try:
        a = get_encoder("tiny-clip", device="cpu")
        assert get_encoder("tiny-clip", device="cpu", dtype="float32") is a
        assert get_encoder("tiny-clip", device="cpu", dtype="bf16") is not a
        assert get_encoder(tiny_dir, device="cpu") is get_encoder(str(tiny_dir), device="cpu")
    finally:
        clear_encoder_cache()


def test_device_and_dtype_defaults_and_overrides() -> None:
    dev, dt = resolve_device_dtype()
    assert (dev.type, dt) == (("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32))
    assert resolve_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError):
        resolve_device_dtype("cpu", "int8")
    enc = load_encoder("tiny-clip", device="cpu", dtype=torch.bfloat16)
    assert enc.encode_images(enc.preprocess(_images(2))).dtype == torch.bfloat16
    out = enc.encode_texts(["a cat"])
    assert out.text_embeds.dtype == torch.bfloat16 and out.hidden[0].dtype == np.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_defaults_to_fp16_and_tracks_fp32(tiny: ClipEncoder) -> None:
    gpu = load_encoder("tiny-clip")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float16
    pixels = tiny.preprocess(_images(4))
    torch.testing.assert_close(gpu.encode_images(pixels).float().cpu(), tiny.encode_images(pixels),
                               atol=5e-3, rtol=5e-3)
    a, b = gpu.encode_texts(CAPTIONS), tiny.encode_texts(CAPTIONS)
    assert a.hidden[0].dtype == np.float16 and a.lengths == b.lengths
    torch.testing.assert_close(a.text_embeds.float().cpu(), b.text_embeds, atol=5e-3, rtol=5e-3)


def _hub_snapshot(hf_home: Path, repo_id: str, commit: str, files: Path) -> Path:
    """Publish the files under `files` into an HF cache as `hf download` leaves a repo: content in
    blobs/<sha256>, snapshots/<commit>/ made of relative symlinks to them, refs/main naming the commit."""
    root = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for f in sorted(x for x in files.rglob("*") if x.is_file()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        link = snapshot / f.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def _laion_shaped_repo(path: Path, text_cfg: CLIPTextConfig, vision_cfg: CLIPVisionConfig, tok, dim: int) -> CLIPModel:
    """A joint CLIPModel repo with the quirks of laion/CLIP-ViT-bigG-14-laion2B-39B-b160k's config.json:
    `projection_dim` is set only at the top level; the nested text_config / vision_config keep the
    default 512 (what a single tower reads, transformers#25622), and the legacy `*_config_dict` copies
    of that export era carry no projection_dim either. Weights sharded as on the hub."""
    nested = {"text_config": text_cfg.to_dict(), "vision_config": vision_cfg.to_dict()}
    for cfg in nested.values():
        cfg.pop("projection_dim", None)
    clip = CLIPModel(CLIPConfig(**nested, projection_dim=dim)).eval()
    clip.save_pretrained(path, max_shard_size="100KB")
    config = json.loads((path / "config.json").read_text())
    for sub in ("text_config", "vision_config"):
        config[sub]["projection_dim"] = 512
        config[f"{sub}_dict"] = {k: v for k, v in nested[sub].items() if k != "model_type"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    assert config["projection_dim"] == dim != 512 and len(list(path.glob("model-*.safetensors"))) > 1
    tok.save_pretrained(path)
    return clip


def _offline_env(hf_home: Path) -> dict[str, str]:
    # A subprocess: huggingface_hub reads HF_HUB_OFFLINE and the cache location at import time.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "TRANSFORMERS"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), PYTHONPATH=str(REPO))
    return env


def _run_offline(hf_home: Path, script: str) -> str:
    """stdout of `script` in a fresh interpreter with the hub offline and the cache at hf_home."""
    proc = subprocess.run([sys.executable, "-c", script], env=_offline_env(hf_home), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


class _JointTowers:
    """The two towers of a joint CLIPModel, called like CLIP{Vision,Text}ModelWithProjection: an
    independent reference built from the in-memory model, not from any loading path."""

    def __init__(self, clip: CLIPModel) -> None:
        self.clip = clip

    def vision(self, pixel_values: torch.Tensor) -> types.SimpleNamespace:
        out = self.clip.vision_model(pixel_values=pixel_values)
        return types.SimpleNamespace(image_embeds=self.clip.visual_projection(out.pooler_output))

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> types.SimpleNamespace:
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return types.SimpleNamespace(text_embeds=self.clip.text_projection(out.pooler_output),
                                     last_hidden_state=out.last_hidden_state)


def test_hub_presets_load_from_a_populated_cache_offline(tmp_path: Path) -> None:
    """The real preset code path (hub ids, subfolders, commit pinning) on tiny weights in an HF cache
    shaped like the real one, resolved by hub id with the hub offline."""
    hf_home, src = tmp_path / "hf", tmp_path / "src"
    torch.manual_seed(4)
    # kandinsky22: vision tower + processor from the prior repo's subfolders ...
    text_cfg, vision_cfg, tok, processor = _tiny_hf_parts(image_size=32, hidden=24, dim=24, seed=4)
    k_vision = CLIPVisionModelWithProjection(vision_cfg).eval()
    k_vision.save_pretrained(src / "prior" / "image_encoder")
    processor.save_pretrained(src / "prior" / "image_processor")
    _hub_snapshot(hf_home, "kandinsky-community/kandinsky-2-2-prior", "a" * 40, src / "prior")
    # ... text tower + tokenizer from LAION's joint repo, its config shaped like the real one.
    laion_clip = _laion_shaped_repo(src / "laion", text_cfg, vision_cfg, tok, dim=24)
    processor.save_pretrained(src / "laion")
    _hub_snapshot(hf_home, "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "b" * 40, src / "laion")
    # The same repo as an encoder folder: its vision tower has the same quirk (the case of transformers#25622).
    laion_dir = load_encoder(src / "laion", device="cpu")
    assert (laion_dir.info.image_dim, laion_dir.info.text_dim) == (24, 24)
    laion = _JointTowers(laion_clip)
    _check_against_hf(laion_dir, laion.vision, laion.text, tok, processor)
    # karlo: image tower + processor from openai's flat repo (which also holds a text tower, not used) ...
    text_cfg, vision_cfg, tok, processor = _tiny_hf_parts(image_size=32, hidden=32, dim=16, seed=5)
    openai_clip = CLIPModel(CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(),
                                       projection_dim=16)).eval()
    openai_clip.save_pretrained(src / "openai")
    tok.save_pretrained(src / "openai")
    processor.save_pretrained(src / "openai")
    _hub_snapshot(hf_home, "openai/clip-vit-large-patch14", "c" * 40, src / "openai")
    # ... text tower + tokenizer from Karlo's own subfolders (other weights: the test sees which one is read).
    karlo_text = CLIPTextModelWithProjection(text_cfg).eval()
    karlo_text.save_pretrained(src / "karlo" / "text_encoder")
    # diffusers' conversion gave Karlo's tokenizer the pad token "!"
    CLIPTokenizer.from_pretrained(src / "openai", pad_token="!").save_pretrained(src / "karlo" / "tokenizer")
    _hub_snapshot(hf_home, "kakaobrain/karlo-v1-alpha", "d" * 40, src / "karlo")

    script = (
        "import json, numpy as np\n"
        "from PIL import Image\n"
        "from pipeline.encoders import load_encoder\n"
        "img = Image.fromarray(np.arange(40 * 50 * 3, dtype=np.uint8).reshape(40, 50, 3))\n"
        "res = {}\n"
        "for name in ('kandinsky22', 'karlo'):\n"
        "    e = load_encoder(name, device='cpu')\n"
        "    t = e.encode_texts(['a photo of a cat', 'a red car'])\n"
        "    res[name] = {'info': e.info.to_dict(), 'img': e.encode_images(e.preprocess([img]))[0].tolist(),\n"
        "                 'txt': t.text_embeds.tolist(), 'hidden': [h.tolist() for h in t.hidden]}\n"
        "print('RESULT', json.dumps(res))\n"
    )
    res = json.loads(_run_offline(hf_home, script).split("RESULT ", 1)[1])
    img = Image.fromarray(np.arange(40 * 50 * 3, dtype=np.uint8).reshape(40, 50, 3))
    pixels = processor(images=[img], return_tensors="pt")["pixel_values"]  # both repos: the same tiny processor
    ids = tok(["a photo of a cat", "a red car"], padding=True, return_tensors="pt")
    for name, vision, text, commits in (
        ("kandinsky22", k_vision, laion.text, ("a" * 40, "b" * 40)),
        ("karlo", _JointTowers(openai_clip).vision, karlo_text, ("c" * 40, "d" * 40)),
    ):
        info = res[name]["info"]
        assert (info["preset"], info["image_revision"], info["text_revision"]) == (name, *commits)
        with torch.inference_mode():
            ref_img = vision(pixel_values=pixels).image_embeds[0]
            ref = text(input_ids=ids["input_ids"])
            ref_txt, ref_hidden = ref.text_embeds, ref.last_hidden_state
        assert info["image_dim"] == info["text_dim"] == ref_txt.shape[1]
        np.testing.assert_allclose(res[name]["img"], ref_img.numpy(), atol=ATOL, rtol=1e-4)
        np.testing.assert_allclose(res[name]["txt"], ref_txt.numpy(), atol=ATOL, rtol=1e-4)
        for i, n in enumerate(ids["attention_mask"].sum(1).tolist()):
            np.testing.assert_allclose(res[name]["hidden"][i], ref_hidden[i, :n].numpy(), atol=ATOL, rtol=1e-4)
    assert res["kandinsky22"]["info"]["image_model"] == "kandinsky-community/kandinsky-2-2-prior/image_encoder"
    assert res["kandinsky22"]["info"]["text_model"] == "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
    assert res["karlo"]["info"]["image_model"] == "openai/clip-vit-large-patch14"
    assert res["karlo"]["info"]["text_model"] == "kakaobrain/karlo-v1-alpha/text_encoder"
    assert res["karlo"]["info"]["tokenizer"] == "kakaobrain/karlo-v1-alpha/tokenizer"


def test_hub_preset_offline_fails_fast_with_clear_message(tmp_path: Path) -> None:
    script = (
        "import time\n"
        "from pipeline.encoders import load_encoder\n"
        "from pipeline.errors import EncoderLoadError\n"
        "for name in ('kandinsky22', 'karlo', 'open_clip:ViT-B-32/laion2b_s34b_b79k'):\n"
        "    t = time.monotonic()\n"
        "    try:\n"
        "        load_encoder(name, device='cpu')\n"
        "        print('LOADED', name)\n"
        "    except EncoderLoadError as e:\n"
        "        print('ERR', name, round(time.monotonic() - t, 1), str(e).replace(chr(10), ' '))\n"
    )
    out = _run_offline(tmp_path / "hf", script)  # an empty cache
    lines = [ln for ln in out.splitlines() if ln.startswith(("ERR", "LOADED"))]
    assert len(lines) == 3 and all(ln.startswith("ERR") for ln in lines), out
    kandinsky, karlo, oc = lines
    assert "kandinsky-community/kandinsky-2-2-prior/image_encoder" in kandinsky and "offline" in kandinsky
    assert "`hf download kandinsky-community/kandinsky-2-2-prior`" in kandinsky
    assert "pass an encoder folder" in kandinsky
    assert "`hf download openai/clip-vit-large-patch14`" in karlo
    assert "ViT-B-32/laion2b_s34b_b79k" in oc
    assert all(float(ln.split()[2]) < 30 for ln in lines), lines  # each fails fast: no network waits


def test_missing_text_repo_names_it(tmp_path: Path) -> None:
    """The image side is cached but LAION's text repo is not: the message names the text repo."""
    hf_home = tmp_path / "hf"
    text_cfg, vision_cfg, tok, processor = _tiny_hf_parts(image_size=32, hidden=24, dim=24, seed=6)
    CLIPVisionModelWithProjection(vision_cfg).save_pretrained(tmp_path / "prior" / "image_encoder")
    processor.save_pretrained(tmp_path / "prior" / "image_processor")
    _hub_snapshot(hf_home, "kandinsky-community/kandinsky-2-2-prior", "a" * 40, tmp_path / "prior")
    script = (
        "from pipeline.encoders import load_encoder\n"
        "from pipeline.errors import EncoderLoadError\n"
        "try:\n"
        "    load_encoder('kandinsky22', device='cpu')\n"
        "except EncoderLoadError as e:\n"
        "    print('ERR', str(e).replace(chr(10), ' '))\n"
    )
    out = _run_offline(hf_home, script)
    assert "ERR could not load the text encoder config from 'laion/CLIP-ViT-bigG-14-laion2B-39B-b160k'" in out
    assert "`hf download laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`" in out
