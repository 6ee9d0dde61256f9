"""The world's teacher CLIP: tokenizer, loss, positives, preprocessing, the saved encoder folder
(loads with `load_encoder`, same embeddings) and its saved report. What a trained teacher must show
(attribute accuracy and a modality gap) is checked on the quick demo's teacher, in tests/test_demo.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from PIL import Image

from demo.render import render_batch
from demo.teacher import (
    TEACHER_PRESET,
    MultiPositiveClipLoss,
    TeacherConfig,
    _encode_text_trimmed,
    build_tokenizer,
    fit_teacher,
    heldout_gap,
    pixels_from_uint8,
    positives_matrix,
    teacher_metrics,
    train_teacher,
)
from demo.world import (
    COLORS,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    TEMPLATES,
    TEXTURE_WORDS,
    TEXTURES,
    World,
    caption,
    caption_words,
    demo_world,
)
from pipeline.encoders import ClipEncoder, load_encoder, save_encoder

# A few steps on small batches: enough to exercise every code path in seconds, not to learn.
TINY = TeacherConfig(steps=3, batch_size=32, warmup_steps=1, num_threads=None)


@pytest.fixture(scope="module")
def tiny_teacher():
    return fit_teacher(World(two_object_fraction=0.3), TINY, seed=0, log_every=0)


def test_tokenizer_one_token_per_word_and_captions_fit() -> None:
    tok = build_tokenizer()
    for word in caption_words():
        assert len(tok(word).input_ids) == 3, word  # BOS, the word, EOS
    assert tok.eos_token_id == len(tok) - 1 and tok.pad_token_id == tok.eos_token_id
    # The longest caption the world can write: longest prefix, two objects with the longest words.
    longest = max(TEMPLATES, key=len).format(
        "an orange outlined triangle to the right of an orange outlined triangle")
    assert len(tok(longest).input_ids) <= TeacherConfig().context_length
    # Any text stays encodable (byte fallback), just in more tokens.
    ids = tok("a photo of a dog").input_ids
    assert tok.unk_token_id not in ids[1:-1] and tok.decode(ids, skip_special_tokens=True).strip() == "a photo of a dog"


def test_multi_positive_loss_is_clip_loss_with_identity_positives() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(16, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(16, 8, generator=g), dim=-1)
    scale = torch.tensor(50.0)
    mp = MultiPositiveClipLoss()
    ref = ClipLoss()(img, txt, scale)
    torch.testing.assert_close(mp(img, txt, scale, torch.eye(16, dtype=torch.bool)), ref)
    torch.testing.assert_close(mp(img, txt, scale), ref)
    # Several positives: cross-entropy against the uniform distribution over each row's positives.
    pos = torch.eye(16, dtype=torch.bool)
    pos[0, 5] = pos[3, 5] = True
    logits = scale * img @ txt.T
    rows = pos.float() / pos.float().sum(1, keepdim=True)
    cols = pos.T.float() / pos.T.float().sum(1, keepdim=True)
    manual = -((rows * logits.log_softmax(1)).sum(1).mean() + (cols * logits.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(mp(img, txt, scale, pos), manual)


def test_positives_matrix_semantics() -> None:
    world = World(two_object_fraction=0.0)
    rng = np.random.default_rng(0)
    contents = [[("red", "circle", "solid", "left")], [("red", "star", "striped", "top")],
                [("blue", "circle", "solid", "left")],
                [("red", "circle", "solid", None), ("blue", "square", "striped", None)],
                [("blue", "square", "striped", None), ("red", "circle", "solid", None)]]
    specs = world.place(rng, contents, [None, None, None, "left_of", "right_of"])
    nothing = frozenset()
    omits = [[frozenset({"shape", "texture", "position"})],  # "a red shape"
             [nothing], [frozenset({"color"})],  # "a striped star at the top", "a solid circle on the left"
             [nothing, nothing],  # "a red solid circle to the left of a blue striped square"
             [frozenset({"color", "texture"}), frozenset({"color", "texture"})]]  # "a square to the right of a circle"
    assert caption(specs[0], omit_per_object=omits[0]) == "a red shape"
    assert caption(specs[4], omit_per_object=omits[4]) == "a square to the right of a circle"
    p = positives_matrix(specs, omits)
    assert p.diagonal().all()
    assert p[1, 0] and not p[2, 0]  # a red star is "a red shape"; a blue circle is not
    assert p[0, 2] and p[2, 2] and not p[1, 2]  # "a solid circle on the left": color does not matter
    # "A left of B" == "B right of A": both pair images fit both pair captions; singles never do.
    assert p[3, 4] and p[4, 3] and p[4, 4] and p[3, 3]
    assert not p[0, 3] and not p[3, 0]


def test_preprocessing_matches_the_encoder(tiny_teacher) -> None:
    enc = tiny_teacher.encoder
    specs = World().sample_specs(6, seed=1)
    arr = render_batch(specs, 32)
    from_pil = enc.preprocess([Image.fromarray(a) for a in arr])
    torch.testing.assert_close(pixels_from_uint8(arr), from_pil, atol=0, rtol=0)
    # 64 px renders (a world at another size) go through the encoder's own resize to 32 px.
    assert enc.preprocess([Image.fromarray(render_batch(specs[:1], 64)[0])]).shape == (1, 3, 32, 32)


def test_trimmed_training_forward_equals_encode_text(tiny_teacher) -> None:
    enc = tiny_teacher.encoder
    caps = ["a red shape", "a blue striped star at the top", "a red solid circle to the left of a blue solid square"]
    tokens = enc.tokenizer(caps)
    with torch.no_grad():
        torch.testing.assert_close(_encode_text_trimmed(enc.model, tokens), enc.model.encode_text(tokens))


def _embed(enc: ClipEncoder, images: list[Image.Image], captions: list[str]):
    return enc.encode_images(enc.preprocess(images)), enc.encode_texts(captions)


def test_saved_teacher_loads_as_an_encoder_folder(tiny_teacher, tmp_path: Path) -> None:
    enc = tiny_teacher.encoder
    path = save_encoder(enc, tmp_path / "teacher")
    loaded = load_encoder(path, device="cpu")
    assert loaded.backend == "open_clip"
    info = loaded.info
    assert info == enc.info and info.preset == TEACHER_PRESET
    # H == D: the ECLIPSE prior projects the hidden states with a D -> 512 layer.
    assert info.image_dim == info.text_dim == info.hidden_dim == 64 and info.context_length == 20
    assert loaded.image_size == (32, 32)

    world = World(two_object_fraction=0.3)
    specs = world.sample_specs(8, seed=3)
    images = [Image.fromarray(a) for a in render_batch(specs, 32)]
    caps = [caption(s) for s in specs] + ["a red shape", "a photo of a dog"]
    img_a, txt_a = _embed(enc, images, caps)
    img_b, txt_b = _embed(loaded, images, caps)
    torch.testing.assert_close(img_b, img_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt_b.text_embeds, txt_a.text_embeds, atol=1e-5, rtol=1e-5)
    assert txt_b.lengths == txt_a.lengths == [len(c.split()) + 2 for c in caps[:-1]] + [txt_a.lengths[-1]]
    for ha, hb in zip(txt_a.hidden, txt_b.hidden, strict=True):
        np.testing.assert_allclose(hb, ha, atol=1e-5, rtol=1e-5)
        assert hb.shape[1] == 64
    # Nothing is added by hand: every weight trains except the temperature (no frozen offset
    # vectors); the stored raw embeddings are not L2-normalised.
    frozen = [n for n, p in enc.model.named_parameters() if not p.requires_grad]
    assert frozen == ["logit_scale"]
    assert not torch.allclose(img_b.norm(dim=-1), torch.ones(len(images)), atol=1e-2)


# An oracle "encoder" for the metrics' bookkeeping: an image embeds as one-hots of its objects'
# attributes and relation, a caption as one-hots of what it says. Every zero-shot pick is then
# right and every render of one content embeds the same, whatever else the metrics get wrong.
_VALUES = {"color": COLORS, "shape": SHAPES, "texture": TEXTURES, "position": POSITIONS}
_OFFSETS = dict(zip(_VALUES, np.cumsum([0] + [len(v) for v in _VALUES.values()])[:-1], strict=True))
_SLOT = sum(len(v) for v in _VALUES.values())  # 21 dimensions per object
_WORDS = {**{c: ("color", c) for c in COLORS}, **{s: ("shape", s) for s in SHAPES},
          **{TEXTURE_WORDS[t]: ("texture", t) for t in TEXTURES}}


def _oracle_specs(encoder, specs, size, batch=256) -> torch.Tensor:
    out = torch.zeros(len(specs), 2 * _SLOT + len(RELATIONS))
    for i, spec in enumerate(specs):
        for k, obj in enumerate(spec.objects):
            for name, values in _VALUES.items():
                if getattr(obj, name) is not None and not (name == "position" and spec.n_objects == 2):
                    out[i, k * _SLOT + _OFFSETS[name] + values.index(getattr(obj, name))] = 1
        if spec.relation is not None:
            out[i, 2 * _SLOT + RELATIONS.index(spec.relation)] = 1
    return out


def _oracle_captions(encoder, captions, batch=512) -> torch.Tensor:
    out = torch.zeros(len(captions), 2 * _SLOT + len(RELATIONS))
    for i, text in enumerate(captions):
        k = 0
        for rel, phrase in RELATION_PHRASES.items():
            if f" {phrase} " in text:
                out[i, 2 * _SLOT + RELATIONS.index(rel)] = 1
                first, second = text.split(f" {phrase} ")
                parts = [first, second]
                break
        else:
            parts = [text]
        for k, part in enumerate(parts):
            for pos, phrase in POSITION_PHRASES.items():
                if part.endswith(" " + phrase):
                    out[i, k * _SLOT + _OFFSETS["position"] + POSITIONS.index(pos)] = 1
            for w in part.split():
                if w in _WORDS:
                    name, value = _WORDS[w]
                    out[i, k * _SLOT + _OFFSETS[name] + _VALUES[name].index(value)] = 1
    return out


@pytest.fixture()
def oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    import demo.teacher

    monkeypatch.setattr(demo.teacher, "_encode_specs", _oracle_specs)
    monkeypatch.setattr(demo.teacher, "_encode_captions", _oracle_captions)


def test_metrics_of_an_oracle_encoder_are_perfect(oracle) -> None:
    world = World(two_object_fraction=0.3)
    report = teacher_metrics(None, world, n=60)
    for name in ("color_acc", "shape_acc", "texture_acc", "position_acc", "caption_acc", "relation_acc"):
        assert getattr(report, name) == 1.0, name
    assert report.matched_cos == pytest.approx(1.0) and report.image_image_cos == pytest.approx(1.0)
    # Different captions share some attributes, never all four: cosine (4 - differing) / 4.
    assert 0.0 <= report.image_image_cos_other < 0.75 + 1e-6 and report.text_text_cos_other < 0.75 + 1e-6
    assert teacher_metrics(None, world, n=60) == report  # seeded
    small = teacher_metrics(None, World(attributes=("color", "shape")), n=20)
    assert small.texture_acc is None and small.position_acc is None and small.relation_acc is None
    assert small.color_acc == small.shape_acc == 1.0


def test_metrics_see_an_encoder_blind_to_color(oracle, monkeypatch: pytest.MonkeyPatch) -> None:
    import demo.teacher

    def colorblind(encoder, specs, size, batch=256):
        out = _oracle_specs(encoder, specs, size)
        for k in range(2):
            out[:, k * _SLOT:k * _SLOT + len(COLORS)] = 0
        return out

    monkeypatch.setattr(demo.teacher, "_encode_specs", colorblind)
    report = teacher_metrics(None, World(), n=200)
    assert report.shape_acc == 1.0 and report.color_acc < 0.3  # ties go to the first color: chance 1/8


def test_heldout_gap_compares_the_oracle_with_text_shift(tiny_teacher) -> None:
    world = demo_world(seed=0)
    held = world.holdout_pairs(0.75, seed=0)
    gap = heldout_gap(tiny_teacher.encoder, world, held, n_captions=12, renders=3, fit_n=60, seed=1)
    assert gap["gap"] == pytest.approx(gap["oracle_cos"] - gap["text_shift_cos"])
    assert gap["captions"] == 12 and gap["renders_per_caption"] == 3 and 0 < gap["heldin_scenes_for_means"] < 60
    assert heldout_gap(tiny_teacher.encoder, world, held, n_captions=12, renders=3, fit_n=60, seed=1) == gap


def test_heldout_gap_oracle_averages_renders_of_the_same_caption(oracle) -> None:
    """With embeddings that see only the captioned content, every render of a caption embeds the
    same: the oracle is exact (cosine 1), and text-shift, which cannot know what was left
    unsaid, falls short of it."""
    world = demo_world(seed=0)
    gap = heldout_gap(None, world, world.holdout_pairs(0.75, seed=0), n_captions=40, renders=3, fit_n=200, seed=1)
    assert gap["oracle_cos"] == pytest.approx(1.0)
    assert gap["text_shift_cos"] < 0.99 and gap["gap"] > 0.01


# ----------------------------------------------------------------------------------------------
# The saved run (train_teacher with out_dir)

# What the teacher learns is checked where it is trained anyway: the quick demo's 250-step teacher
# (tests/test_demo.py: zero-shot color and shape, the modality gap, the held-out gap). Here, the saved run.
def test_train_teacher_saves_its_report_beside_an_encoder_folder(tmp_path: Path) -> None:
    world = World(two_object_fraction=0.3)
    report = train_teacher(world, steps=3, seed=0, out_dir=tmp_path / "teacher", config=TINY, metrics_n=100)
    assert report.steps == 3 and report.final_loss is not None and np.isfinite(report.final_loss)
    loaded = load_encoder(report.path, device="cpu")
    saved = json.loads((Path(report.path) / "teacher_report.json").read_text())
    assert saved["report"] == report.to_dict() and saved["config"]["steps"] == 3
    assert World.from_dict(saved["world"]) == world and saved["seed"] == 0
    again = teacher_metrics(loaded, world, n=100)
    fields = ("color_acc", "shape_acc", "texture_acc", "position_acc", "caption_acc")
    assert {f: getattr(again, f) for f in fields} == {f: getattr(report, f) for f in fields}
    assert again.matched_cos == pytest.approx(report.matched_cos, abs=1e-5)
