"""Pixels of the synthetic world: `render(spec, size)` draws a `SceneSpec` (demo.world).

Rendering is a pure function of the spec, vectorised over a batch, and uses only exactly-rounded
float32 arithmetic per pixel (no trig, no transcendental functions), so a batch render and a
one-image render give identical bytes on any machine. A change here changes every image: bump
`demo.world.WORLD_VERSION`, which is part of every url's fingerprint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from demo.world import ObjectSpec, SceneSpec

# In units of the image side, or of an object's radius where said.
GRADIENT_DEPTH = 0.35  # a gradient backdrop darkens from top to bottom by this fraction
CHECKER_PERIOD = 0.25  # checker cells per image side: 1 / this
CHECKER_CONTRAST = 22.0
NOISE_AMPLITUDE = 28.0  # uniform per-pixel noise on everything (background and objects)
OUTLINE_WIDTH = 0.38  # fraction of the object's radius
STRIPE_FREQUENCY = 1.45  # stripe periods per object radius
STRIPE_DARK = 0.25  # the dark stripes: the object's color times this


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


def contact_sheet(specs: Sequence[SceneSpec], size: int = 64, columns: int = 8) -> Image.Image:
    """A grid of renders, for eyeballing the world."""
    rows = math.ceil(len(specs) / columns)
    sheet = Image.new("RGB", (columns * size, rows * size), (255, 255, 255))
    for i, spec in enumerate(specs):
        sheet.paste(render(spec, size), ((i % columns) * size, (i // columns) * size))
    return sheet
