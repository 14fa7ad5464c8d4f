"""Name registry: ``create_model("resnet50", num_classes=1000)``, ``list_models("vgg*")`` and what
the project knows about each model, ``model_info("resnet50")``.

Each entry carries the model's metadata in the spirit of timm's ``default_cfgs`` and torchvision's
``Weights.meta``: family, batch norm, smallest and default input size, the classifier's module path,
torchvision's name with its published accuracy and cost, and the family's torchvision key mapping.
Code that needs to know what a model is reads its entry, never its name.
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import difflib
import fnmatch
import re
import typing
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn

# Flax module path (without the leaf) -> torchvision's dotted module prefix, None: no counterpart.
KeyMap = Callable[[Tuple[str, ...]], Optional[str]]


@dataclasses.dataclass(frozen=True)
class TorchvisionRef:
    """torchvision's builder of the same layout and its IMAGENET1K_V1 weights' published metadata
    (``Weights.meta``: ``_metrics['ImageNet-1K']`` acc@1/acc@5 and ``_ops``, MACs at 224 px)."""

    name: str
    top1: Optional[float] = None
    top5: Optional[float] = None
    gflops: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One registered model: its builder and metadata."""

    name: str
    builder: Callable[..., nn.Module]
    family: str  # 'alexnet', 'vgg', 'googlenet', 'resnet', 'densenet', or any new family's name
    has_batch_norm: bool
    min_input_size: int  # smallest square input side the network accepts
    default_input_size: int = 224  # the papers' size: 224 for ImageNet nets, 32 for CIFAR ones
    classifier: Tuple[str, ...] = ("fc",)  # module path of the final classifier in ``params``
    # Module paths (joined by '/') of heads that are re-initialized when the class count differs.
    aux_classifiers: Tuple[str, ...] = ()
    torchvision: Optional[TorchvisionRef] = None  # None: torchvision has no such layout
    # Builds the key mapping of a model instance of this family (see cnn_jax.convert).
    torchvision_keys: Optional[Callable[[nn.Module], KeyMap]] = None
    # Dense layers fed by a flatten, -> (H, W) of the flattened map (torch flattens C, H, W).
    flatten_inputs: Mapping[str, Tuple[int, int]] = dataclasses.field(default_factory=dict)
    # Options torchvision's published weights need (GoogLeNet: transform_input=True).
    torchvision_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    paper: str = ""


_MODELS: Dict[str, ModelInfo] = {}


