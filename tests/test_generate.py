"""Images from our prior through tiny random Kandinsky 2.2 and Karlo decoders built from configs;
image metrics with a tiny random CLIP; the missing-weights messages. Nothing is downloaded."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from tinymodels import build_tiny_decoder, save_tiny_clip_scorer

from evaluation.decoders import DECODERS, Decoder
from evaluation.generate import decoder_for, default_image_name, generate, slug
from evaluation.image_metrics import ClipImageScorer, ImageMetricUnavailable, fid_between, pickscore_preference
from evaluation.priors import open_prior, prior_encoder, prompt_embeddings
from evaluation.weights import WeightsMissingError
from pipeline.encoders import load_encoder, save_encoder
from training.prior import build_prior

DIM = 32
PROMPT = "a red car and a blue bench"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build_prior("tiny", embedding_dim=DIM).save_pretrained(root / "prior")
        build_prior("tiny", embedding_dim=16).save_pretrained(root / "prior16")
    return {
        "root": root, "prior": root / "prior", "prior16": root / "prior16",
        "encoder": save_encoder(load_encoder("tiny-clip", device="cpu"), root / "encoder"),
        "kandinsky22": build_tiny_decoder("kandinsky22", root / "kandinsky22", DIM),
        "karlo": build_tiny_decoder("karlo", root / "karlo", DIM),
        "clip": save_tiny_clip_scorer(root / "clip"),
    }


def _gen(parts, decoder, seed=0, **kw):
    return generate(PROMPT, parts["prior"], decoder, parts[decoder], seed=seed, steps=2, encoder=parts["encoder"],
                    height=64, width=64, device="cpu", **kw)


def test_kandinsky_generates_deterministic_images(parts, tmp_path):
    out = tmp_path / "img.png"
    a = _gen(parts, "kandinsky22", out=out)
    assert isinstance(a, Image.Image) and a.size == (64, 64)
    saved = Image.open(out)
    assert saved.text["prompt"] == PROMPT and saved.text["seed"] == "0"
    assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(a))
    b = _gen(parts, "kandinsky22")
    c = _gen(parts, "kandinsky22", seed=1)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # the negative image embedding from a negative prompt (through our prior) instead of the zero image
    d = _gen(parts, "kandinsky22", negative_prompt="blurry")
    assert not np.array_equal(np.asarray(a), np.asarray(d))


def test_karlo_generates_with_our_embedding(parts):
    dec = Decoder.load("karlo", parts["karlo"], "cpu")
    assert dec.pipe.prior is None  # Karlo's own prior is never loaded
    handle = open_prior(parts["prior"], "cpu")
    enc = prior_encoder(handle, parts["encoder"], "cpu")
    emb = prompt_embeddings(handle, enc, [PROMPT, PROMPT], seed=0)
    assert not torch.equal(emb[0], emb[1])  # each row draws its own noise from the seeded generator
    assert torch.equal(emb, prompt_embeddings(handle, enc, [PROMPT, PROMPT], seed=0))
    # one batch: our embedding and its negation; the decoder must see the difference
    imgs = dec.decode(torch.cat([emb[:1], -emb[:1]]), [PROMPT, PROMPT], seed=0, steps=2, super_res_steps=2)
    assert [im.size for im in imgs] == [(64, 64), (64, 64)]
    assert not np.array_equal(np.asarray(imgs[0]), np.asarray(imgs[1]))
    again = dec.decode(emb[:1], [PROMPT], seed=0, steps=2, super_res_steps=2)[0]
    assert np.array_equal(np.asarray(again), np.asarray(dec.decode(emb[:1], [PROMPT], seed=0, steps=2,
                                                                   super_res_steps=2)[0]))
    assert _gen(parts, "karlo", super_res_steps=2).size == (64, 64)  # the generate() entry point
    with pytest.raises(ValueError, match="negative"):
        _gen(parts, "karlo", negative_prompt="blurry")


def test_the_decoder_comes_from_the_prior_and_a_mismatch_fails_before_any_weights_load(parts, tmp_path, monkeypatch):
    small = open_prior(parts["prior"], "cpu")  # D=32: no released decoder takes it
    for asked in (None, "kandinsky22"):
        with pytest.raises(ValueError, match="predicts D=32 image embeddings") as e:
            generate(PROMPT, parts["prior"], asked, None, encoder=parts["encoder"], device="cpu")
        assert "precompute --encoder" in str(e.value)
    with pytest.raises(ValueError, match="but the karlo decoder takes D=768"):
        decoder_for(small, "karlo", None)
    with pytest.raises(ValueError, match="pass --decoder"):
        decoder_for(small, None, parts["kandinsky22"])
    assert decoder_for(small, "kandinsky22", parts["kandinsky22"]) == "kandinsky22"  # a folder: checked once loaded
    build_prior("tiny", embedding_dim=768).save_pretrained(tmp_path / "p768")
    assert decoder_for(open_prior(tmp_path / "p768", "cpu"), None, None) == "karlo"
    small.encoder_info = {"preset": "karlo"}  # a run's record wins over the D
    assert decoder_for(small, None, parts["karlo"]) == "karlo"
    # offline: the hub decoder is looked up in the cache only, and its absence named
    monkeypatch.setenv("ECLIPSE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsMissingError, match="kakaobrain/karlo-v1-alpha"):
        generate(PROMPT, tmp_path / "p768", None, None, encoder=parts["encoder"], device="cpu")


def test_decoder_kinds_and_file_names():
    assert DECODERS == ("kandinsky22", "karlo")
    assert slug("A red car, and a BLUE bench!") == "a-red-car-and-a-blue-bench" and slug("!!") == "image"
    assert default_image_name(PROMPT, 3) == "a-red-car-and-a-blue-bench-seed3.png"
    with pytest.raises(ValueError, match="unknown decoder 'dalle2'; choose one of \\['kandinsky22', 'karlo'\\]"):
        build_tiny_decoder("dalle2", "unused")


def test_missing_decoder_weights_say_what_is_missing(parts, tmp_path):
    missing = tmp_path / "no-such-decoder"
    with pytest.raises(WeightsMissingError) as e:
        generate(PROMPT, parts["prior"], "kandinsky22", missing, encoder=parts["encoder"], device="cpu")
    assert str(missing) in str(e.value) and "Kandinsky 2.2 decoder" in str(e.value)
    assert "kandinsky-community/kandinsky-2-2-decoder" in str(e.value)  # where to get them
    # the hub id, not in the local cache, with downloads off
    with pytest.raises(WeightsMissingError, match="kakaobrain/karlo-v1-alpha"):
        Decoder.load("karlo", None, "cpu", local_files_only=True)
    with pytest.raises(ValueError, match="unknown decoder"):
        Decoder.load("dalle2", None, "cpu")


def test_prior_and_decoder_dims_must_agree(parts):
    dec = Decoder.load("kandinsky22", parts["kandinsky22"], "cpu")
    assert dec.embedding_dim == DIM
    with pytest.raises(ValueError, match="D=16"):
        dec.check_prior(open_prior(parts["prior16"], "cpu"))
    with pytest.raises(ValueError, match="not recorded"):
        prior_encoder(open_prior(parts["prior"], "cpu"))  # a bare prior folder: name its encoder
    with pytest.raises(FileNotFoundError, match="no such folder"):
        open_prior(parts["root"] / "nothing")
    (parts["root"] / "empty").mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="not a prior folder"):
        open_prior(parts["root"] / "empty")


def _clip_cosines(folder, images, prompts) -> tuple[torch.Tensor, float]:
    """cos(image_i, prompt_i) through CLIPModel's separate image and text towers (the scorer runs them jointly)."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)

    def features(out):  # a tensor in older transformers, an output with the projection in pooler_output in 5.x
        return out if torch.is_tensor(out) else out.pooler_output

    with torch.no_grad():
        img = features(model.get_image_features(**proc(images=images, return_tensors="pt")))
        txt = features(model.get_text_features(**proc(text=prompts, return_tensors="pt", padding=True)))
    return torch.nn.functional.cosine_similarity(img, txt), model.logit_scale.exp().item()


