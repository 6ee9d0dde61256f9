"""A seeded synthetic compositional world: the embedded default data set of the demo and tests.

Every image shows one object, or two objects in a spatial relation, on a noisy background.
An object has a color (8), a shape (6: circle, square, triangle, diamond, cross, star), a texture
(3: solid, striped, outline) and a position (4: left, right, top, bottom), plus a random size,
jitter and a small rotation. Captions come from templates::

    a red striped circle on the left
    a picture of an orange star
    a drawing of a red striped circle to the left of a blue square

Like real captions, they need not say everything the image shows. A world can add (all off in
`World()`, all on in `demo_world`):
  - a background tone (gray, light, dark, warm, cool) and pattern (plain, gradient, checker);
  - a small second object nobody mentions (a "distractor");
  - captions that leave texture and position out (`omit_fraction`);
  - a spurious correlation (`correlation`): with that probability the background tone is the one
    the first object's shape prefers and the distractor takes the partner color of the first
    object's color. A prior trained on such data learns "a star" means "a star on a cool
    background", which the caption never said (the paper's "young tiger" drawn as a person).
So "text embedding + a constant vector" is not the best guess of a caption's image embedding:
the unmentioned content depends on what the caption says.

Why a synthetic world: the paper's claim is about compositions (attribute binding) that a prior
has never seen; here every caption is exact, every attribute is a label a probe can be trained
on, and held-out (color, shape) pairs give a clean compositional split (`World.holdout_pairs`).

Determinism: a `SceneSpec` holds every random draw (positions, sizes, angles, colors, noise
seed), so `render(spec, size)` is a pure function of the spec. `World.spec_at(seed, index)`
draws spec `index` from its own generator, so any sample is reproducible on its own; this is
how the loopback image server renders `/world/<seed>/<index>.png` without a list of specs.
Rendering uses only exactly-rounded float32 arithmetic per pixel (no trig, no transcendental
functions), so a batch render and a one-image render give identical bytes on any machine.

The server (`python -m demo.world serve --port P`) lets the demo go through the real
img2dataset download stage: `write_url_list` writes a Parquet url list whose urls point at it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from storage_schema.atomic import atomic_path

# ----------------------------------------------------------------------------------------------
# Vocabulary (global, ordered: a World may use a subset; ids below are stable across worlds)

#: Saturated colors only, so that none can be mistaken for the neutral gray background.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 135, 25),
    "yellow": (235, 215, 40),
    "green": (45, 165, 60),
    "cyan": (40, 195, 205),
    "blue": (45, 75, 215),
    "purple": (135, 55, 185),
    "pink": (240, 125, 185),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
TEXTURES: tuple[str, ...] = ("solid", "striped", "outline")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "texture", "position")

TEXTURE_WORDS = {"solid": "solid", "striped": "striped", "outline": "outlined"}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
RELATION_PHRASES = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
#: Where each object of a relation sits: (first object, second object).
RELATION_POSITIONS = {
    "left_of": ("left", "right"), "right_of": ("right", "left"), "above": ("top", "bottom"), "below": ("bottom", "top")
}
#: Caption templates; `{}` is the description, which starts with its article ("a red circle ...").
TEMPLATES: tuple[str, ...] = ("{}", "a picture of {}", "an image of {}", "a drawing of {}", "a photo of {}",
                              "there is {}")
#: Background tones (base RGB, desaturated so no tone reads as an object color) and patterns.
TONE_RGB: dict[str, tuple[int, int, int]] = {
    "gray": (125, 125, 125), "light": (178, 176, 170), "dark": (62, 62, 70), "warm": (150, 112, 88),
    "cool": (88, 118, 150),
}
TONES: tuple[str, ...] = tuple(TONE_RGB)
BACKDROPS: tuple[str, ...] = ("plain", "gradient", "checker")
#: What captions may leave out: the attributes that are not part of the (color, shape) composition.
OMITTABLE: tuple[str, ...] = ("texture", "position")
GENERIC_NOUN = "shape"  # what a partial caption says when it leaves the shape out

WORLD_VERSION = 2  # bump when sampling or rendering changes: it is part of every url's fingerprint
NO_VALUE = ""  # url-list value of an attribute that does not apply (img2dataset json has no nulls)

# Geometry, in units of the image side. Rotation stays small: a square turned 45 degrees would
# be a diamond, and a turned cross an "x". Objects are large because the demo renders at 32 px:
# with radii 0.16-0.22 the teacher confused circles and squares (shape accuracy 0.81 vs 0.99).
MAX_ANGLE = 15.0
SINGLE_RADIUS = (0.22, 0.28)
PAIR_RADIUS = (0.15, 0.20)
NEAR, FAR, MID = (0.28, 0.32), (0.68, 0.72), (0.42, 0.58)  # center ranges of the position regions
PAIR_NEAR, PAIR_FAR, PAIR_MID = (0.21, 0.25), (0.75, 0.79), (0.35, 0.65)
CENTER = (0.42, 0.58)  # objects of a world that does not caption positions
BACKGROUND_GRAY = (85, 165)  # the gray tone's brightness range
BACKGROUND_JITTER = 20  # other tones: brightness varies by this much around the tone
BACKGROUND_TINT = 12
GRADIENT_DEPTH = 0.35  # a gradient backdrop darkens from top to bottom by this fraction
CHECKER_PERIOD = 0.25  # checker cells per image side: 1 / this
CHECKER_CONTRAST = 22.0
DISTRACTOR_RADIUS = (0.09, 0.12)
DISTRACTOR_CORNERS = ((0.13, 0.13), (0.87, 0.13), (0.13, 0.87), (0.87, 0.87))
DISTRACTOR_JITTER = 0.03
COLOR_JITTER = 14
NOISE_AMPLITUDE = 28.0  # uniform per-pixel noise on everything (background and objects)
OUTLINE_WIDTH = 0.38  # fraction of the object's radius
STRIPE_FREQUENCY = 1.45  # stripe periods per object radius
STRIPE_DARK = 0.25  # the dark stripes: the object's color times this


def partner_color(color: str) -> str:
    """The distractor color that `correlation` ties to `color` (half-way round the color list)."""
    return COLORS[(COLORS.index(color) + len(COLORS) // 2) % len(COLORS)]


def preferred_tone(shape: str, tones: Sequence[str]) -> str:
    """The background tone that `correlation` ties to `shape` (cycling through the world's tones)."""
    return tones[SHAPES.index(shape) % len(tones)]


def pair_id(color: str, shape: str) -> int:
    """A (color, shape) pair as one int, stable across worlds (global vocabulary order)."""
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class ObjectSpec:
    """One object: its captioned attributes (None: not part of this world) and its render draws."""

    color: str
    shape: str
    texture: str | None
    position: str | None
    cx: float  # center, fraction of the image width (x to the right)
    cy: float  # center, fraction of the image height (y downwards)
    radius: float  # fraction of the image side
    angle: float  # degrees
    rgb: tuple[int, int, int]  # the color after jitter

    def describe(self, omit: Collection[str] = (), with_position: bool = True) -> str:
        """`a red striped circle on the left`; attributes in `omit` are left out (`a red shape`)."""
        words = []
        if "color" not in omit:
            words.append(self.color)
        if self.texture is not None and "texture" not in omit:
            words.append(TEXTURE_WORDS[self.texture])
        words.append(self.shape if "shape" not in omit else GENERIC_NOUN)
        text = f"{_article(words[0])} {' '.join(words)}"
        if with_position and self.position is not None and "position" not in omit:
            text += " " + POSITION_PHRASES[self.position]
        return text


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to render and caption one image.

    `seed`/`index`/`world` say where the spec came from (`World.spec_at`): the url of the image
    on the world server. They are None for specs built by hand.
    """

    objects: tuple[ObjectSpec, ...]
    relation: str | None  # for two objects: how the first relates to the second
    background: tuple[int, int, int]
    noise_seed: int
    template: int = 0
    tone: str = "gray"  # what `background` was drawn around (never captioned)
    backdrop: str = "plain"  # background pattern (never captioned)
    distractor: ObjectSpec | None = None  # an object nobody mentions, painted under the others
    omitted: tuple[str, ...] = ()  # attributes the caption leaves out (of every object)
    seed: int | None = None
    index: int | None = None
    world: str | None = None  # fingerprint of the World that drew it

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    @property
    def caption(self) -> str:
        return caption(self)

    @property
    def attributes(self) -> dict[str, Any]:
        """Probe labels: first object's attributes, the second object's with suffix 2, the relation,
        and what the caption does not say (tone, backdrop, distractor, omitted attributes)."""
        a, b = self.objects[0], self.objects[1] if self.n_objects > 1 else None
        d = self.distractor
        return {
            "n_objects": self.n_objects,
            "color": a.color, "shape": a.shape, "texture": a.texture, "position": a.position,
            "pair_id": pair_id(a.color, a.shape),
            "relation": self.relation,
            "color2": b.color if b else None, "shape2": b.shape if b else None,
            "texture2": b.texture if b else None, "position2": b.position if b else None,
            "pair_id2": pair_id(b.color, b.shape) if b else None,
            "tone": self.tone, "backdrop": self.backdrop,
            "distractor_color": d.color if d else None, "distractor_shape": d.shape if d else None,
            "omitted": ",".join(self.omitted),
        }

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The (color, shape) pairs in the image."""
        return tuple((o.color, o.shape) for o in self.objects)


def caption(spec: SceneSpec, omit: Collection[str] | None = None,
            omit_per_object: Sequence[Collection[str]] | None = None) -> str:
    """The caption of `spec` from its template. By default it leaves out `spec.omitted` (the
    world's own caption); `omit` leaves these attributes out of every object instead (partial
    captions: `a red shape on the left`), `omit_per_object` these per object."""
    if omit is None:
        omit = spec.omitted
    omits = list(omit_per_object) if omit_per_object is not None else [omit] * spec.n_objects
    if len(omits) != spec.n_objects:
        raise ValueError(f"omit_per_object has {len(omits)} entries for {spec.n_objects} objects")
    if spec.n_objects == 1:
        desc = spec.objects[0].describe(omits[0])
    else:
        # Positions are implied by the relation, so pair captions never state them.
        a, b = (o.describe(om, with_position=False) for o, om in zip(spec.objects, omits, strict=True))
        desc = f"{a} {RELATION_PHRASES[spec.relation]} {b}"
    return TEMPLATES[spec.template].format(desc)


def description(text: str) -> str:
    """A caption without its template ("a picture of a red circle" -> "a red circle"). Templates
    are drawn independently of the image, so captions with one description share one image
    distribution (the demo's oracle groups rows by it)."""
    for template in sorted(TEMPLATES[1:], key=len, reverse=True):
        prefix = template.replace("{}", "")
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def caption_words() -> list[str]:
    """Every word any caption or partial caption can use (the teacher's tokenizer vocabulary)."""
    words = {"a", "an", GENERIC_NOUN, *COLORS, *SHAPES, *TEXTURE_WORDS.values()}
    for phrase in (*POSITION_PHRASES.values(), *RELATION_PHRASES.values(), *TEMPLATES):
        words.update(w for w in phrase.replace("{}", " ").split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------
# The world


#: One object's captioned attributes: (color, shape, texture, position); None where not varied.
Content = tuple[str, str, str | None, str | None]


@dataclass(frozen=True)
class World:
    """A world's configuration. `attributes` lists what captions mention and what varies:
    a world without "texture" draws solid objects only, one without "position" centers them."""

    seed: int = 0  # default seed of `sample_specs` and `holdout_pairs`
    image_size: int = 32
    colors: tuple[str, ...] = COLORS
    shapes: tuple[str, ...] = SHAPES
    textures: tuple[str, ...] = TEXTURES
    positions: tuple[str, ...] = POSITIONS
    relations: tuple[str, ...] = RELATIONS
    attributes: tuple[str, ...] = ATTRIBUTES
    two_object_fraction: float = 0.0
    n_templates: int = 1  # how many of TEMPLATES captions use (1: only the bare description)
    tones: tuple[str, ...] = ("gray",)  # background tones drawn from (TONES)
    backdrops: tuple[str, ...] = ("plain",)  # background patterns drawn from (BACKDROPS)
    distractor_fraction: float = 0.0  # scenes with an unmentioned small object
    omit_fraction: float = 0.0  # each of texture and position is left out of a caption this often
    correlation: float = 0.0  # how often tone and distractor color follow the first object (module doc)

    def __post_init__(self) -> None:
        for name, allowed in (("colors", COLORS), ("shapes", SHAPES), ("textures", TEXTURES),
                              ("positions", POSITIONS), ("relations", RELATIONS), ("attributes", ATTRIBUTES),
                              ("tones", TONES), ("backdrops", BACKDROPS)):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)  # lists from JSON -> tuples (hashable, comparable)
            if not values or len(set(values)) != len(values) or not set(values) <= set(allowed):
                raise ValueError(f"World.{name} must be distinct values from {allowed}, got {values}")
        if not {"color", "shape"} <= set(self.attributes):
            raise ValueError("World.attributes must include color and shape")
        for name in ("two_object_fraction", "distractor_fraction", "omit_fraction", "correlation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.two_object_fraction > 0 and len(self.colors) * len(self.shapes) < 2:
            raise ValueError("two-object scenes need at least two (color, shape) pairs")
        if not 1 <= self.n_templates <= len(TEMPLATES):
            raise ValueError(f"n_templates must be in [1, {len(TEMPLATES)}]")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")

    # -- identity ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> World:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

    @property
    def fingerprint(self) -> str:
        """Short hash of everything that decides what `spec_at(seed, index)` draws (not `seed`,
        which is only a default). The server refuses urls of another world."""
        d = self.to_dict()
        d.pop("seed")
        d["version"] = WORLD_VERSION
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def texture_varies(self) -> bool:
        return "texture" in self.attributes

    @property
    def position_varies(self) -> bool:
        return "position" in self.attributes

    # -- sampling ------------------------------------------------------------------------------

    def spec_at(self, seed: int, index: int) -> SceneSpec:
        """Spec `index` of the stream `seed`: drawn from its own generator (random access)."""
        if seed < 0 or index < 0:
            raise ValueError("seed and index must be non-negative")
        rng = np.random.default_rng([0x57D1, seed, index])  # 0x57D1: this module's stream tag
        spec = self.random_spec(rng)
        return dataclasses.replace(spec, seed=seed, index=index, world=self.fingerprint)

    def sample_specs(self, n: int, seed: int | None = None, start: int = 0) -> list[SceneSpec]:
        """Specs `start .. start+n-1` of the stream `seed` (default: the world's seed)."""
        seed = self.seed if seed is None else seed
        return [self.spec_at(seed, i) for i in range(start, start + n)]

    def random_spec(self, rng: np.random.Generator, n_objects: int | None = None) -> SceneSpec:
        """A spec drawn with `rng`: content (attributes, relation), then the render draws."""
        if n_objects is None:
            n_objects = 2 if rng.random() < self.two_object_fraction else 1
        content, relation = self.draw_content(rng, n_objects)
        return self.place(rng, [content], [relation])[0]

    def draw_content(self, rng: np.random.Generator, n_objects: int) -> tuple[tuple[Content, ...], str | None]:
        def one() -> Content:
            color = self.colors[int(rng.integers(len(self.colors)))]
            shape = self.shapes[int(rng.integers(len(self.shapes)))]
            texture = self.textures[int(rng.integers(len(self.textures)))] if self.texture_varies else None
            position = self.positions[int(rng.integers(len(self.positions)))] if self.position_varies else None
            return color, shape, texture, position

        if n_objects == 1:
            return (one(),), None
        if n_objects != 2:
            raise ValueError(f"scenes have 1 or 2 objects, not {n_objects}")
        a = one()
        b = one()
        while b[:2] == a[:2]:  # two objects of one (color, shape) would make the relation ambiguous
            b = one()
        return (a, b), self.relations[int(rng.integers(len(self.relations)))]

    def place(self, rng: np.random.Generator, contents: Sequence[Sequence[Content]],
              relations: Sequence[str | None]) -> list[SceneSpec]:
        """Scenes with the given contents ((color, shape, texture, position) per object) and
        relations; `rng` draws only how they look and what the caption leaves out: template,
        placement within the position's region, size, angle, color jitter, background tone and
        pattern, distractor, omitted attributes, noise. Tone and distractor color follow the first
        object with probability `correlation`. Vectorised: the teacher calls it for every batch."""
        n = len(contents)
        if len(relations) != n:
            raise ValueError("one relation (None for one object) per scene")
        objs: list[tuple[Content, bool]] = []
        for content, relation in zip(contents, relations, strict=True):
            if len(content) == 2:
                if relation is None:
                    raise ValueError("a two-object scene needs a relation")
                places = RELATION_POSITIONS[relation]
                objs += [((c, s, t, places[i]), True) for i, (c, s, t, _) in enumerate(content)]
            elif len(content) == 1:
                objs.append((tuple(content[0]), False))
            else:
                raise ValueError(f"scenes have 1 or 2 objects, not {len(content)}")
        m = len(objs)
        templates = rng.integers(self.n_templates, size=n)
        grays = rng.integers(BACKGROUND_GRAY[0], BACKGROUND_GRAY[1] + 1, size=n)
        tints = rng.integers(-BACKGROUND_TINT, BACKGROUND_TINT + 1, size=(n, 3))
        noise_seeds = rng.integers(2**32, size=n)
        unit = rng.random((m, 4))  # x, y within the region; radius; angle
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=(m, 3))
        objects = []
        for k, ((color, shape, texture, position), pair) in enumerate(objs):
            near, far, mid = (PAIR_NEAR, PAIR_FAR, PAIR_MID) if pair else (NEAR, FAR, MID)
            rx, ry = {"left": (near, mid), "right": (far, mid), "top": (mid, near), "bottom": (mid, far),
                      None: (CENTER, CENTER)}[position]
            r_lo, r_hi = PAIR_RADIUS if pair else SINGLE_RADIUS
            u = unit[k].tolist()
            rgb = tuple(min(255, max(0, v + int(j))) for v, j in zip(COLOR_RGB[color], jitter[k], strict=True))
            objects.append(ObjectSpec(
                color=color, shape=shape, texture=texture, position=position,
                cx=rx[0] + u[0] * (rx[1] - rx[0]), cy=ry[0] + u[1] * (ry[1] - ry[0]),
                radius=r_lo + u[2] * (r_hi - r_lo), angle=MAX_ANGLE * (2.0 * u[3] - 1.0), rgb=rgb))
        # What the caption does not say (drawn last: the draws above keep their order).
        extra = rng.random((n, 4))  # tone follows?, distractor?, distractor color follows?, spare
        tone_draw = rng.integers(len(self.tones), size=n)
        backdrop_draw = rng.integers(len(self.backdrops), size=n)
        lift = rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, size=n)
        omit_draw = rng.random((n, len(OMITTABLE))) < self.omit_fraction
        d_color = rng.integers(len(self.colors), size=n)
        d_shape = rng.integers(len(self.shapes), size=n)
        d_unit = rng.random((n, 5))  # corner, x, y, radius, angle
        specs, k = [], 0
        for i, content in enumerate(contents):
            first = content[0]
            corr = extra[i, 0] < self.correlation
            tone = preferred_tone(first[1], self.tones) if corr else self.tones[int(tone_draw[i])]
            if tone == "gray":
                background = tuple(int(grays[i] + t) for t in tints[i])
            else:
                background = tuple(int(v + lift[i] + t) for v, t in zip(TONE_RGB[tone], tints[i], strict=True))
            distractor = None
            if extra[i, 1] < self.distractor_fraction:
                follows = extra[i, 2] < self.correlation and partner_color(first[0]) in self.colors
                color = partner_color(first[0]) if follows else self.colors[int(d_color[i])]
                u = d_unit[i].tolist()
                corner = DISTRACTOR_CORNERS[min(int(u[0] * 4), 3)]
                distractor = ObjectSpec(
                    color=color, shape=self.shapes[int(d_shape[i])], texture="solid" if self.texture_varies else None,
                    position=None, cx=corner[0] + DISTRACTOR_JITTER * (2 * u[1] - 1),
                    cy=corner[1] + DISTRACTOR_JITTER * (2 * u[2] - 1),
                    radius=DISTRACTOR_RADIUS[0] + u[3] * (DISTRACTOR_RADIUS[1] - DISTRACTOR_RADIUS[0]),
                    angle=MAX_ANGLE * (2.0 * u[4] - 1.0), rgb=COLOR_RGB[color])
            omittable = [a for a in OMITTABLE if a in self.attributes]
            omitted = tuple(a for a, drop in zip(OMITTABLE, omit_draw[i], strict=True) if drop and a in omittable)
            specs.append(SceneSpec(objects=tuple(objects[k:k + len(content)]),
                                   relation=relations[i] if len(content) == 2 else None,
                                   background=background, noise_seed=int(noise_seeds[i]), template=int(templates[i]),
                                   tone=tone, backdrop=self.backdrops[int(backdrop_draw[i])], distractor=distractor,
                                   omitted=omitted))
            k += len(content)
        return specs

    # -- captions ------------------------------------------------------------------------------

    def single_object_contents(self) -> list[tuple[str, str, str | None, str | None]]:
        """Every single-object (color, shape, texture, position) of the world, in a fixed order."""
        textures = self.textures if self.texture_varies else (None,)
        positions = self.positions if self.position_varies else (None,)
        return [(c, s, t, p) for c in self.colors for s in self.shapes for t in textures for p in positions]

    def all_single_object_captions(self) -> list[str]:
        """The canonical (template 0) caption of every single-object content, in
        `single_object_contents` order: 8 x 6 x 3 x 4 = 576 for the default world."""
        return [ObjectSpec(c, s, t, p, 0.5, 0.5, 0.15, 0.0, (0, 0, 0)).describe()
                for c, s, t, p in self.single_object_contents()]

    def all_single_object_labels(self) -> list[dict[str, Any]]:
        """Attribute labels of `all_single_object_captions`, same order."""
        return [{"color": c, "shape": s, "texture": t, "position": p, "pair_id": pair_id(c, s)}
                for c, s, t, p in self.single_object_contents()]

    # -- composition hold-out ------------------------------------------------------------------

    def holdout_pairs(self, fraction: float, seed: int | None = None) -> set[tuple[str, str]]:
        """A seeded set of (color, shape) pairs to hold out of training, about `fraction` of all.

        The kept pairs still cover every color and every shape, so each held-out pair is a new
        composition of seen attributes (never an unseen word). Raises if `fraction` is too high
        for that (the default world keeps at least 8 of its 48 pairs).
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        seed = self.seed if seed is None else seed
        rng = np.random.default_rng([0x401D, seed])
        n_c, n_s = len(self.colors), len(self.shapes)
        all_pairs = [(c, s) for c in self.colors for s in self.shapes]
        n_held = round(fraction * len(all_pairs))
        n_cover = max(n_c, n_s)
        if n_held > len(all_pairs) - n_cover:
            raise ValueError(f"holding out {n_held} of {len(all_pairs)} pairs leaves fewer than the {n_cover} "
                             "needed to show every color and shape; lower `fraction`")
        # A random covering set first (color i with shape i, cycling the shorter list), then random others.
        pc, ps = rng.permutation(n_c), rng.permutation(n_s)
        kept = {(self.colors[pc[i % n_c]], self.shapes[ps[i % n_s]]) for i in range(n_cover)}
        rest = [p for p in all_pairs if p not in kept]
        order = rng.permutation(len(rest))
        kept |= {rest[i] for i in order[: len(all_pairs) - n_held - len(kept)]}
        return {p for p in all_pairs if p not in kept}


def demo_world(seed: int = 0, image_size: int = 32) -> World:
    """The demo's world: every feature that makes captions under-specify their images switched on
    (module docstring). One setting, chosen by hand and then measured (the teacher's held-out
    gap, oracle cosine - text-shift cosine, `demo.teacher.heldout_gap`: 0.137; BENCHMARKS.md);
    no other setting has been tried."""
    return World(seed=seed, image_size=image_size, two_object_fraction=0.3, n_templates=len(TEMPLATES), tones=TONES,
                 backdrops=BACKDROPS, distractor_fraction=0.6, omit_fraction=0.5, correlation=0.8)


def split_by_pairs(specs: Iterable[SceneSpec], held_out: Collection[tuple[str, str]]
                   ) -> tuple[list[SceneSpec], list[SceneSpec]]:
    """(kept, held): a spec is held if any of its objects is a held-out (color, shape) pair, so
    the kept specs never show a held-out composition."""
    held_set = set(held_out)
    kept, held = [], []
    for spec in specs:
        (held if any(p in held_set for p in spec.pairs) else kept).append(spec)
    return kept, held


# ----------------------------------------------------------------------------------------------
# Rendering (vectorised over a batch; float32, exactly-rounded ops only)


def _star_lines() -> np.ndarray:
    """Unit normals of the 5 lines of a pentagram with outer radius 1 (point up, y down). A point
    is in the filled star iff it is on the center's side of at least 4 of them; the lines lie at
    distance cos(72 deg) from the center."""
    return np.array([(math.sin(math.radians(72 * k)), -math.cos(math.radians(72 * k)))
                     for k in range(5)], dtype=np.float32)


_STAR_N = _star_lines()
_STAR_D = np.float32(math.cos(math.radians(72)))
_F = np.float32


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in a shape of radius about 1, in object coordinates (u right, v down)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= _F(1.0)
    if shape == "square":
        return np.maximum(au, av) <= _F(0.86)
    if shape == "triangle":  # apex up, equilateral
        return (v <= _F(0.62)) & (v >= _F(-1.0) + _F(1.7320508) * au)
    if shape == "diamond":  # taller than wide, so no small rotation turns a square into it
        return au * _F(1.0 / 0.72) + av * _F(1.0 / 1.08) <= _F(1.0)
    if shape == "cross":
        return ((au <= _F(0.32)) & (av <= _F(1.0))) | ((au <= _F(1.0)) & (av <= _F(0.32)))
    if shape == "star":
        s = _F(1.0 / 1.08)
        count = np.zeros(u.shape, dtype=np.int8)
        for nx, ny in _STAR_N:
            count += (u * (nx * s) + v * (ny * s)) <= _STAR_D
        return count >= 4
    raise ValueError(f"unknown shape {shape!r}")


def _hash_noise(seeds: np.ndarray, n: int) -> np.ndarray:
    """[B, n] uniform noise in [-1, 1) from (seed, element index): integer hashing, no RNG state."""
    idx = np.arange(n, dtype=np.uint32)[None, :]
    h = idx * np.uint32(0x9E3779B1) + seeds.astype(np.uint32)[:, None] * np.uint32(0x85EBCA77)
    # lowbias32 finaliser (Chris Wellons): good avalanche for consecutive indices.
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * _F(2.0 / 2**24) - _F(1.0)


def _paint(img: np.ndarray, noise: np.ndarray, rows: list[int], objs: list[ObjectSpec], coords: np.ndarray) -> None:
    """Paint `objs[k]` into image `rows[k]` of `img` (in place)."""
    cx = np.array([o.cx for o in objs], dtype=np.float32)[:, None, None]
    cy = np.array([o.cy for o in objs], dtype=np.float32)[:, None, None]
    inv_r = np.array([1.0 / o.radius for o in objs], dtype=np.float32)[:, None, None]
    # Rotation by the object's angle: cos/sin per object in float64 Python math (deterministic).
    cos = np.array([math.cos(math.radians(o.angle)) for o in objs], dtype=np.float32)[:, None, None]
    sin = np.array([math.sin(math.radians(o.angle)) for o in objs], dtype=np.float32)[:, None, None]
    dx = (coords[None, None, :] - cx) * inv_r  # [M, 1, S]
    dy = (coords[None, :, None] - cy) * inv_r  # [M, S, 1]
    u = cos * dx + sin * dy  # [M, S, S]
    v = cos * dy - sin * dx
    mask = np.zeros(u.shape, dtype=bool)
    for shape in {o.shape for o in objs}:
        sel = np.array([o.shape == shape for o in objs])
        mask[sel] = _inside(shape, u[sel], v[sel])
        outl = np.array([o.shape == shape and o.texture == "outline" for o in objs])
        if outl.any():
            k = _F(1.0 / (1.0 - OUTLINE_WIDTH))
            mask[outl] &= ~_inside(shape, u[outl] * k, v[outl] * k)
    rgb = np.array([o.rgb for o in objs], dtype=np.float32)[:, None, None, :]
    color = np.broadcast_to(rgb, (*u.shape, 3))
    striped = np.array([o.texture == "striped" for o in objs])
    if striped.any():
        t = v[striped] * _F(STRIPE_FREQUENCY)
        dark = (t - np.floor(t)) >= _F(0.5)
        color = color.copy()
        color[striped] = np.where(dark[..., None], rgb[striped] * _F(STRIPE_DARK), rgb[striped])
    # Objects get half the background's noise: flat colors would be a give-away, not a texture.
    painted = color + noise[rows] * _F(0.5)
    img[rows] = np.where(mask[..., None], painted, img[rows])


def render_batch(specs: Sequence[SceneSpec], size: int) -> np.ndarray:
    """Render specs to a uint8 array [B, size, size, 3]; row i equals `render(specs[i], size)`."""
    b, s = len(specs), int(size)
    if b == 0:
        return np.zeros((0, s, s, 3), dtype=np.uint8)
    noise = _hash_noise(np.array([sp.noise_seed for sp in specs], dtype=np.uint64) & 0xFFFFFFFF, s * s * 3)
    noise = noise.reshape(b, s, s, 3) * _F(NOISE_AMPLITUDE)
    img = np.array([sp.background for sp in specs], dtype=np.float32)[:, None, None, :] + noise
    coords = (np.arange(s, dtype=np.float32) + _F(0.5)) / _F(s)
    gradient = np.array([sp.backdrop == "gradient" for sp in specs])
    if gradient.any():  # darker towards the bottom
        img[gradient] *= (_F(1.0) - _F(GRADIENT_DEPTH) * coords)[None, :, None, None]
    checker = np.array([sp.backdrop == "checker" for sp in specs])
    if checker.any():
        cells = np.floor(coords * _F(1.0 / CHECKER_PERIOD)).astype(np.int32)
        sign = np.where((cells[:, None] + cells[None, :]) % 2 == 0, _F(1.0), _F(-1.0))
        img[checker] += (sign * _F(CHECKER_CONTRAST))[None, :, :, None]
    rows = [i for i, sp in enumerate(specs) if sp.distractor is not None]
    if rows:  # under the mentioned objects, which stay whole
        _paint(img, noise, rows, [specs[i].distractor for i in rows], coords)
    for slot in range(max(sp.n_objects for sp in specs)):  # paint first objects, then second ones
        rows = [i for i, sp in enumerate(specs) if sp.n_objects > slot]
        _paint(img, noise, rows, [specs[i].objects[slot] for i in rows], coords)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(spec: SceneSpec, size: int = 32) -> Image.Image:
    """The RGB image of `spec`, `size` x `size` pixels."""
    return Image.fromarray(render_batch([spec], size)[0], mode="RGB")


def encode_image(spec: SceneSpec, size: int, fmt: str = "png") -> bytes:
    """`render` encoded as the world server sends it."""
    buf = io.BytesIO()
    render(spec, size).save(buf, format={"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Url list for the download stage

URL_LIST_COLUMNS = ("url", "caption", "n_objects", "color", "shape", "texture", "position", "pair_id",
                    "relation", "color2", "shape2", "texture2", "position2", "pair_id2", "tone", "backdrop",
                    "distractor_color", "distractor_shape", "omitted", "world_seed", "world_index")


def world_url(base_url: str, spec: SceneSpec, size: int | None = None, fmt: str = "png") -> str:
    """`<base>/world/<seed>/<index>.png?w=<fingerprint>[&size=N]` of a spec from `World.spec_at`."""
    if spec.seed is None or spec.index is None or spec.world is None:
        raise ValueError("only specs drawn by World.spec_at/sample_specs have a url")
    query = {"w": spec.world, **({"size": str(size)} if size else {})}
    return f"{base_url.rstrip('/')}/world/{spec.seed}/{spec.index}.{fmt}?{urllib.parse.urlencode(query)}"


def write_url_list(specs: Sequence[SceneSpec], base_url: str, path: str | os.PathLike,
                   size: int | None = None, fmt: str = "png") -> Path:
    """Write the Parquet url list the download stage reads: url, caption, and attribute columns.

    Missing values (the second object of a one-object scene, texture in a world without it) are
    "" for strings and -1 for ints: img2dataset copies extra columns into json, which has no NaN.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: dict[str, list[Any]] = {c: [] for c in URL_LIST_COLUMNS}
    for spec in specs:
        attrs = spec.attributes
        rows["url"].append(world_url(base_url, spec, size, fmt))
        rows["caption"].append(caption(spec))
        for c in URL_LIST_COLUMNS[2:-2]:
            value = attrs[c]
            rows[c].append((-1 if c in ("pair_id", "pair_id2") else NO_VALUE) if value is None else value)
        rows["world_seed"].append(spec.seed)
        rows["world_index"].append(spec.index)
    ints = {"n_objects", "pair_id", "pair_id2", "world_seed", "world_index"}
    schema = pa.schema([(c, pa.int64() if c in ints else pa.string()) for c in URL_LIST_COLUMNS])
    table = pa.table(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# The loopback image server

_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_SERVED_SIZE = 1024


class _WorldHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "eclipse-world/1"
    world: World  # set on the subclass serve_world builds

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # img2dataset sends thousands of requests; access logs would drown real output

    def _send(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _spec(self, parts: list[str], query: dict[str, list[str]]) -> tuple[SceneSpec, str] | str:
        """The spec and extension a /world/<seed>/<index>.<ext> path names, or an error message."""
        stem, _, ext = parts[2].rpartition(".")
        if not (parts[1].isdigit() and stem.isdigit() and ext.lower() in _CONTENT_TYPES):
            return "expected /world/<seed>/<index>.<png|jpg|webp>"
        want = query.get("w", [None])[0]
        if want is not None and want != self.world.fingerprint:
            return f"this server renders world {self.world.fingerprint}, the url asks for world {want}"
        return self.world.spec_at(int(parts[1]), int(stem)), ext.lower()

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        url = urllib.parse.urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = urllib.parse.parse_qs(url.query)
        try:
            if parts == ["healthz"]:
                self._send(200, b"ok")
            elif parts == ["world"]:
                self._send(200, json.dumps({**self.world.to_dict(), "fingerprint": self.world.fingerprint}).encode(),
                           "application/json")
            elif len(parts) == 3 and parts[0] in ("world", "caption"):
                found = self._spec(parts, query)
                if isinstance(found, str):
                    self._send(404, found.encode())
                elif parts[0] == "caption":
                    self._send(200, caption(found[0]).encode(), "text/plain; charset=utf-8")
                else:
                    size = int(query.get("size", [self.world.image_size])[0])
                    if not 8 <= size <= MAX_SERVED_SIZE:
                        self._send(400, f"size must be in [8, {MAX_SERVED_SIZE}]".encode())
                        return
                    spec, ext = found
                    self._send(200, encode_image(spec, size, ext), _CONTENT_TYPES[ext])
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (e.g. its timeout fired): not our error

    do_HEAD = do_GET


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # img2dataset opens many connections at once


def serve_world(world: World, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server for `world`: `/world/<seed>/<index>.png` renders
    `world.spec_at(seed, index)` (`?size=N`, `?w=<fingerprint>` checked), `/caption/<seed>/<index>.png`
    its caption, `/world` the config, `/healthz` ok. Call `serve_forever()` on it (any thread)."""
    handler = type("WorldHandler", (_WorldHandler,), {"world": world})
    return _Server((host, port), handler)


def _serve_main(world: World, host: str, port: int) -> None:
    httpd = serve_world(world, host, port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop by pid -> clean exit
    print(f"PORT {httpd.server_address[1]}", flush=True)  # the parent waits for this line
    try:
        httpd.serve_forever(poll_interval=0.1)
    finally:
        httpd.server_close()


class WorldServer:
    """Runs `python -m demo.world serve` in a child process (its own GIL: img2dataset's
    many connections never compete with the caller) and stops it by pid.

        with WorldServer(world) as srv:
            write_url_list(world.sample_specs(100), srv.base_url, "urls.parquet")
    """

    def __init__(self, world: World | None = None, host: str = "127.0.0.1", port: int = 0,
                 start_timeout: float = 30.0) -> None:
        self.world = world or World()
        self.host, self.port = host, port
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("world server not started")
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, spec: SceneSpec, size: int | None = None, fmt: str = "png") -> str:
        return world_url(self.base_url, spec, size, fmt)

    def start(self) -> WorldServer:
        # The child must import this package whether or not it is installed: put its root on the path.
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-m", "demo.world", "serve", "--host", self.host, "--port", str(self.port),
               "--world", json.dumps(self.world.to_dict())]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        # Bounded wait for "PORT <n>": a wedged child fails the caller instead of hanging it.
        ready, _, _ = select.select([self.proc.stdout], [], [], self.start_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"world server failed to start (got {line!r})")
        self.port = int(line.split()[1])
        while True:  # the socket is bound before the line is printed; one probe confirms it serves
            try:
                with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def __enter__(self) -> WorldServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------
# Command line


def contact_sheet(specs: Sequence[SceneSpec], size: int = 64, columns: int = 8) -> Image.Image:
    """A grid of renders, for eyeballing the world."""
    rows = math.ceil(len(specs) / columns)
    sheet = Image.new("RGB", (columns * size, rows * size), (255, 255, 255))
    for i, spec in enumerate(specs):
        sheet.paste(render(spec, size), ((i % columns) * size, (i // columns) * size))
    return sheet


def _world_from_args(args: argparse.Namespace) -> World:
    if args.world:
        return World.from_dict(json.loads(args.world))
    return World(seed=args.seed, image_size=args.image_size, two_object_fraction=args.two_object_fraction)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.world", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="run the loopback image server; prints `PORT <n>` when bound")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=0, help="0: a free ephemeral port")
    p_urls = sub.add_parser("urls", help="write a Parquet url list pointing at a world server")
    p_urls.add_argument("--n", type=int, required=True)
    p_urls.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8765")
    p_urls.add_argument("--out", required=True)
    p_sheet = sub.add_parser("sheet", help="write a contact sheet PNG of the first specs")
    p_sheet.add_argument("--n", type=int, default=64)
    p_sheet.add_argument("--size", type=int, default=64)
    p_sheet.add_argument("--out", required=True)
    for p in (p_serve, p_urls, p_sheet):
        p.add_argument("--world", default=None, help="World config as JSON (overrides the flags below)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--image-size", type=int, default=32)
        p.add_argument("--two-object-fraction", type=float, default=0.0)
    args = ap.parse_args(argv)
    world = _world_from_args(args)
    if args.cmd == "serve":
        _serve_main(world, args.host, args.port)
    elif args.cmd == "urls":
        out = write_url_list(world.sample_specs(args.n), args.base_url, args.out)
        print(f"{args.n} urls -> {out}")
    else:
        contact_sheet(world.sample_specs(args.n), args.size).save(args.out)
        print(f"{args.n} renders -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