def register_model(**meta) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder under its function name, with :class:`ModelInfo` fields.

    ``@register_model(family="resnet", has_batch_norm=True, min_input_size=1)``; any package or
    test module can register its own architecture the same way.
    """
    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = meta.get("name", builder.__name__)
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = ModelInfo(**{"name": name, "builder": builder, **meta})
        return builder
    return decorate


def unregister_model(name: str) -> None:
    """Remove a registered name (for tests that register a temporary architecture)."""
    _MODELS.pop(name, None)


def list_models(pattern: str = "*") -> List[str]:
    """Sorted registered names matching a shell-style pattern, e.g. ``"resnet*"``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``; an unknown name is a ValueError listing the valid ones."""
    if name not in _MODELS:
        raise ValueError(f"unknown architecture {name!r}; valid names: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, num_classes: Optional[int] = None, **overrides) -> nn.Module:
    """Build a registered model; ``num_classes=None`` keeps the architecture's own default.

    ImageNet architectures default to 1000 classes, the CIFAR networks of the papers to 10.
    ``overrides`` set any field of the model (``dtype=jnp.bfloat16``, ``shortcut="C"``, ...).
    """
    builder = model_info(name).builder
    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return builder(**kwargs)
    except TypeError as e:
        valid = model_options(builder())
        unknown = sorted(set(kwargs) - set(valid))
        if not unknown:  # not a misspelt option: a real bug, keep its own message
            raise
        raise ValueError(f"{name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"valid options: {', '.join(valid)}") from e


def abstract_variables(model: nn.Module, image_size: int = 224, train: bool = False) -> Any:
    """Every variable of ``model`` on a square RGB image as ``jax.ShapeDtypeStruct``:
    ``model.init`` traced by ``jax.eval_shape``, nothing allocated or computed (parameter counts:
    ``count_params(abstract_variables(model)["params"])``)."""
    import jax
    import jax.numpy as jnp

    from cnn_jax.models import layers

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with layers.shapes_only():  # shapes need no random draws traced
        return jax.eval_shape(lambda x: model.init(rngs, x, train=train), x)


def model_options(model: nn.Module) -> List[str]:
    """Names of the fields a model can be configured with (for error messages and docs)."""
    return [f.name for f in dataclasses.fields(model) if f.name not in ("parent", "name")]


# Fields the training loop sets itself (from the dataset and --config.dtype), not model options.
_RUN_FIELDS = ("num_classes", "dtype")


def check_model_options(name: str, options: Mapping[str, Any],
                        flag_prefix: str = "--config.model.") -> Dict[str, Any]:
    """``options`` (e.g. from ``--config.model.*``) checked and typed against the module's fields.

    Strings from the command line become the field's type (``'true'`` -> True, ``'8'`` -> 8),
    lists become tuples where the field holds a sequence. An unknown option, or a value of the
    wrong type, is a one-line ValueError that lists the valid options.
    """
    model = create_model(name)
    fields = {f.name: f for f in dataclasses.fields(model) if f.name not in ("parent", "name")}
    hints = typing.get_type_hints(type(model))
    valid = [n for n in fields if n not in _RUN_FIELDS]
    out = {}
    for key, value in options.items():
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            why = ("is set by the training loop, not a model option" if key in _RUN_FIELDS
                   else "is not an option")
            raise ValueError(f"{flag_prefix}{key} {why} of {name!r}{hint}; valid options: "
                             f"{', '.join(valid)}")
        out[key] = _coerce(name, f"{flag_prefix}{key}", value, getattr(model, key),
                           hints.get(key))
    return out


def _coerce(name: str, flag: str, value: Any, default: Any, hint: Any) -> Any:
    """``value`` as the type of the field (its annotation, else its default's type)."""
    def bad(want: str) -> ValueError:
        field = flag.rsplit(".", 1)[-1]
        return ValueError(f"{flag}={value!r} does not fit the option {field} of {name!r} "
                          f"(a {want}, default {default!r})")

    optional = type(None) in typing.get_args(hint)
    if value is None:
        if default is None or optional:
            return None
        raise bad(type(default).__name__)
    kinds = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    origin = {typing.get_origin(t) or t for t in kinds}
    if default is not None:
        origin.add(type(default))
    if bool in origin:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
        raise bad("bool")
    if origin & {int, float} and not origin & {str, tuple, list}:
        if isinstance(value, str):
            try:
                value = float(value) if float in origin else int(value)
            except ValueError:
                raise bad("number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("number")
        if float in origin:
            return float(value)
        if value != int(value):
            raise bad("int")
        return int(value)
    if origin & {tuple, list, typing.Sequence, collections.abc.Sequence}:
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (SyntaxError, ValueError):
                raise bad("tuple") from None
        if isinstance(value, (int, str)):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise bad("tuple")
        return tuple(value)
    if str in origin:
        if not isinstance(value, str):
            raise bad("str")
        return value
    return value


def path_rewrites(*rules: Tuple[str, str]) -> Callable[[nn.Module], KeyMap]:
    """A ``torchvision_keys`` builder: regex rewrites of the '/'-joined Flax module path, whose
    remaining '/' become torch's '.' (``layer1_0/conv1`` -> ``layer1.0.conv1``)."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def prefix(path: Tuple[str, ...]) -> str:
        joined = "/".join(path)
        for pattern, repl in compiled:
            joined = pattern.sub(repl, joined)
        return joined.replace("/", ".")
    return lambda model: prefix
