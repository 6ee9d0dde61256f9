"""T2I-CompBench prompt lists, swaps, encoding with the store's encoder, and the prompt suite."""

from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from evaluation import metrics as M
from evaluation.prompts import (
    CATEGORIES,
    SPATIAL_RELATIONS,
    attribute_swap,
    encode_prompts,
    load_prompts,
    object_swap,
    probe_families,
    probe_vocabulary,
    run_prompt_suite,
    swap_prompt,
)
from pipeline.encoders import load_encoder, save_encoder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = save_encoder(load_encoder("tiny-clip", device="cpu"), tmp_path_factory.mktemp("enc") / "tiny")
    return load_encoder(folder, device="cpu")


def test_prompt_lists_ship_with_licence_and_source():
    data = resources.files("evaluation").joinpath("prompt_data")
    assert "MIT License" in data.joinpath("License.txt").read_text()
    assert "T2I-CompBench" in data.joinpath("SOURCE.md").read_text()
    for cat in CATEGORIES:
        prompts = load_prompts(cat)
        assert len(prompts) == 300, cat  # the benchmark's validation lists: 300 each
        assert all(p and p == p.strip() and "\r" not in p for p in prompts)
    assert len(load_prompts("color", "val_seen")) + len(load_prompts("color", "val_unseen")) == 300
    with pytest.raises(FileNotFoundError, match="exists only"):
        load_prompts("spatial", "val_seen")
    with pytest.raises(ValueError):
        load_prompts("colour")


def test_the_project_does_not_read_shared_at_run_time():
    root = Path(__file__).resolve().parents[1]
    files = [p for p in root.glob("*/**/*.py") if p.parts[len(root.parts)] not in (".venv", "tests")]
    assert len(files) > 40
    for f in files:
        text = f.read_text()
        assert "../shared" not in text and "/work/shared" not in text and "shared/data" not in text, f


def test_attribute_swaps():
    assert attribute_swap("a green bench and a blue bowl") == "a blue bench and a green bowl"
    assert attribute_swap("an oblong cucumber and a teardrop plum") == "a teardrop cucumber and an oblong plum"
    assert attribute_swap("rubber sole shoes and fluffy clouds") == "fluffy sole shoes and rubber clouds"
    assert attribute_swap("The red hat and the blue coat.") == "The blue hat and the red coat."
    assert attribute_swap("a red car and a red bench") is None  # nothing to swap
    assert attribute_swap("A small white kitchen with brown wood floor.") is None  # not two objects
    assert swap_prompt("Two kitchen chairs and a blue table", "color") is None  # "Two" is not a color
    assert object_swap("a giraffe next to a lamp") == "a lamp next to a giraffe"
    assert object_swap("an apple on the left of a dog") == "a dog on the left of an apple"
    assert object_swap("a dog and a cat") is None
    assert swap_prompt("A person is looking at a rainbow.", "non_spatial") is None


def test_color_swaps_reproduce_the_benchmarks_own_pairs():
    """T2I-CompBench lists most color prompts next to their attribute-swapped twin: our swap finds them."""
    prompts = load_prompts("color")
    swaps = [swap_prompt(p, "color") for p in prompts]
    assert sum(s is not None for s in swaps) >= 240
    assert sum(s in set(prompts) for s in swaps if s) >= 230
    for cat, least in (("shape", 290), ("texture", 290), ("spatial", 290)):
        assert sum(swap_prompt(p, cat) is not None for p in load_prompts(cat)) >= least, cat


def test_encode_prompts_pads_like_the_store(encoder):
    prompts = ["a red car and a blue bench", "a dog", "x"]
    enc = encode_prompts(encoder, prompts, pad_to=77, batch_size=2)
    direct = encoder.encode_texts(prompts)
    assert enc.text_embed.shape == (3, 32) and enc.text_hidden.shape == (3, 77, 32)
    # batch_size 2 vs one batch of 3: equal up to float round-off of the padded batch shapes
    assert np.allclose(enc.text_embed, direct.text_embeds.numpy(), atol=1e-5)
    for i, h in enumerate(direct.hidden):
        assert enc.text_mask[i].sum() == len(h)
        assert np.allclose(enc.text_hidden[i, : len(h)], h, atol=1e-5)
        assert not enc.text_hidden[i, len(h) :].any()


def test_prompt_suite_scores(encoder):
    def textemb(e, seed):
        return e.text_embed

    def constant(e, seed):
        return np.ones_like(e.text_embed)

    def noisy(e, seed):  # a stochastic "prior": text embedding plus seeded noise
        return e.text_embed + np.random.default_rng(seed).standard_normal(e.text_embed.shape)

    real = np.random.default_rng(0).standard_normal((40, 32))
    res = run_prompt_suite(encoder, {"TextEmb": (textemb, 1), "constant": (constant, 1), "noisy": (noisy, 3)},
                           real, categories=("color", "spatial", "complex"), max_prompts=12, n_boot=200)
    color = res["categories"]["color"]
    assert color["n_prompts"] == 12 and color["n_swaps"] > 0 and color["swap_examples"]
    te = color["models"]["TextEmb"]
    assert te["swap_acc"]["value"] == 1.0 and te["cos_text"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert te["text_r1"]["value"] == 1.0
    # one constant prediction for every prompt retrieves only the prompt nearest to it: 1 of 12
    assert color["models"]["constant"]["text_r1"]["value"] == pytest.approx(1 / 12)
    complex_ = res["categories"]["complex"]
    assert complex_["n_swaps"] == 0 and "swap_acc" not in complex_["models"]["TextEmb"]  # no swaps to score
    # a stochastic model is scored under each seed, then averaged: the per-seed figures by hand
    enc = encode_prompts(encoder, load_prompts("color")[:12], pad_to=77)
    by_seed = [M.rowwise_cosine(noisy(enc, s), enc.text_embed).mean() for s in range(3)]
    noisy_cos = color["models"]["noisy"]["cos_text"]
    assert noisy_cos["seed_values"] == pytest.approx(by_seed) and noisy_cos["value"] == pytest.approx(np.mean(by_seed))
    assert noisy_cos["ci"][0] < noisy_cos["value"] < noisy_cos["ci"][1]
    # pooled over categories: every model, every figure
    assert set(res["overall"]) == {"TextEmb", "constant", "noisy"}
    assert res["overall"]["TextEmb"]["cos_text"]["n"] == 36


def test_probe_families_are_the_compbench_vocabularies_plus_positions():
    fams = probe_families()
    assert list(fams) == ["color", "shape", "texture", "spatial"]
    assert sorted(fams["color"] + fams["shape"] + fams["texture"]) == probe_vocabulary()  # the overall probe's words
    assert fams["spatial"] == ["above", "below", "bottom", "left", "right", "top"]
    # the position words of T2I-CompBench's own relations are among them
    relation_words = {w for r in SPATIAL_RELATIONS for w in r.split()}
    assert relation_words & set(fams["spatial"]) == {"left", "right", "top", "bottom"}
