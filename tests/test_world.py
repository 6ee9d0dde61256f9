"""The synthetic world: deterministic renders, captions that agree with the labels and the
pixels, the composition hold-out, the url list, and the loopback server (in-process and as a
real subprocess stopped by pid)."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from demo.world import (
    COLOR_RGB,
    COLORS,
    POSITION_PHRASES,
    RELATION_PHRASES,
    SHAPES,
    TEMPLATES,
    TEXTURE_WORDS,
    TONES,
    URL_LIST_COLUMNS,
    World,
    WorldServer,
    caption,
    demo_world,
    description,
    pair_id,
    partner_color,
    preferred_tone,
    render,
    render_batch,
    serve_world,
    split_by_pairs,
    world_url,
    write_url_list,
)

# The demo's world (backgrounds, distractors, omitted attributes, correlations), more pair scenes.
MIXED = dataclasses.replace(demo_world(seed=3), two_object_fraction=0.4)


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ----------------------------------------------------------------------------------------------
# Sampling and rendering


def test_specs_and_renders_are_deterministic_per_seed() -> None:
    a, b = MIXED.sample_specs(40, seed=7), MIXED.sample_specs(40, seed=7)
    assert a == b
    assert MIXED.spec_at(7, 25) == a[25]  # random access: one spec without the others
    assert MIXED.sample_specs(5, seed=7, start=20) == a[20:25]
    assert a != MIXED.sample_specs(40, seed=8)
    for spec in a[:10]:
        assert render(spec, 32).tobytes() == render(spec, 32).tobytes()
    # Another World object with the same config draws the same specs (no hidden state).
    assert World.from_dict(MIXED.to_dict()).sample_specs(40, seed=7) == a


def test_batch_render_equals_single_renders() -> None:
    specs = MIXED.sample_specs(120, seed=1)
    for size in (32, 64):
        batch = render_batch(specs, size)
        assert batch.shape == (120, size, size, 3) and batch.dtype == np.uint8
        single = np.stack([np.asarray(render(s, size)) for s in specs])
        np.testing.assert_array_equal(batch, single)


def test_render_is_fast() -> None:
    specs = World(two_object_fraction=0.25).sample_specs(300, seed=0)
    for s in specs[:5]:
        render(s, 32)  # warm-up
    t0 = time.perf_counter()
    for s in specs:
        render(s, 32)
    per_image = (time.perf_counter() - t0) / len(specs)
    t0 = time.perf_counter()
    render_batch(specs, 32)
    per_image_batched = (time.perf_counter() - t0) / len(specs)
    # Measured ~0.15 ms one by one and ~0.08 ms batched at 32 px on a busy 2-core machine; the
    # bound leaves room for a loaded CI runner.
    assert per_image < 2e-3, per_image
    assert per_image_batched < 1e-3, per_image_batched


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


def test_unmentioned_content_is_in_the_pixels() -> None:
    """The distractor is painted (under the mentioned objects), the backdrop changes the pixels."""
    world = demo_world(seed=0)
    spec = next(s for s in world.sample_specs(50, seed=1) if s.distractor is not None and s.n_objects == 1)
    bare = dataclasses.replace(spec, distractor=None)
    with_d, without = np.asarray(render(spec, 64)).astype(int), np.asarray(render(bare, 64)).astype(int)
    changed = np.abs(with_d - without).max(axis=-1) > 0
    assert 20 < changed.sum() < 0.1 * 64 * 64
    ys, xs = np.nonzero(changed)
    assert abs(xs.mean() / 64 - spec.distractor.cx) < 0.06 and abs(ys.mean() / 64 - spec.distractor.cy) < 0.06
    plain = np.asarray(render(dataclasses.replace(bare, backdrop="plain"), 64)).astype(int)
    for backdrop in ("gradient", "checker"):
        other = np.asarray(render(dataclasses.replace(bare, backdrop=backdrop), 64)).astype(int)
        assert np.abs(other - plain).mean() > 5, backdrop


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


def _object_mask(spec, size: int) -> np.ndarray:
    """Pixels clearly different from the spec's background (the background noise is +-28)."""
    img = np.asarray(render(spec, size)).astype(np.int32)
    return np.abs(img - np.array(spec.background)).max(axis=-1) > 45


def test_pixels_agree_with_position_and_color() -> None:
    world = World()
    size = 64
    for spec in world.sample_specs(60, seed=2):
        if spec.objects[0].texture != "solid":
            continue
        mask = _object_mask(spec, size)
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / size, ys.mean() / size
        pos = spec.attributes["position"]
        assert {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6}[pos], (pos, cx, cy)
        mean_rgb = np.asarray(render(spec, size))[mask].mean(axis=0)
        nearest = min(COLORS, key=lambda c: np.abs(mean_rgb - np.array(COLOR_RGB[c])).sum())
        assert nearest == spec.attributes["color"]


