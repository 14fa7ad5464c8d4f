"""The `shapes` images as pure NumPy + Pillow: importable without TensorFlow or TFDS.

The TFDS builder (:mod:`cnn_jax.datasets.shapes`) stores these images as JPEGs; a script on a
machine without TensorFlow (an accelerator) draws the same images with :func:`make_arrays` and
feeds them as device-resident arrays. Example ``i`` of a split depends only on
``(seed, split, i)`` (and the level), so a config always gives the same pixels.

Two levels:

- ``standard`` (``CLASSES``, 10 classes): one filled figure on a two-colour gradient background
  with Gaussian noise; position, size (radius 0.2-0.4 of the side), rotation and colours vary
  independently of the class. Small CNNs learn it to >90% in a few epochs.
- ``hard`` (``HARD_CLASSES``, 20 classes: the 10 plus pentagon, hexagon, diamond, trapezoid, ell,
  tee, chevron, hourglass, four-point star and frame): smaller figures (radius 0.22-0.36), a
  textured background (random gratings), a striped texture inside 30% of the figures, 1-2 clutter
  items (small irregular blobs or thin bars that are no class), and in 30% of the images a bar
  that occludes part of the figure. Made so that the best small network does not saturate in a CPU
  budget (experiments/).
"""

from __future__ import annotations

import io
import math
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES: Tuple[str, ...] = (
    "circle", "ellipse", "ring", "half_disc", "triangle",
    "square", "star", "cross", "arrow", "crescent",
)
HARD_CLASSES: Tuple[str, ...] = CLASSES + (
    "pentagon", "hexagon", "diamond", "trapezoid", "ell",
    "tee", "chevron", "hourglass", "star4", "frame",
)
LEVELS: Tuple[str, ...] = ("standard", "hard")
JPEG_QUALITY = 90
SPLIT_IDS = {"train": 0, "validation": 1}


def classes(level: str = "standard") -> Tuple[str, ...]:
    """The class names of a level."""
    if level not in LEVELS:
        raise ValueError(f"unknown shapes level {level!r}; choose from {', '.join(LEVELS)}")
    return HARD_CLASSES if level == "hard" else CLASSES


# ----------------------------------------------------------------------------- geometry

