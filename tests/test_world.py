"""The synthetic world: seeded specs, captions that agree with the labels, the composition
hold-out and the url list. Its pixels are tested in test_render.py, its server in test_server.py."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest

from demo.world import (
    COLORS,
    POSITION_PHRASES,
    RELATION_PHRASES,
    SHAPES,
    TEMPLATES,
    TEXTURE_WORDS,
    TONES,
    URL_LIST_COLUMNS,
    World,
    caption,
    caption_words,
    demo_world,
    description,
    pair_id,
    partner_color,
    preferred_tone,
    split_by_pairs,
    world_url,
    write_url_list,
)

# The demo's world (backgrounds, distractors, omitted attributes, correlations), more pair scenes.
MIXED = dataclasses.replace(demo_world(seed=3), two_object_fraction=0.4)


# ----------------------------------------------------------------------------------------------
# Sampling


def test_specs_are_deterministic_per_seed() -> None:
    a, b = MIXED.sample_specs(40, seed=7), MIXED.sample_specs(40, seed=7)
    assert a == b
    assert MIXED.spec_at(7, 25) == a[25]  # random access: one spec without the others
    assert MIXED.sample_specs(5, seed=7, start=20) == a[20:25]
    assert a != MIXED.sample_specs(40, seed=8)
    # Another World object with the same config draws the same specs (no hidden state).
    assert World.from_dict(MIXED.to_dict()).sample_specs(40, seed=7) == a


def test_world_config_is_validated_and_round_trips() -> None:
    w = World(seed=5, image_size=64, colors=("red", "blue"), shapes=("circle", "star"),
              attributes=("color", "shape"), two_object_fraction=0.5, n_templates=2)
    assert World.from_dict(w.to_dict()) == w
    assert w.fingerprint == World.from_dict({**w.to_dict(), "seed": 9}).fingerprint  # seed is only a default
    assert w.fingerprint != World().fingerprint
    for bad in ({"colors": ("red", "mauve")}, {"attributes": ("shape", "texture")}, {"two_object_fraction": 1.5},
                {"image_size": 4}, {"n_templates": 0}, {"shapes": ("circle", "circle")}):
        with pytest.raises(ValueError):
            World(**bad)


# ----------------------------------------------------------------------------------------------
# Captions and labels

_WORD = {**{c: ("color", c) for c in COLORS}, **{s: ("shape", s) for s in SHAPES},
         **{w: ("texture", t) for t, w in TEXTURE_WORDS.items()}}


def _parse_object(text: str) -> dict[str, str | None]:
    """`a red striped circle [on the left]` -> its attributes (an independent reading of captions)."""
    out: dict[str, str | None] = {"color": None, "shape": None, "texture": None, "position": None}
    for pos, phrase in POSITION_PHRASES.items():
        if text.endswith(" " + phrase):
            out["position"], text = pos, text[: -len(phrase) - 1]
    article, *words = text.split()
    assert article == ("an" if words[0][0] in "aeiou" else "a"), text
    for w in words:
        if w in _WORD:
            kind, value = _WORD[w]
            out[kind] = value
    return out


def _parse(cap: str) -> tuple[list[dict[str, str | None]], str | None]:
    for template in TEMPLATES[1:]:
        prefix = template.replace("{}", "")
        if cap.startswith(prefix):
            cap = cap[len(prefix):]
    for rel, phrase in RELATION_PHRASES.items():
        m = re.fullmatch(rf"(.+) {phrase} (.+)", cap)
        if m:
            return [_parse_object(m.group(1)), _parse_object(m.group(2))], rel
    return [_parse_object(cap)], None


def test_captions_agree_with_attributes() -> None:
    specs = MIXED.sample_specs(400, seed=11)
    assert {s.n_objects for s in specs} == {1, 2} and len({s.template for s in specs}) > 1
    for spec in specs:
        objs, rel = _parse(caption(spec))
        attrs = spec.attributes
        assert rel == attrs["relation"] and len(objs) == attrs["n_objects"]
        said = {a: None if a in spec.omitted else attrs[a] for a in ("texture", "position")}
        assert (objs[0]["color"], objs[0]["shape"], objs[0]["texture"]) == (
            attrs["color"], attrs["shape"], said["texture"])
        assert attrs["pair_id"] == pair_id(attrs["color"], attrs["shape"])
        if spec.n_objects == 1:
            assert objs[0]["position"] == said["position"] and attrs["color2"] is None
        else:
            assert objs[1]["color"] == attrs["color2"] and objs[1]["shape"] == attrs["shape2"]
            assert objs[1]["texture"] == (None if "texture" in spec.omitted else attrs["texture2"])
            # The relation places the objects: "A left of B" puts A on the left, B on the right.
            assert {"left_of": ("left", "right"), "right_of": ("right", "left"), "above": ("top", "bottom"),
                    "below": ("bottom", "top")}[rel] == (attrs["position"], attrs["position2"])
            assert spec.pairs[0] != spec.pairs[1]


def test_partial_captions() -> None:
    spec = World().spec_at(0, 0)
    o = spec.objects[0]
    assert caption(spec, omit=("shape", "texture")) == f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} shape " \
                                                       f"{POSITION_PHRASES[o.position]}"
    assert caption(spec, omit=("color", "texture", "position")) == f"a {o.shape}"


def test_captions_under_specify_the_images() -> None:
    """The demo world's captions leave texture and position out, come from several templates, and
    never mention the background or the distractor, which vary from image to image."""
    specs = demo_world(seed=0).sample_specs(1000, seed=5)
    singles = [s for s in specs if s.n_objects == 1]
    texture_said = np.mean([TEXTURE_WORDS[s.objects[0].texture] in s.caption.split() for s in singles])
    position_said = np.mean([POSITION_PHRASES[s.objects[0].position] in s.caption for s in singles])
    assert 0.3 < texture_said < 0.7 and 0.3 < position_said < 0.7  # omit_fraction 0.5
    assert len({s.template for s in specs}) == len(TEMPLATES)
    assert len({s.tone for s in specs}) == len(TONES) and len({s.backdrop for s in specs}) == 3
    with_distractor = [s for s in specs if s.distractor is not None]
    assert 0.5 < len(with_distractor) / len(specs) < 0.7
    for s in with_distractor[:50]:  # the caption names only the mentioned objects
        assert s.caption.split().count(s.distractor.shape) == sum(o.shape == s.distractor.shape for o in s.objects)
    # One description, many images: the unmentioned content differs between renders of a caption.
    groups: dict[str, set] = {}
    for s in singles:
        groups.setdefault(description(s.caption), set()).add((s.tone, s.distractor is not None))
    assert max(len(v) for v in groups.values()) >= 3


def test_spurious_correlation_holds_in_the_training_split() -> None:
    """In the held-in split the demo trains priors on, the background tone follows the first
    object's shape and the distractor's color its color, far above chance; with correlation 0
    they do not."""
    world = demo_world(seed=0)
    train, _ = split_by_pairs(world.sample_specs(1500, seed=0), world.holdout_pairs(0.75, seed=0))
    assert len(train) > 200
    tone_follows = np.mean([s.tone == preferred_tone(s.objects[0].shape, world.tones) for s in train])
    with_d = [s for s in train if s.distractor is not None]
    color_follows = np.mean([s.distractor.color == partner_color(s.objects[0].color) for s in with_d])
    assert tone_follows > 0.75 and color_follows > 0.75  # chance: 1/5 and 1/8 (+ 0.8 x the rest)
    free = dataclasses.replace(world, correlation=0.0)
    specs = free.sample_specs(1500, seed=0)
    assert np.mean([s.tone == preferred_tone(s.objects[0].shape, free.tones) for s in specs]) < 0.3
    with_d = [s for s in specs if s.distractor is not None]
    assert np.mean([s.distractor.color == partner_color(s.objects[0].color) for s in with_d]) < 0.2


def test_description_strips_the_template() -> None:
    spec = MIXED.spec_at(0, 0)
    for t in range(len(TEMPLATES)):
        assert description(caption(dataclasses.replace(spec, template=t))) == caption(
            dataclasses.replace(spec, template=0))



def test_all_single_object_captions() -> None:
    world = World()
    caps = world.all_single_object_captions()
    labels = world.all_single_object_labels()
    assert len(caps) == len(set(caps)) == 8 * 6 * 3 * 4 == len(labels)
    for cap, lab in zip(caps, labels, strict=True):
        (obj,), _ = _parse(cap)
        assert obj == {k: lab[k] for k in obj}
    small = World(attributes=("color", "shape"))
    assert small.all_single_object_captions()[:2] == ["a red circle", "a red square"]
    spec = small.spec_at(0, 0)
    assert spec.attributes["texture"] is None and spec.attributes["position"] is None



# ----------------------------------------------------------------------------------------------
# Composition hold-out


def test_holdout_pairs_cover_every_attribute_and_split() -> None:
    world = World()
    held = world.holdout_pairs(0.75, seed=0)
    assert len(held) == 36
    assert held == world.holdout_pairs(0.75, seed=0) and held != world.holdout_pairs(0.75, seed=1)
    kept = {(c, s) for c in COLORS for s in SHAPES} - held
    assert {c for c, _ in kept} == set(COLORS) and {s for _, s in kept} == set(SHAPES)
    with pytest.raises(ValueError):
        world.holdout_pairs(0.9)
    specs = MIXED.sample_specs(300, seed=4)
    train, test = split_by_pairs(specs, held)
    assert len(train) + len(test) == 300 and train and test
    assert not any(p in held for s in train for p in s.pairs)
    assert all(any(p in held for p in s.pairs) for s in test)


# ----------------------------------------------------------------------------------------------
# Url list


def test_write_url_list(tmp_path) -> None:
    specs = MIXED.sample_specs(30, seed=9)
    path = write_url_list(specs, "http://127.0.0.1:1234/", tmp_path / "urls.parquet", size=64)
    df = pd.read_parquet(path)
    assert tuple(df.columns) == URL_LIST_COLUMNS and len(df) == 30
    assert df.url[3] == f"http://127.0.0.1:1234/world/9/3.png?w={MIXED.fingerprint}&size=64"
    assert list(df.caption) == [caption(s) for s in specs]
    for (_, row), spec in zip(df.iterrows(), specs, strict=True):
        attrs = spec.attributes
        assert row.color == attrs["color"] and row.pair_id == attrs["pair_id"]
        assert row.relation == (attrs["relation"] or "") and row.color2 == (attrs["color2"] or "")
        assert row.pair_id2 == (-1 if attrs["pair_id2"] is None else attrs["pair_id2"])
        assert (row.world_seed, row.world_index) == (9, spec.index)
    with pytest.raises(ValueError):
        write_url_list([MIXED.place(np.random.default_rng(0), [[("red", "star", "solid", "top")]], [None])[0]],
                       "http://x", tmp_path / "bad.parquet")


def test_caption_words_are_every_word_a_caption_uses() -> None:
    words = set(caption_words())
    used = {w for s in MIXED.sample_specs(300, seed=2) for w in s.caption.split()}
    used |= {w for s in MIXED.sample_specs(50, seed=3) for w in caption(s, omit=("shape",)).split()}
    assert used <= words and "shape" in words
    assert len(words) == len(caption_words())  # no duplicates


def test_world_url_needs_a_drawn_spec() -> None:
    spec = MIXED.spec_at(4, 2)
    assert world_url("http://h:1/", spec, fmt="jpg") == f"http://h:1/world/4/2.jpg?w={MIXED.fingerprint}"
    with pytest.raises(ValueError):
        world_url("http://h:1", dataclasses.replace(spec, seed=None))