def test_clip_and_pick_scores(parts):
    images = [_gen(parts, "kandinsky22", seed=s) for s in range(2)]
    clip = ClipImageScorer.load("clipscore", parts["clip"], device="cpu")
    s = clip.score(images, [PROMPT, "a dog"])
    cos, logit_scale = _clip_cosines(parts["clip"], images, [PROMPT, "a dog"])
    assert s == pytest.approx((100 * cos.clamp_min(0)).numpy(), abs=1e-3)  # CLIPScore: 100 max(cos, 0)
    pick = ClipImageScorer.load("pickscore", parts["clip"], device="cpu")
    p = pick.score(images, [PROMPT, PROMPT])
    cos, _ = _clip_cosines(parts["clip"], images, [PROMPT, PROMPT])
    assert p == pytest.approx((logit_scale * cos).numpy(), abs=1e-4)  # PickScore: logit scale x cos
    pref = pickscore_preference(p, p[::-1])
    assert pref["hard"].tolist() in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5])
    assert np.allclose(pref["soft"] + pref["soft"][::-1], 1.0)
    same = pickscore_preference(p, p)
    assert np.all(same["hard"] == 0.5) and np.allclose(same["soft"], 0.5)


def test_missing_scorer_weights_say_what_is_missing(tmp_path):
    with pytest.raises(WeightsMissingError, match="openai/clip-vit-large-patch14"):
        ClipImageScorer.load("clipscore", device="cpu")  # default id, local files only
    with pytest.raises(WeightsMissingError, match="PickScore model") as e:
        ClipImageScorer.load("pickscore", tmp_path / "pickscore", device="cpu")
    assert "yuvalkirstain/PickScore_v1" in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("torchmetrics") is not None or importlib.util.find_spec("cleanfid")
                    is not None, reason="an FID library is installed here")
def test_fid_without_a_library_says_so():
    im = Image.new("RGB", (32, 32))
    with pytest.raises(ImageMetricUnavailable, match="neither torchmetrics .* nor clean-fid is installed"):
        fid_between([im, im], [im, im])


