"""Training configs: ml_collections files, one per dataset/recipe, read with ``--config=<file>``.

Every file defines ``get_config(arch: str = "")``; the training command calls it again with the
architecture once ``--arch`` is known, so a file can adapt per family, then re-applies the
``--config.field=value`` overrides.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import TYPE_CHECKING, Any, Dict

if TYPE_CHECKING:  # only annotations: keeps parse_model_kwargs importable without ml_collections
    import ml_collections

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "default.py")

# Registered-name prefix -> family; the CIFAR ResNets and plain nets belong to "resnet".
FAMILY_PREFIXES = (("alexnet", "alexnet"), ("vgg", "vgg"), ("googlenet", "googlenet"),
                   ("resnet", "resnet"), ("plain", "resnet"), ("densenet", "densenet"))

# Datasets whose recipes are the papers' ImageNet ones (one file per family).
IMAGENET_DATASETS = ("imagenet2012", "imagenette")


def family(arch: str) -> str:
    """The family of a registered architecture name, e.g. ``resnet50`` -> ``resnet``."""
    for prefix, fam in FAMILY_PREFIXES:
        if arch.startswith(prefix):
            return fam
    return "other"


def recipe_path(arch: str, dataset: str) -> str:
    """The config file for training ``arch`` on ``dataset`` (default.py for small datasets)."""
    if dataset.partition("/")[0] in IMAGENET_DATASETS:
        path = os.path.join(CONFIG_DIR, f"imagenet_{family(arch)}.py")
        if os.path.exists(path):
            return path
    return DEFAULT_CONFIG


def load(path: str, arch: str = "") -> ml_collections.ConfigDict:
    """Load ``get_config(arch)`` from a config file path (``path:arg`` passes ``arg`` instead)."""
    path, _, arg = path.partition(":")
    if not os.path.exists(path):
        raise ValueError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(
        f"cnn_jax_config_{abs(hash(path))}", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or arch)


def parse_model_kwargs(text: str) -> Dict[str, Any]:
    """``"stage_sizes=(1, 1, 1), widths=(8, 16, 32)"`` -> keyword overrides for create_model."""
    if not text or not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if call.args:
            raise ValueError("positional items")
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"bad model_kwargs {text!r} ({e}); write field=value items, e.g. "
                         "'dropout_rate=0.3, widths=(8, 16, 32)'") from None
