"""Training configs: ml_collections files, one per dataset/recipe, read with ``--config=<file>``.

Every file defines ``get_config(arch: str = "")``; the training command calls it again with the
architecture once ``--arch`` is known, so a file can adapt per family, then re-applies the
``--config.field=value`` overrides.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

if TYPE_CHECKING:  # only annotations: keeps parse_model_kwargs importable without ml_collections
    import ml_collections

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "default.py")

# Datasets whose recipes are the papers' ImageNet ones (one file per family).
IMAGENET_DATASETS = ("imagenet2012", "imagenette")


def family(arch: str) -> str:
    """The family in the registry entry of ``arch``, e.g. ``resnet50`` -> ``resnet``; "" for no
    or an unknown name (the run's validation reports those)."""
    from cnn_jax.models import list_models, model_info

    return model_info(arch).family if arch in list_models() else ""


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


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Set flattened ``--config.a.b=value`` overrides on ``config``, new fields included (so that
    :func:`validate` can name a mistyped one)."""
    import ml_collections

    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for key in parents:
            if key not in node:
                node[key] = ml_collections.ConfigDict()
            node = node[key]
        node[leaf] = value


def validate(config: ml_collections.ConfigDict, workdir: Optional[str] = None,
             check_paths: bool = True) -> None:
    """Check every field a run reads (see :mod:`cnn_jax.validation`)."""
    from cnn_jax import validation

    validation.validate(config, workdir, check_paths)


def model_config(options: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Model options as the config's ``model`` field (``--config.model.shortcut=C``)."""
    import ml_collections

    return ml_collections.ConfigDict(
        {k: tuple(v) if isinstance(v, list) else v for k, v in dict(options).items()})


def model_options(config: Any) -> Dict[str, Any]:
    """The model options of a config, a config dict or a checkpoint's meta, as create_model's
    keyword overrides; checkpoints written before ``config.model`` carry a ``model_kwargs``
    string, which is read too."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    config = dict(config or {})
    if "config" in config and isinstance(config["config"], Mapping):  # a checkpoint's meta
        legacy = config.get("model_kwargs", "")
        config = dict(config["config"])
        config.setdefault("model_kwargs", legacy)
    options = dict(config.get("model") or {})
    if not options and config.get("model_kwargs"):
        options = parse_model_kwargs(config["model_kwargs"])
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def parse_model_kwargs(text: str) -> Dict[str, Any]:
    """``"stage_sizes=(1, 1, 1), widths=(8, 16, 32)"`` -> keyword overrides for create_model
    (the ``model_kwargs`` string of older checkpoints)."""
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