def _regular(n: int, r: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _figure(label: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray | None]:
    """(outline, hole) of class ``label`` in unit coordinates (circumradius ~1); hole may be None.

    The hole is cut out of the filled outline; it gives rings and crescents without drawing the
    background colour over the figure.
    """
    name = HARD_CLASSES[label]
    if name == "circle":
        return _regular(64), None
    if name == "ellipse":
        return _regular(64) * np.array([1.0, rng.uniform(0.4, 0.6)]), None
    if name == "ring":
        return _regular(64), _regular(64, rng.uniform(0.5, 0.65))
    if name == "half_disc":
        a = np.linspace(0, np.pi, 33)
        return np.stack([np.cos(a), np.sin(a) - 0.4], axis=1), None
    if name == "triangle":
        return _regular(3, phase=np.pi / 2), None
    if name == "square":
        return _regular(4, phase=np.pi / 4), None
    if name == "star":
        pts = _regular(10, phase=np.pi / 2)
        pts[1::2] *= 0.42
        return pts, None
    if name == "cross":
        w = 0.32
        return np.array([[w, w], [1, w], [1, -w], [w, -w], [w, -1], [-w, -1],
                         [-w, -w], [-1, -w], [-1, w], [-w, w], [-w, 1], [w, 1]]), None
    if name == "arrow":
        return np.array([[-1, 0.2], [0.1, 0.2], [0.1, 0.6], [1, 0], [0.1, -0.6],
                         [0.1, -0.2], [-1, -0.2]]), None
    if name == "crescent":
        shift = rng.uniform(0.35, 0.5)
        return _regular(64), _regular(64, 0.85) + np.array([shift, 0.0])
    # The hard level's extra classes.
    if name == "pentagon":
        return _regular(5, phase=np.pi / 2), None
    if name == "hexagon":
        return _regular(6), None
    if name == "diamond":
        return np.array([[1, 0], [0, 0.55], [-1, 0], [0, -0.55]], float), None
    if name == "trapezoid":
        return np.array([[-1, -0.55], [1, -0.55], [0.45, 0.55], [-0.45, 0.55]]), None
    if name == "ell":
        return np.array([[-0.7, -1], [0.8, -1], [0.8, -0.55], [-0.25, -0.55], [-0.25, 1],
                         [-0.7, 1]]), None
    if name == "tee":
        return np.array([[-1, 1], [1, 1], [1, 0.55], [0.22, 0.55], [0.22, -1], [-0.22, -1],
                         [-0.22, 0.55], [-1, 0.55]]), None
    if name == "chevron":
        return np.array([[-1, 0.8], [0, -0.2], [1, 0.8], [1, 0.1], [0, -0.9], [-1, 0.1]]), None
    if name == "hourglass":
        return np.array([[-0.8, 1], [0.8, 1], [0.12, 0], [0.8, -1], [-0.8, -1],
                         [-0.12, 0]]), None
    if name == "star4":
        pts = _regular(8, phase=np.pi / 2)
        pts[1::2] *= 0.35
        return pts, None
    if name == "frame":
        return _regular(4, phase=np.pi / 4), _regular(4, rng.uniform(0.5, 0.62), phase=np.pi / 4)
    raise AssertionError(name)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _rotation(theta: float) -> np.ndarray:
    return np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def _mask(s: int, polygons, ss: int) -> np.ndarray:
    """Antialiased coverage ``[s, s, 1]`` in [0, 1] of (points in pixels, fill 255/0) polygons:
    drawn ``ss`` times larger and box-filtered down (supersampling)."""
    mask = Image.new("L", (s * ss, s * ss), 0)
    draw = ImageDraw.Draw(mask)
    for xy, fill in polygons:
        if xy is not None:
            draw.polygon([tuple(p) for p in xy * ss], fill=fill)
    return np.asarray(mask.resize((s, s), Image.BOX), np.float32)[..., None] / 255.0


def render(label: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one ``[S, S, 3]`` uint8 standard-level image of class ``label`` from ``rng``."""
    s = image_size
    outline, hole = _figure(label, rng)
    radius = rng.uniform(0.2, 0.4) * s
    margin = s / 16  # the 0.875 evaluation centre crop removes s/16 on each side
    lo, hi = margin + radius, s - margin - radius
    centre = rng.uniform(lo, hi, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    rot = _rotation(theta)

    # Antialiasing by supersampling: draw the mask large, box-filter it down.
    ss = 4 if s <= 96 else 2
    alpha = _mask(s, [(None if pts is None else pts @ rot.T * radius + centre, fill)
                      for pts, fill in ((outline, 255), (hole, 0))], ss)

    # Background: linear gradient between two nearby random colours in a random direction.
    bg0 = rng.uniform(0, 1, 3)
    bg1 = np.clip(bg0 + rng.normal(0, 0.15, 3), 0, 1)
    phi = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-0.5, 0.5, s, dtype=np.float32)
    t = np.clip(0.5 + ramp[None, :] * math.cos(phi) + ramp[:, None] * math.sin(phi), 0, 1)
    t = t[..., None]
    background = bg0.astype(np.float32) * (1 - t) + bg1.astype(np.float32) * t
    # Figure colour: any colour whose luminance differs enough from the background's to be seen.
    for _ in range(32):
        fg = rng.uniform(0, 1, 3)
        if abs(_luminance(fg) - _luminance((bg0 + bg1) / 2)) > 0.25:
            break
    else:
        fg = 1.0 - (bg0 + bg1) / 2
    image = background * (1 - alpha) + fg.astype(np.float32) * alpha
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0, 0.08))
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def _grating(s: int, rng: np.random.Generator, waves: int) -> np.ndarray:
    """A texture in [0, 1]: the sum of ``waves`` random sinusoidal gratings, ``[s, s]``."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    t = np.zeros((s, s), np.float32)
    for _ in range(waves):
        freq = rng.uniform(1.5, 6.0)
        phi = rng.uniform(0, 2 * np.pi)
        t += np.sin(2 * np.pi * freq * (xx * math.cos(phi) + yy * math.sin(phi))
                    + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return 0.5 + 0.5 * t / waves


def render_hard(label: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one ``[S, S, 3]`` uint8 hard-level image of class ``label`` from ``rng``: small
    figure, textured background and figure, clutter, and an occluding bar half the time."""
    s = image_size
    ss = 4 if s <= 96 else 2
    margin = s / 16
    outline, hole = _figure(label, rng)
    radius = rng.uniform(0.22, 0.36) * s
    centre = rng.uniform(margin + radius, s - margin - radius, size=2)
    rot = _rotation(rng.uniform(0, 2 * np.pi))

    # Background: two random colours mixed by a grating texture.
    bg0, bg1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    bg1 = bg0 + (bg1 - bg0) * rng.uniform(0.1, 0.3)  # contrast below the figure's
    t = _grating(s, rng, 2)[..., None]
    image = (bg0 * (1 - t) + bg1 * t).astype(np.float32)
    bg_lum = _luminance((bg0 + bg1) / 2)

    def visible_colour() -> np.ndarray:
        for _ in range(32):
            c = rng.uniform(0, 1, 3)
            if abs(_luminance(c) - bg_lum) > 0.2:
                return c
        return 1.0 - (bg0 + bg1) / 2

    # Clutter (under the figure): irregular blobs and bars that are no class.
    for _ in range(int(rng.integers(1, 3))):
        c = rng.uniform(0, 1, 3)
        if rng.uniform() < 0.7:
            n = int(rng.integers(5, 8))
            pts = _regular(n, phase=rng.uniform(0, 2 * np.pi)) * rng.uniform(0.4, 1.0, (n, 1))
            xy = pts * rng.uniform(0.05, 0.1) * s + rng.uniform(0, s, 2)
        else:
            a, length = rng.uniform(0, np.pi), rng.uniform(0.15, 0.35) * s
            w = rng.uniform(0.015, 0.03) * s
            d, n_ = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
            p = rng.uniform(0, s, 2)
            xy = np.stack([p + w * n_, p + length * d + w * n_, p + length * d - w * n_,
                           p - w * n_])
        alpha = _mask(s, [(xy, 255)], ss)
        image = image * (1 - alpha) + c.astype(np.float32) * alpha

    # The figure, plain or striped in two colours.
    alpha = _mask(s, [(None if pts is None else pts @ rot.T * radius + centre, fill)
                      for pts, fill in ((outline, 255), (hole, 0))], ss)
    fg = visible_colour()
    if rng.uniform() < 0.3:
        fg2 = np.clip(fg + rng.normal(0, 0.15, 3), 0, 1)
        stripes = (_grating(s, rng, 1) > 0.5).astype(np.float32)[..., None]
        fill = fg * (1 - stripes) + fg2 * stripes
    else:
        fill = np.broadcast_to(fg, image.shape)
    image = image * (1 - alpha) + fill.astype(np.float32) * alpha

    # Occlusion: a bar across part of the figure, in 30% of the images.
    if rng.uniform() < 0.3:
        a = rng.uniform(0, np.pi)
        d, n_ = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
        p = centre + n_ * rng.uniform(0.2, 0.7) * radius * rng.choice([-1, 1])
        w, half = rng.uniform(0.08, 0.16) * radius, 1.5 * radius
        xy = np.stack([p - half * d + w * n_, p + half * d + w * n_, p + half * d - w * n_,
                       p - half * d - w * n_])
        alpha = _mask(s, [(xy, 255)], ss)
        image = image * (1 - alpha) + rng.uniform(0, 1, 3).astype(np.float32) * alpha

    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0, 0.05))
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def make_image(seed: int, split: str, index: int, image_size: int,
               level: str = "standard") -> Tuple[np.ndarray, int]:
    """(uint8 image, label) of example ``index`` of ``split``: a pure function of its arguments.

    Labels cycle through the classes (exact class balance).
    """
    names = classes(level)
    label = index % len(names)
    if level == "standard":
        rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
        return render(label, image_size, rng), label
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index, 1])  # another stream
    return render_hard(label, image_size, rng), label


def encode_jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def make_example(seed: int, split: str, index: int, image_size: int,
                 level: str = "standard") -> Tuple[bytes, int]:
    """(JPEG bytes, label) of example ``index`` of ``split`` (what the TFDS builder stores)."""
    image, label = make_image(seed, split, index, image_size, level)
    return encode_jpeg(image), label


def make_arrays(num_examples: int, image_size: int, *, split: str = "train", seed: int = 0,
                level: str = "standard", start: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Examples ``start .. start + num_examples - 1`` as ``uint8 [N, S, S, 3]`` images and
    ``int32 [N]`` labels, without TensorFlow (for accelerator scripts). The pixels are those
    before JPEG encoding, so they differ from the TFDS records by JPEG's rounding only."""
    images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
    labels = np.empty((num_examples,), np.int32)
    for j in range(num_examples):
        images[j], labels[j] = make_image(seed, split, start + j, image_size, level)
    return images, labels
