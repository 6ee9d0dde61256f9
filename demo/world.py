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
seed), so its pixels (`demo.render.render`) are a pure function of the spec.
`World.spec_at(seed, index)` draws spec `index` from its own generator, so any sample is
reproducible on its own; this is how the loopback image server (`demo.server`) renders
`/world/<seed>/<index>.png` without a list of specs. `write_url_list` writes the Parquet url
list, pointing at that server, that the demo's download stage reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import urllib.parse
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
DISTRACTOR_RADIUS = (0.09, 0.12)
DISTRACTOR_CORNERS = ((0.13, 0.13), (0.87, 0.13), (0.13, 0.87), (0.87, 0.87))
DISTRACTOR_JITTER = 0.03
COLOR_JITTER = 14


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


def _object(content: Content, pair: bool, u: list[float], jitter: np.ndarray) -> ObjectSpec:
    """A captioned object placed in its position's region; `u`: uniform draws (x, y, radius, angle)."""
    color, shape, texture, position = content
    near, far, mid = (PAIR_NEAR, PAIR_FAR, PAIR_MID) if pair else (NEAR, FAR, MID)
    rx, ry = {"left": (near, mid), "right": (far, mid), "top": (mid, near), "bottom": (mid, far),
              None: (CENTER, CENTER)}[position]
    r_lo, r_hi = PAIR_RADIUS if pair else SINGLE_RADIUS
    rgb = tuple(min(255, max(0, v + int(j))) for v, j in zip(COLOR_RGB[color], jitter, strict=True))
    return ObjectSpec(color=color, shape=shape, texture=texture, position=position,
                      cx=rx[0] + u[0] * (rx[1] - rx[0]), cy=ry[0] + u[1] * (ry[1] - ry[0]),
                      radius=r_lo + u[2] * (r_hi - r_lo), angle=MAX_ANGLE * (2.0 * u[3] - 1.0), rgb=rgb)


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
        objects = [_object(content, pair, unit[k].tolist(), jitter[k]) for k, (content, pair) in enumerate(objs)]
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
                distractor = self._distractor(color, self.shapes[int(d_shape[i])], d_unit[i].tolist())
            omittable = [a for a in OMITTABLE if a in self.attributes]
            omitted = tuple(a for a, drop in zip(OMITTABLE, omit_draw[i], strict=True) if drop and a in omittable)
            specs.append(SceneSpec(objects=tuple(objects[k:k + len(content)]),
                                   relation=relations[i] if len(content) == 2 else None,
                                   background=background, noise_seed=int(noise_seeds[i]), template=int(templates[i]),
                                   tone=tone, backdrop=self.backdrops[int(backdrop_draw[i])], distractor=distractor,
                                   omitted=omitted))
            k += len(content)
        return specs

    def _distractor(self, color: str, shape: str, u: list[float]) -> ObjectSpec:
        """The unmentioned small object in a corner; `u`: uniform draws (corner, x, y, radius, angle)."""
        corner = DISTRACTOR_CORNERS[min(int(u[0] * 4), 3)]
        return ObjectSpec(
            color=color, shape=shape, texture="solid" if self.texture_varies else None,
            position=None, cx=corner[0] + DISTRACTOR_JITTER * (2 * u[1] - 1),
            cy=corner[1] + DISTRACTOR_JITTER * (2 * u[2] - 1),
            radius=DISTRACTOR_RADIUS[0] + u[3] * (DISTRACTOR_RADIUS[1] - DISTRACTOR_RADIUS[0]),
            angle=MAX_ANGLE * (2.0 * u[4] - 1.0), rgb=COLOR_RGB[color])

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
