"""evaluate() end to end on a small store encoded with a tiny random CLIP (real writer, real encoder),
tiny priors saved with the training package, a tiny decoder and a tiny CLIP scorer."""

import importlib.util
import io
import json
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tinymodels import build_tiny_decoder, save_tiny_clip_scorer

from evaluation.evaluate import EvalConfig, evaluate, open_priors
from evaluation.image_metrics import ClipImageScorer, pickscore_preference
from evaluation.priors import open_prior, prior_encoder, read_training_log
from evaluation.split import SAMPLE_SALT_HELDOUT, SAMPLE_SALT_TRAIN, resolve_split
from evaluation.weights import WeightsMissingError
from pipeline.encoders import load_encoder, save_encoder
from storage_schema import EmbeddingStore, StoreError, StoreWriter, build_table
from training.data import is_heldout
from training.prior import build_prior

DIM = 32
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}
SHAPES = ("square", "circle")
FRACTION = 0.25


def render(color: str, shape: str, size: int) -> Image.Image:
    im = Image.new("RGB", (32, 32), (128, 128, 128))
    draw = ImageDraw.Draw(im)
    box = [16 - size, 16 - size, 16 + size, 16 + size]
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLORS[color])
    return im


def write_encoded_store(root, enc, shards: int = 3, rows: int = 40, seed: int = 0):
    """Captions and rendered images of colored shapes, encoded by `enc`, written with the store writer;
    the images also go into webdataset tars (img2dataset's KEY.png layout) for the image source."""
    rng = np.random.default_rng(seed)
    writer = StoreWriter(root / "store", enc.info)
    (root / "images").mkdir()
    for s in range(shards):
        keys, caps, ims = [], [], []
        for i in range(rows):
            c, sh = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            keys.append(f"{s:05d}{i:04d}")
            caps.append(f"a {c} {sh} on a table")
            ims.append(render(c, sh, int(rng.integers(5, 12))))
        out = enc.encode_texts(caps)
        img = enc.encode_images(enc.preprocess(ims))
        writer.write_shard(f"{s:05d}", build_table(
            enc.info, keys, caps, img.numpy().astype(np.float16), out.text_embeds.numpy().astype(np.float16),
            [h.astype(np.float16) for h in out.hidden], out.truncated))
        with tarfile.open(root / "images" / f"{s:05d}.tar", "w") as tar:
            for k, im in zip(keys, ims, strict=True):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                info = tarfile.TarInfo(f"{k}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
    return root / "store"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    enc = load_encoder(save_encoder(load_encoder("tiny-clip", device="cpu"), root / "encoder"), device="cpu")
    store = write_encoded_store(root, enc)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build_prior("tiny", embedding_dim=DIM).save_pretrained(root / "eclipse-a")
        build_prior("tiny", embedding_dim=DIM).save_pretrained(root / "eclipse-b")
    return {"root": root, "store": store, "priors": [root / "eclipse-a", root / "eclipse-b"],
            "kandinsky22": build_tiny_decoder("kandinsky22", root / "kandinsky22", DIM),
            "clip": save_tiny_clip_scorer(root / "clip")}


@pytest.fixture(scope="module")
def full(world):
    out = world["root"] / "out"
    res = evaluate(EvalConfig(
        world["priors"], world["store"], out, heldout_fraction=FRACTION, seeds=3, n_boot=200, max_prompts=6,
        prompt_categories=("color", "spatial"), image_source=world["root"] / "images", n_examples=3,
        decoder="kandinsky22", decoder_path=world["kandinsky22"], n_generate=2, decoder_steps=2, decoder_size=64,
        clip_model=world["clip"], pickscore_model=world["clip"], fid=True, device="cpu"))
    return res, out


def test_metrics_json_has_every_figure_with_its_interval(full, world):
    res, out = full
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["models"].keys() == res["models"].keys()
    assert list(res["models"]) == ["eclipse-a", "eclipse-b", "TextEmb", "text-shift", "mean-image", "ridge"]
    store = EmbeddingStore(world["store"])
    keys = [k for _, ks in store.keys() for k in ks]
    n_held = int(is_heldout(keys, FRACTION, 0).sum())
    assert res["split"]["heldout_rows"] == n_held == res["split"]["gallery_size"]
    assert res["split"]["train_rows_used"] + n_held == store.num_rows
    for name, m in res["models"].items():
        for key in ("cos_image", "cos_text", "cos_unrelated_text", "cos_image_minus_baseline", "r1", "r5", "r10",
                    "rank", "frechet", "norm_ratio", "mse"):
            s = m["metrics"][key]
            assert s["value"] is not None and s["ci"][0] <= s["value"] + 1e-9 and s["value"] <= s["ci"][1] + 1e-9, \
                (name, key, s)
        if m["kind"] == "prior":
            assert m["metrics"]["cos_image"]["seeds"] == 3 and len(m["metrics"]["frechet"]["seed_values"]) == 3
    te = res["models"]["TextEmb"]["metrics"]
    assert te["cos_text"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert te["cos_image_minus_baseline"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert res["dataset"]["cos_text_image"]["value"] == pytest.approx(te["cos_image"]["value"])
    # the trivial baselines that see the training split beat the raw text embedding on the gap
    for name in ("text-shift", "ridge"):
        assert res["models"][name]["metrics"]["cos_image"]["value"] > te["cos_image"]["value"]
    assert {(c["a"], c["b"]) for c in res["comparisons"]} >= {("eclipse-a", "eclipse-b"), ("eclipse-a", "ridge")}


def test_probe_prompts_examples_and_images(full, world):
    res, out = full
    probe = res["probe"]
    assert set(probe["words"]) <= {"red", "blue", "green", "yellow", "square", "circle"} and probe["words"]
    assert probe["models"]["real images (ceiling)"]["value"] > 0.9  # colors are visible in the images
    fams = probe["families"]  # default families: T2I-CompBench's words ("circle" is not among its shapes)
    assert list(fams) == ["color", "shape", "texture", "spatial"] and fams["shape"]["words"] == ["square"]
    assert set(fams["color"]["words"]) <= set(COLORS) and fams["color"]["models"]["eclipse-a"]["seeds"] == 3
    assert fams["color"]["models"]["real images (ceiling)"]["value"] > 0.9
    assert set(fams["texture"]) == set(fams["spatial"]) == {"skipped"}  # "a red square on a table"
    assert json.loads((out / "metrics.json").read_text())["probe"]["families"] == fams
    prompts = res["prompts"]
    assert set(prompts["categories"]) == {"color", "spatial"}
    assert prompts["categories"]["color"]["models"]["TextEmb"]["swap_acc"]["value"] == 1.0
    assert prompts["categories"]["color"]["models"]["eclipse-a"]["swap_acc"]["seeds"] == 3
    assert len(res["examples"]) == 3
    ex = res["examples"][0]
    assert ex["image"] and all(nb["image"] for m in ex["models"].values() for nb in m["neighbours"])
    gen = res["generation"]
    assert len(gen["items"]) == 2 and set(gen["items"][0]["images"]) == {"eclipse-a", "eclipse-b"}
    assert (out / "images" / f"{gen['items'][0]['images']['eclipse-a']}.png").is_file()
    # the image metrics equal the scorers run again on the saved images and their prompts
    prompts = [it["prompt"] for it in gen["items"]]
    saved = {name: [Image.open(out / "images" / f"{it['images'][name]}.png") for it in gen["items"]]
             for name in ("eclipse-a", "eclipse-b")}
    clip = ClipImageScorer.load("clipscore", world["clip"], device="cpu")
    assert gen["metrics"]["clipscore"]["per_prior"]["eclipse-a"]["value"] == pytest.approx(
        clip.score(saved["eclipse-a"], prompts).mean(), rel=1e-5)
    pick = ClipImageScorer.load("pickscore", world["clip"], device="cpu")
    pref = pickscore_preference(pick.score(saved["eclipse-b"], prompts), pick.score(saved["eclipse-a"], prompts))
    wr = gen["metrics"]["pickscore"]["win_rates"]["eclipse-b"]
    assert wr["hard"]["value"] == pytest.approx(pref["hard"].mean()) and wr["hard"]["n"] == 2
    assert wr["soft"]["value"] == pytest.approx(pref["soft"].mean(), rel=1e-5)
    assert gen["metrics"]["pickscore"]["win_rate_vs"] == "eclipse-a"
    fid = gen["metrics"]["fid"]  # the real images were found: FID ran, or says which library is missing
    if importlib.util.find_spec("torchmetrics") or importlib.util.find_spec("cleanfid"):
        assert set(fid) == {"eclipse-a", "eclipse-b"} or "missing weights" in fid["unavailable"]
    else:
        assert "neither torchmetrics" in fid["unavailable"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 + 3  # generated + example images inlined
    assert "<svg" in html and "Prompt suites" in html


def test_rerun_gives_the_same_numbers(full, world, tmp_path):
    res, _ = full
    again = evaluate(EvalConfig(world["priors"], world["store"], tmp_path, heldout_fraction=FRACTION, seeds=3,
                                n_boot=200, prompt_suite=False, probe=False, n_examples=0, device="cpu"))
    for name in res["models"]:
        for key in ("cos_image", "r1", "frechet"):
            assert again["models"][name]["metrics"][key] == res["models"][name]["metrics"][key], (name, key)


def test_a_folder_holding_this_evaluation_is_read_back_unless_forced_or_changed(world, tmp_path, capsys):
    def cfg(**kw) -> EvalConfig:
        return EvalConfig(world["priors"], world["store"], tmp_path, **{
            "heldout_fraction": FRACTION, "seeds": 3, "n_boot": 50, "prompt_suite": False, "probe": False,
            "n_examples": 0, "device": "cpu", **kw})

    first = evaluate(cfg())
    written = (tmp_path / "metrics.json").stat().st_mtime_ns
    assert evaluate(cfg()) == first and (tmp_path / "metrics.json").stat().st_mtime_ns == written
    assert "already holds this evaluation" in capsys.readouterr().err
    evaluate(cfg(force=True))
    assert (tmp_path / "metrics.json").stat().st_mtime_ns != written
    forced = (tmp_path / "metrics.json").stat().st_mtime_ns
    assert evaluate(cfg(seeds=4))["models"]["eclipse-a"]["seeds"] == 4  # other settings: evaluated again
    assert (tmp_path / "metrics.json").stat().st_mtime_ns != forced


def test_the_heldout_predictions_are_kept_and_read_back(full, world):
    from evaluation.metrics import rowwise_cosine
    from evaluation.predict import PREDICTIONS_FILE, load_heldout

    res, out = full
    held = load_heldout(out / PREDICTIONS_FILE)
    assert len(held.keys) == len(held.captions) == len(set(held.keys)) == res["split"]["heldout_rows"]
    assert sorted(held.preds) == ["eclipse-a", "eclipse-b"]
    for name, pred in held.preds.items():
        assert pred.shape == (3, len(held.keys), DIM)  # seeds x rows x D
        # the saved predictions are the ones metrics.json summarises
        cos = np.mean([rowwise_cosine(p, held.image).mean() for p in pred])  # mean over seeds of the row mean
        assert float(cos) == pytest.approx(res["models"][name]["metrics"]["cos_image"]["value"], abs=1e-5)


def test_predictions_of_runs_over_the_same_rows_in_another_order_merge_by_key(full, tmp_path):
    from evaluation.predict import PREDICTIONS_FILE, Heldout, load_heldout, merge_heldout, save_heldout

    _, out = full
    held = load_heldout(out / PREDICTIONS_FILE)
    perm = np.random.default_rng(0).permutation(len(held.keys))
    shuffled = Heldout([held.keys[i] for i in perm], [held.captions[i] for i in perm], [held.urls[i] for i in perm],
                       held.image[perm], held.text[perm], {"other": held.preds["eclipse-a"][:, perm] + 1.0})
    save_heldout(shuffled, tmp_path / "shuffled.npz")
    merged = merge_heldout([out / PREDICTIONS_FILE, tmp_path / "shuffled.npz"])
    assert merged.keys == held.keys and sorted(merged.preds) == ["eclipse-a", "eclipse-b", "other"]
    np.testing.assert_array_equal(merged.preds["other"], held.preds["eclipse-a"] + 1.0)  # back in the rows' order
    fewer = Heldout(held.keys[1:], held.captions[1:], held.urls[1:], held.image[1:], held.text[1:],
                    {"other": held.preds["eclipse-a"][:, 1:]})
    save_heldout(fewer, tmp_path / "fewer.npz")
    with pytest.raises(ValueError, match="holds predictions for other rows"):
        merge_heldout([out / PREDICTIONS_FILE, tmp_path / "fewer.npz"])


def test_probe_families_of_the_callers_vocabulary(world, tmp_path):
    families = {"hue": list(COLORS), "form": list(SHAPES), "where": ["left", "right"]}
    res = evaluate(EvalConfig(world["priors"][:1], world["store"], tmp_path, heldout_fraction=FRACTION, n_boot=50,
                              prompt_suite=False, n_examples=0, probe_families=families, device="cpu"))
    probe = res["probe"]
    assert probe["words"] == sorted({*COLORS, *SHAPES}) and list(probe["families"]) == ["hue", "form", "where"]
    hue, form = probe["families"]["hue"], probe["families"]["form"]
    assert hue["words"] == list(COLORS) and form["words"] == ["square", "circle"]
    assert hue["models"]["real images (ceiling)"]["value"] > 0.9
    assert set(hue["models"]) == set(form["models"]) == {"real images (ceiling)", *res["models"]}
    assert "no where word (2: left, right)" in probe["families"]["where"]["skipped"]
    assert json.loads((tmp_path / "metrics.json").read_text())["settings"]["probe_families"] == families
    assert "Per family" in (tmp_path / "report.html").read_text()


def test_max_rows_subsamples_every_shard(world, tmp_path):
    res = evaluate(EvalConfig(world["priors"][:1], world["store"], tmp_path, heldout_fraction=FRACTION, max_rows=12,
                              max_train_rows=30, n_boot=50, prompt_suite=False, probe=False, n_examples=12,
                              device="cpu"))
    sp = res["split"]
    keys = [k for _, ks in EmbeddingStore(world["store"]).keys() for k in ks]
    held = is_heldout(keys, FRACTION, 0)
    assert (sp["heldout_rows_in_store"], sp["train_rows_in_store"]) == (held.sum(), (~held).sum())
    # each side subsampled by a second, salted key hash to about max_rows / max_train_rows
    sub_held = held & is_heldout(keys, 12 / held.sum(), SAMPLE_SALT_HELDOUT)
    sub_train = ~held & is_heldout(keys, 30 / (~held).sum(), SAMPLE_SALT_TRAIN)
    assert (sp["heldout_rows"], sp["train_rows_used"]) == (sub_held.sum(), sub_train.sum())
    assert 4 <= sp["heldout_rows"] <= 22 and 15 <= sp["train_rows_used"] <= 50
    assert len({ex["key"][:5] for ex in res["examples"]}) > 1  # not just the first shard
    # so few rows cannot rank priors: the evaluation says so, in metrics.json and on the page
    assert sp["warning"].startswith(f"only {sp['heldout_rows']} held-out rows")
    assert "--heldout-fraction" in sp["warning"]
    assert "only " + str(sp["heldout_rows"]) + " held-out rows" in (tmp_path / "report.html").read_text()


def test_enough_held_out_rows_are_not_warned_about():
    from evaluation.evaluate import MIN_HELDOUT_ROWS, few_rows_warning

    assert few_rows_warning(MIN_HELDOUT_ROWS) is None and few_rows_warning(10_000) is None
    assert "+-0.50" in few_rows_warning(4) and "+-1.00" in few_rows_warning(0)


def test_refusals(world, tmp_path):
    with pytest.raises(ValueError, match="at least 3 noise seeds"):
        EvalConfig(world["priors"], world["store"], tmp_path, heldout_fraction=FRACTION, seeds=2)
    with pytest.raises(ValueError, match="probe_families maps family names to lists of words"):
        EvalConfig(world["priors"], world["store"], tmp_path, probe_families={"hue": "red"})
    with pytest.raises(ValueError, match="probe_families maps family names to lists of words"):
        EvalConfig(world["priors"], world["store"], tmp_path, probe_families={"hue": ["red", " "]})
    with pytest.raises(ValueError, match="generate_from must be"):
        EvalConfig(world["priors"], world["store"], tmp_path, generate_from="colour")
    with pytest.raises(WeightsMissingError, match="Kandinsky 2.2 decoder"):
        evaluate(EvalConfig(world["priors"], world["store"], tmp_path, heldout_fraction=FRACTION,
                            decoder="kandinsky22", decoder_path=tmp_path / "missing", device="cpu"))
    assert not (tmp_path / "metrics.json").exists()  # refused before any work
    with torch.random.fork_rng(devices=[]):
        build_prior("tiny", embedding_dim=16).save_pretrained(tmp_path / "d16")
    with pytest.raises(StoreError, match="does not fit prior"):
        evaluate(EvalConfig([tmp_path / "d16"], world["store"], tmp_path, device="cpu"))
    with pytest.raises(ValueError, match="every row is a training row"):
        evaluate(EvalConfig(world["priors"], world["store"], tmp_path, heldout_fraction=0.0, device="cpu"))
    bare = [open_prior(p, "cpu") for p in world["priors"]]
    split = resolve_split(bare, None, None)
    assert split.fraction == 0.01 and "unknown" in split.source  # bare prior folders record no split


def test_run_folder_curves_and_split_from_the_run(world, tmp_path):
    """A real run folder from the trainer: its JSONL log becomes curves, its config the held-out split."""
    from training.trainer import train

    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        train(dict(store=str(world["store"]), out=str(run), objective="eclipse", preset="tiny", embedding_dim=DIM,
                   steps=8, batch_size=16, heldout_fraction=FRACTION, log_every=2, ckpt_every=8, eval_every=4,
                   progress=False, device="cpu", num_threads=1))
    finally:
        torch.set_num_threads(threads)  # the trainer sets the process's thread count
    # the run records its store's encoder: generate() needs no --encoder for a run folder
    assert prior_encoder(open_prior(run, "cpu"), device="cpu").info == EmbeddingStore(world["store"]).encoder
    log = read_training_log(run / "logs" / "train.jsonl")
    assert log["train"]["step"] == [2.0, 4.0, 6.0, 8.0] and len(log["eval"]["cos_to_image"]) == 2
    res = evaluate(EvalConfig([run, world["priors"][0]], world["store"], tmp_path / "out", seeds=3, n_boot=100,
                              prompt_suite=False, n_examples=1, device="cpu"))
    assert res["split"]["source"] == "run config" and res["split"]["heldout_fraction"] == FRACTION
    assert res["models"]["run"]["objective"] == "eclipse"
    assert res["training"]["run"]["curves"] == log and res["training"]["run"]["config"]["steps"] == 8
    html = (tmp_path / "out" / "report.html").read_text()
    titles = re.findall(r"<svg[^>]*>\s*<title>([^<]*)</title>", html)  # every chart carries its title
    assert {"training loss", "held-out cos(pred, image) during training"} <= set(titles), titles
    with pytest.raises(ValueError, match="rows it trained on"):
        evaluate(EvalConfig([run], world["store"], tmp_path / "bad", heldout_fraction=0.5, device="cpu"))


def test_cli_entry(world, tmp_path, capsys):
    from cli.main import main

    assert main(["evaluate", "--prior", str(world["priors"][0]), "--prior", str(world["priors"][1]), "--store",
                              str(world["store"]), "--out", str(tmp_path), "--heldout-fraction", str(FRACTION),
                 "--no-prompts", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "eclipse-b" in out and "text-shift" in out and str(tmp_path / "report.html") in out
    assert json.loads((tmp_path / "metrics.json").read_text())["settings"]["seeds"] == 3


def _run_folder(root, name: str, shards: list[str] | None):
    """A run folder as the trainer leaves it: train_config.json beside prior/."""
    run = root / name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        build_prior("tiny", embedding_dim=DIM).save_pretrained(run / "prior")
    (run / "train_config.json").write_text(json.dumps(
        {"objective": "eclipse", "heldout_fraction": FRACTION, "heldout_seed": 0, "shards": shards}))
    return run


def test_composition_holdout_evaluates_whole_unseen_shards(world, tmp_path):
    run = _run_folder(tmp_path, "on-two-shards", ["00000.parquet", "00001.parquet"])
    res = evaluate(EvalConfig([run], world["store"], tmp_path / "out", seeds=3, n_boot=50, prompt_suite=False,
                              probe=False, heldout_shards=["00002.parquet"], device="cpu"))
    store = EmbeddingStore(world["store"])
    shard_keys = dict(store.keys())
    assert res["split"]["heldout_rows"] == len(shard_keys["00002.parquet"])  # every row of the unseen shard
    train_keys = shard_keys["00000.parquet"] + shard_keys["00001.parquet"]
    assert res["split"]["train_rows_used"] == int((~is_heldout(train_keys, FRACTION, 0)).sum())
    # held-in: the hash-held-out rows of the two training shards only
    res_in = evaluate(EvalConfig([run], world["store"], tmp_path / "in", seeds=3, n_boot=50, prompt_suite=False,
                                 probe=False, device="cpu"))
    assert res_in["split"]["heldout_rows"] == int(is_heldout(train_keys, FRACTION, 0).sum())


def test_heldout_shards_a_prior_trained_on_are_refused(world, tmp_path):
    everything = _run_folder(tmp_path, "on-all", None)
    with pytest.raises(ValueError, match="trained on every shard"):
        evaluate(EvalConfig([everything], world["store"], tmp_path / "o1", heldout_shards=["00002.parquet"],
                            device="cpu"))
    overlap = _run_folder(tmp_path, "overlap", ["00001.parquet", "00002.parquet"])
    with pytest.raises(ValueError, match=r"trained on \['00002.parquet'\]"):
        evaluate(EvalConfig([overlap], world["store"], tmp_path / "o2", heldout_shards=["00002.parquet"],
                            device="cpu"))


def test_a_prior_is_refused_on_a_store_of_another_encoder(tmp_path, capsys):
    """Same D, different encoder: the dims check cannot see it, the exported training info can."""
    from storefixtures import tiny_info, write_store, write_synthetic_store

    from training.config import TrainConfig
    from training.export import TRAINING_INFO, WEIGHTS_NAME
    from training.trainer import train

    write_synthetic_store(tmp_path / "a", rows=64, dim=DIM, shards=2)
    prior = train(TrainConfig(store=str(tmp_path / "a"), out=str(tmp_path / "run"), preset="tiny", embedding_dim=DIM,
                              steps=2, batch_size=16, heldout_fraction=0.25, num_threads=1, progress=False,
                              eval_every=0))
    assert json.loads((prior / TRAINING_INFO).read_text())["encoder"]["preset"] == "synthetic"
    write_store(tmp_path / "b", shards=2, rows=30, info=tiny_info(dim=DIM, hidden=DIM, preset="another-clip"))
    with pytest.raises(ValueError, match="trained on embeddings of encoder 'synthetic'.*'another-clip'"):
        evaluate(EvalConfig([prior], tmp_path / "b", tmp_path / "out", heldout_fraction=0.25, device="cpu"))
    # The released layout alone records no encoder: only D can be checked, and the user is told so.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", WEIGHTS_NAME):
        shutil.copy(prior / name, bare / name)
    handles = open_priors([bare], EmbeddingStore(tmp_path / "b"), torch.device("cpu"))
    assert handles[0].encoder_info is None
    warned = capsys.readouterr().err
    assert "prior bare records no encoder" in warned and "only its D=" in warned and "'another-clip'" in warned
