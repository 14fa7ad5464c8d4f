"""`shapes`: a built-in image classification dataset of geometric figures, generated offline.

Each example is one filled figure (10 classes, see ``CLASSES``) drawn on a random two-colour
gradient background with Gaussian noise. Position, size, rotation, figure colour and background
colour are drawn independently of the class, so colour statistics carry no label information and
a classifier has to learn shape. Generation is pure seeded NumPy + Pillow (no network); example
``i`` of a split depends only on ``(seed, split, i)``, so a config always gives the same bytes.

Images are stored as JPEG inside a TFDS ``Image`` feature so that training reads them through the
same ``decode_and_crop_jpeg`` path as ImageNet. Figures are kept inside the central 87.5% of the
image, the region the evaluation centre crop keeps.

Configs are named ``<size>px`` (``32px``, ``64px`` (default), ``224px``: 10,000 train / 2,000
validation examples each) or ``<size>px_n<train>_v<validation>[_s<seed>]`` for any other size, split
sizes or seed, e.g. ``tfds.builder("shapes/32px_n2000_v500", data_dir=...)``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from typing import Iterator, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

CLASSES: Tuple[str, ...] = (
    "circle", "ellipse", "ring", "half_disc", "triangle",
    "square", "star", "cross", "arrow", "crescent",
)
STANDARD_SIZES: Tuple[int, ...] = (32, 64, 224)
DEFAULT_NUM_TRAIN = 10_000
DEFAULT_NUM_VALIDATION = 2_000
JPEG_QUALITY = 90
_SPLIT_IDS = {"train": 0, "validation": 1}
_CONFIG_NAME_RE = re.compile(r"^(\d+)px(?:_n(\d+)_v(\d+))?(?:_s(\d+))?$")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Image size, split sizes and seed of one `shapes` variant."""

    image_size: int = 64
    num_train: int = DEFAULT_NUM_TRAIN
    num_validation: int = DEFAULT_NUM_VALIDATION
    seed: int = 0

    @classmethod
    def from_name(cls, name: str) -> "ShapesConfig":
        """Parse ``<size>px[_n<train>_v<validation>][_s<seed>]``."""
        m = _CONFIG_NAME_RE.match(name)
        if not m:
            raise ValueError(f"bad shapes config {name!r}: use '<size>px' or "
                             "'<size>px_n<train>_v<validation>[_s<seed>]', e.g. '32px_n2000_v500'")
        size, n_train, n_val, seed = m.groups()
        if int(size) < 8:
            raise ValueError(f"shapes image size must be >= 8, got {size}")
        return cls(name=name, image_size=int(size),
                   num_train=int(n_train) if n_train else DEFAULT_NUM_TRAIN,
                   num_validation=int(n_val) if n_val else DEFAULT_NUM_VALIDATION,
                   seed=int(seed) if seed else 0,
                   description=f"{size}x{size} images")


def config_name(image_size: int, num_train: int | None = None, num_validation: int | None = None,
                seed: int = 0) -> str:
    """Config name for the given size/splits/seed (the standard name when nothing is changed)."""
    name = f"{image_size}px"
    if num_train is not None or num_validation is not None:
        name += f"_n{num_train or DEFAULT_NUM_TRAIN}_v{num_validation or DEFAULT_NUM_VALIDATION}"
    if seed:
        name += f"_s{seed}"
    return name


# ----------------------------------------------------------------------------- geometry

def _regular(n: int, r: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _figure(label: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray | None]:
    """(outline, hole) of class ``label`` in unit coordinates (circumradius ~1); hole may be None.

    The hole is cut out of the filled outline; it gives rings and crescents without drawing the
    background colour over the figure.
    """
    name = CLASSES[label]
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
    raise AssertionError(name)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def render(label: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one ``[S, S, 3]`` uint8 image of class ``label`` with randomness from ``rng``."""
    s = image_size
    outline, hole = _figure(label, rng)
    radius = rng.uniform(0.2, 0.4) * s
    margin = s / 16  # the 0.875 evaluation centre crop removes s/16 on each side
    lo, hi = margin + radius, s - margin - radius
    centre = rng.uniform(lo, hi, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])

    # Antialiasing by supersampling: draw the mask large, box-filter it down.
    ss = 4 if s <= 96 else 2
    mask = Image.new("L", (s * ss, s * ss), 0)
    draw = ImageDraw.Draw(mask)
    for pts, fill in ((outline, 255), (hole, 0)):
        if pts is not None:
            xy = (pts @ rot.T * radius + centre) * ss
            draw.polygon([tuple(p) for p in xy], fill=fill)
    alpha = np.asarray(mask.resize((s, s), Image.BOX), np.float32)[..., None] / 255.0

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


def encode_jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def make_example(seed: int, split: str, index: int, image_size: int) -> Tuple[bytes, int]:
    """(JPEG bytes, label) of example ``index`` of ``split``: a pure function of its arguments.

    Labels cycle through the classes (exact class balance); TFDS shuffles the written order.
    """
    label = index % len(CLASSES)
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    return encode_jpeg(render(label, image_size, rng)), label


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Geometric figures on noisy gradient backgrounds (built-in, generated offline)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name=f"{s}px", image_size=s, description=f"{s}x{s} images")
        for s in STANDARD_SIZES
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "64px"

    def __init__(self, *, config=None, **kwargs):
        # Names outside BUILDER_CONFIGS (e.g. "32px_n2000_v500") become custom configs.
        if isinstance(config, str):
            name = config.split(":")[0]
            if name not in type(self).builder_configs:
                config = ShapesConfig.from_name(name)
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__.split("\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(CLASSES)),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_validation),
        }

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[Tuple[int, dict]]:
        cfg = self.builder_config
        for i in range(num_examples):
            image, label = make_example(cfg.seed, split, i, cfg.image_size)
            yield i, {"image": image, "label": label}
