"""Name registry: ``create_model("resnet50", num_classes=1000)`` and ``list_models("vgg*")``."""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Dict, List, Optional

import flax.linen as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a builder under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> List[str]:
    """Sorted registered names matching a shell-style pattern, e.g. ``"resnet*"``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def create_model(name: str, num_classes: Optional[int] = None, **overrides) -> nn.Module:
    """Build a registered model; ``num_classes=None`` keeps the architecture's own default.

    ImageNet architectures default to 1000 classes, the CIFAR networks of the papers to 10.
    ``overrides`` set any field of the model (``dtype=jnp.bfloat16``, ``shortcut="C"``, ...).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown architecture {name!r}; valid names: {', '.join(list_models())}")
    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return _MODELS[name](**kwargs)
    except TypeError as e:
        valid = model_options(_MODELS[name]())
        unknown = sorted(set(kwargs) - set(valid))
        if not unknown:  # not a misspelt option: a real bug, keep its own message
            raise
        raise ValueError(f"{name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"valid options: {', '.join(valid)}") from e


def model_options(model: nn.Module) -> List[str]:
    """Names of the fields a model can be configured with (for error messages and docs)."""
    return [f.name for f in dataclasses.fields(model) if f.name not in ("parent", "name")]