def test_shapes_and_textures_render_differently() -> None:
    """Same placement, different shape or texture -> different pixels (and outline < striped < solid)."""
    world = World()
    base = world.spec_at(0, 4)
    o = base.objects[0]

    def with_obj(**kw):
        return dataclasses.replace(base, objects=(dataclasses.replace(o, **kw),))

    masks = {s: _object_mask(with_obj(shape=s, texture="solid"), 64) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 10, (a, b)
    yellow = (240, 220, 40)
    solid, striped, outline = (with_obj(shape="circle", texture=t, rgb=yellow) for t in ("solid", "striped", "outline"))
    # Outline: a ring, a fraction of the disc. Stripes: the disc, about half of it dark bands.
    assert 0.3 < _object_mask(outline, 64).sum() / _object_mask(solid, 64).sum() < 0.8
    pixels = np.asarray(render(striped, 64)).astype(float)[_object_mask(striped, 64)]
    dark = pixels.sum(axis=1) < 0.5 * sum(yellow)
    assert 0.25 < dark.mean() < 0.75


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
# Url list and server


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


@pytest.fixture()
def inprocess_server() -> Iterator[str]:
    httpd = serve_world(MIXED)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_server_routes(inprocess_server: str) -> None:
    base = inprocess_server
    spec = MIXED.spec_at(2, 17)
    code, body = _fetch(world_url(base, spec))
    assert code == 200
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), np.asarray(render(spec, 32)))
    code, body = _fetch(world_url(base, spec, size=64, fmt="jpg"))
    assert code == 200 and Image.open(io.BytesIO(body)).size == (64, 64)
    assert _fetch(f"{base}/caption/2/17.png")[1].decode() == caption(spec)
    assert _fetch(f"{base}/world/2/17.png?w=0123456789ab")[0] == 404  # another world's url
    assert _fetch(f"{base}/world/2/x.png")[0] == 404
    assert _fetch(f"{base}/world/2/1.png?size=4")[0] == 400
    assert _fetch(f"{base}/nothing")[0] == 404
    assert _fetch(f"{base}/healthz") == (200, b"ok")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow  # a real subprocess (the project's marker for servers/subprocesses); ~1 s
def test_world_server_subprocess(tmp_path) -> None:
    world = World(seed=1, two_object_fraction=0.3)
    specs = world.sample_specs(6, seed=5)
    with WorldServer(world) as srv:
        pid, port = srv.pid, srv.port
        assert port and _port_open(port)
        urls = pd.read_parquet(write_url_list(specs, srv.base_url, tmp_path / "u.parquet")).url
        for spec, url in zip(specs, urls, strict=True):
            code, body = _fetch(url)
            assert code == 200
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), np.asarray(render(spec, 32)))
    # Stopped by pid: the process is gone (reaped) and the port no longer accepts connections.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not _port_open(port)


@pytest.mark.slow  # img2dataset with a worker process; ~7 s
def test_url_list_downloads_through_img2dataset(tmp_path) -> None:
    """The demo's path: world server -> url list -> the real download stage -> webdataset tars whose
    images are the exact renders (png) and whose json carries the attribute columns."""
    import json
    import tarfile

    from pipeline.download import DownloadConfig, download

    world = World(seed=2, two_object_fraction=0.3)
    specs = world.sample_specs(40, seed=6)
    with WorldServer(world) as srv:
        urls = write_url_list(specs, srv.base_url, tmp_path / "urls.parquet")
        summary = download(urls, tmp_path / "images", DownloadConfig(
            image_size=32, encode_format="png", encode_quality=6, processes_count=1, thread_count=4,
            number_sample_per_shard=20))
    assert summary.successes == 40
    seen = 0
    for tar in sorted((tmp_path / "images").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                if not member.name.endswith(".png"):
                    continue
                meta = json.loads(tf.extractfile(member.name[:-4] + ".json").read())
                spec = specs[meta["world_index"]]
                assert meta["caption"] == caption(spec) and meta["shape"] == spec.attributes["shape"]
                pixels = np.asarray(Image.open(io.BytesIO(tf.extractfile(member).read())).convert("RGB"))
                np.testing.assert_array_equal(pixels, np.asarray(render(spec, 32)))
                seen += 1
    assert seen == 40
