"""`shapes`: a built-in image classification dataset of geometric figures, generated offline.

Each example is one filled figure (10 classes, see ``CLASSES``) drawn on a random two-colour
gradient background with Gaussian noise. Position, size, rotation, figure colour and background
colour are drawn independently of the class, so colour statistics carry no label information and
a classifier has to learn shape. Generation is pure seeded NumPy + Pillow (no network), in
:mod:`cnn_jax.datasets.shapes_generator` (importable without TensorFlow); example ``i`` of a split
depends only on ``(seed, split, i)``, so a config always gives the same bytes. The ``hard`` level
(20 classes, smaller figures, textures, clutter, occlusion) is the same builder with ``_hard``
after the size.

Images are stored as JPEG inside a TFDS ``Image`` feature so that training reads them through the
same ``decode_and_crop_jpeg`` path as ImageNet. Figures are kept inside the central 87.5% of the
image, the region the evaluation centre crop keeps.

Configs are named ``<size>px`` (``32px``, ``64px`` (default), ``224px``, and ``32px_hard``: 10,000
train / 2,000 validation examples each) or ``<size>px[_hard]_n<train>_v<validation>[_s<seed>]`` for
any other size, level, split sizes or seed, e.g. ``tfds.builder("shapes/32px_n2000_v500", ...)``,
``"shapes/32px_hard_n5000_v1000"``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Tuple

import tensorflow_datasets as tfds

from cnn_jax.datasets.shapes_generator import (  # noqa: F401 (re-exported)
    CLASSES, HARD_CLASSES, JPEG_QUALITY, SPLIT_IDS, classes, encode_jpeg, make_arrays,
    make_example, make_image, render, render_hard)

STANDARD_SIZES: Tuple[int, ...] = (32, 64, 224)
DEFAULT_NUM_TRAIN = 10_000
DEFAULT_NUM_VALIDATION = 2_000
_SPLIT_IDS = SPLIT_IDS
_CONFIG_NAME_RE = re.compile(r"^(\d+)px(_hard)?(?:_n(\d+)_v(\d+))?(?:_s(\d+))?$")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Image size, split sizes and seed of one `shapes` variant."""

    image_size: int = 64
    num_train: int = DEFAULT_NUM_TRAIN
    num_validation: int = DEFAULT_NUM_VALIDATION
    seed: int = 0
    level: str = "standard"  # or "hard" (shapes_generator.HARD_CLASSES)

    @property
    def classes(self) -> Tuple[str, ...]:
        return classes(self.level)

    @classmethod
    def from_name(cls, name: str) -> "ShapesConfig":
        """Parse ``<size>px[_hard][_n<train>_v<validation>][_s<seed>]``."""
        m = _CONFIG_NAME_RE.match(name)
        if not m:
            raise ValueError(f"bad shapes config {name!r}: use '<size>px[_hard]' or "
                             "'<size>px[_hard]_n<train>_v<validation>[_s<seed>]', e.g. "
                             "'32px_n2000_v500' or '32px_hard_n5000_v1000'")
        size, hard, n_train, n_val, seed = m.groups()
        if int(size) < 8:
            raise ValueError(f"shapes image size must be >= 8, got {size}")
        return cls(name=name, image_size=int(size),
                   num_train=int(n_train) if n_train else DEFAULT_NUM_TRAIN,
                   num_validation=int(n_val) if n_val else DEFAULT_NUM_VALIDATION,
                   seed=int(seed) if seed else 0, level="hard" if hard else "standard",
                   description=f"{size}x{size} {'hard-level ' if hard else ''}images")


def config_name(image_size: int, num_train: int | None = None, num_validation: int | None = None,
                seed: int = 0, level: str = "standard") -> str:
    """Config name for the given size/splits/seed/level (the standard name when nothing is
    changed)."""
    classes(level)  # checks the level
    name = f"{image_size}px" + ("_hard" if level == "hard" else "")
    if num_train is not None or num_validation is not None:
        name += f"_n{num_train or DEFAULT_NUM_TRAIN}_v{num_validation or DEFAULT_NUM_VALIDATION}"
    if seed:
        name += f"_s{seed}"
    return name


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Geometric figures on noisy gradient backgrounds (built-in, generated offline)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name=f"{s}px", image_size=s, description=f"{s}x{s} images")
        for s in STANDARD_SIZES
    ] + [ShapesConfig(name="32px_hard", image_size=32, level="hard",
                      description="32x32 hard-level images")]
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
                "label": tfds.features.ClassLabel(names=list(self.builder_config.classes)),
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
            image, label = make_example(cfg.seed, split, i, cfg.image_size, cfg.level)
            yield i, {"image": image, "label": label}