def test_diffusion_prior_is_sampled_with_its_own_scheduler(tmp_path):
    """The diffusion baseline (diffusers' PriorTransformer with a time embedding) is recognised from its
    config and sampled (25 DDPM steps, guidance) instead of run once."""
    from training.objectives import make_objective

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        make_objective("diffusion").build_model("tiny", DIM).save_pretrained(tmp_path / "diffusion")
    handle = open_prior(tmp_path / "diffusion", "cpu")
    assert handle.objective_name == "diffusion" and handle.text_length == 77
    rng = np.random.default_rng(0)
    text = rng.standard_normal((3, DIM)).astype(np.float32)
    hidden = rng.standard_normal((3, 77, DIM)).astype(np.float32)
    mask = np.arange(77)[None, :] < np.array([[5], [9], [3]])
    a = handle.predict_numpy(text, hidden, mask, seed=0)
    assert a.shape == (3, DIM) and np.isfinite(a).all()
    assert np.array_equal(a, handle.predict_numpy(text, hidden, mask, seed=0))
    assert not np.array_equal(a, handle.predict_numpy(text, hidden, mask, seed=1))


def test_cli_entry(parts, tmp_path, monkeypatch, capsys):
    from cli.main import main

    argv = ["generate", PROMPT, "--prior", str(parts["prior"]), "--decoder", "kandinsky22", "--decoder-path",
                              str(parts["kandinsky22"]), "--steps", "2", "--encoder", str(parts["encoder"]),
            "--height", "64", "--width", "64", "--device", "cpu"]
    monkeypatch.chdir(tmp_path)  # the default output file lands in the working directory
    assert main(argv) == 0
    written = capsys.readouterr().out.strip()
    assert written == "a-red-car-and-a-blue-bench-seed0.png"
    assert Image.open(tmp_path / written).size == (64, 64)


def _count_calls(*modules):
    """Forward calls per module, counted by hooks; returns (counts, hook handles)."""
    counts = [0] * len(modules)

    def hook_for(i):
        def hook(*_):
            counts[i] += 1
        return hook

    return counts, [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]


def test_decoder_steps_reach_each_stage(parts):
    """steps drives the decoder's denoising loop; Karlo's super_res_steps drives its super-resolution loop
    (all but the last step in super_res_first, the last in super_res_last, as UnCLIPPipeline does)."""
    emb = torch.randn(1, DIM, generator=torch.Generator().manual_seed(0))
    kand = Decoder.load("kandinsky22", parts["kandinsky22"], "cpu")
    assert type(kand.pipe.scheduler).__name__ == "DDIMScheduler"  # the paper's DDIM decoder sampling
    counts, hooks = _count_calls(kand.pipe.unet)
    kand.decode(emb, negative_image_embeds=torch.zeros(1, DIM), steps=3, height=64, width=64)
    assert counts == [3]  # one batched (conditional + unconditional) UNet call per step
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="super-resolution steps are Karlo's"):
        kand.decode(emb, negative_image_embeds=torch.zeros(1, DIM), steps=3, super_res_steps=2)

    karlo = Decoder.load("karlo", parts["karlo"], "cpu")
    assert {type(karlo.pipe.decoder_scheduler).__name__, type(karlo.pipe.super_res_scheduler).__name__} == {
        "UnCLIPScheduler"}
    counts, hooks = _count_calls(karlo.pipe.decoder, karlo.pipe.super_res_first, karlo.pipe.super_res_last)
    karlo.decode(emb, [PROMPT], steps=3, super_res_steps=4)
    assert counts == [3, 3, 1]
    karlo.decode(emb, [PROMPT])  # the defaults: 25 decoder and 7 super-resolution steps
    assert counts == [3 + 25, 3 + 6, 1 + 1]
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="at least 2 steps"):
        karlo.decode(emb, [PROMPT], steps=3, super_res_steps=1)


def test_cli_exposes_decoder_and_super_resolution_steps(parts, tmp_path, capsys):
    from cli.main import main

    out = tmp_path / "karlo.png"
    argv = ["generate", PROMPT, "--prior", str(parts["prior"]), "--decoder", "karlo", "--decoder-path",
            str(parts["karlo"]), "--decoder-steps", "2", "--super-res-steps", "3", "--encoder", str(parts["encoder"]),
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    got = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(got, np.asarray(_gen(parts, "karlo", super_res_steps=3)))  # _gen: steps=2
    assert not np.array_equal(got, np.asarray(_gen(parts, "karlo", super_res_steps=2)))
    capsys.readouterr()
    # Kandinsky has no super-resolution stage: refused before any weights load (this folder does not exist).
    argv = ["generate", PROMPT, "--prior", str(parts["prior"]), "--decoder", "kandinsky22", "--decoder-path",
            str(tmp_path / "no-such-decoder"), "--super-res-steps", "3", "--device", "cpu"]
    assert main(argv) == 1
    assert "super-resolution steps are Karlo's" in capsys.readouterr().err
