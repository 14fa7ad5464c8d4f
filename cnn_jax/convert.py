"""Import torchvision's ImageNet weights: ``from_torch_state_dict`` and the conversion command.

    python -m cnn_jax.convert --arch=resnet50 --torch_checkpoint=resnet50-0676ba61.pth --output=DIR

Every parameter of the Flax model gets its torchvision key mechanically (the model files name their
submodules after torchvision's, see each family's docstring), so the conversion is checked both
ways: each expected variable must be in the file with the right shape, and each array of the file
must land somewhere. Anything else is a :class:`ConversionError` naming the key and both shapes;
nothing is converted in part.

Layouts: conv kernels OIHW -> HWIO (grouped convs too: torch's ``[O, I/g, kh, kw]`` is
``[kh, kw, I/g, O]`` here), dense weights ``[out, in]`` -> ``[in, out]``, BN ``weight``/``bias`` ->
``scale``/``bias`` and ``running_mean``/``running_var`` -> ``batch_stats`` ``mean``/``var``
(``num_batches_tracked`` is dropped). The dense layers right after a flatten (AlexNet/VGG ``fc6``,
GoogLeNet ``aux*/fc1``) see torch's (C, H, W) flatten order, NHWC flattens (H, W, C): their input
rows are permuted, which also makes VGG's fully-convolutional mode right.

GoogLeNet: torchvision's published file holds the auxiliary heads (``aux1.*``, ``aux2.*``) although
they are not used at inference; converting to a model with ``aux_logits=False`` (the default) drops
them, ``aux_logits=True`` requires them. The published weights expect ``transform_input=True``,
which the command sets for GoogLeNet (the registry entry's ``torchvision_options``) unless
``--model.transform_input=false`` says otherwise; ``--model.FIELD=VALUE`` sets any model option.

The command writes a :class:`cnn_jax.checkpoint.Checkpointer` directory ``DIR/checkpoints/0`` whose
``state`` item is ``{'params', 'batch_stats'}`` (not a whole TrainState: there is no optimizer
state) and whose ``meta`` item is the training meta (``arch``, ``dataset``, ``num_classes``,
``image_size``, ``config``: the architecture's ImageNet recipe) plus ``source='torchvision'``.
:func:`load_converted` reads it back for evaluation; :func:`init_from_converted` fills a fresh
model's variables for fine-tuning, re-initializing the classifier when the class count differs.
Reading ``.pth`` files needs torch (``pip install .[torch]``); :func:`from_torch_state_dict` also
takes numpy arrays.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

# Written to the checkpoint's meta so loaders can tell a converted checkpoint from a training one.
SOURCE = "torchvision"

# Flax variable name -> torch tensor name, per collection.
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}

# torchvision's own fix-up for DenseNet files saved before 0.3 (``norm.1`` for ``norm1``), which
# is how the published densenet*.pth files are still written.
_LEGACY_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class ConversionError(ValueError):
    """A state_dict does not fit the architecture (missing/unexpected key, wrong shape)."""


class TorchNotInstalledError(ImportError):
    """Reading a ``.pth`` file needs torch."""


def key_map(arch: str, model: Any):
    """Flax module path -> torchvision's dotted prefix, from the family file (via the registry)."""
    from cnn_jax.models import model_info

    info = model_info(arch)
    if info.torchvision_keys is None:
        raise ValueError(f"no torchvision layout is known for {arch!r} (family {info.family!r}): "
                         "its registry entry has no torchvision_keys")
    return info.torchvision_keys(model)


def _classifier_path(arch: str) -> Tuple[str, ...]:
    from cnn_jax.models import model_info

    return tuple(model_info(arch).classifier)


def _torch_shape(flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The shape torch stores a variable of this Flax shape in."""
    if len(flax_shape) == 4:  # HWIO -> OIHW
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if len(flax_shape) == 2:  # [in, out] -> [out, in]
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def _transposed(value: np.ndarray, flatten_hw: Optional[Tuple[int, int]] = None,
                block: int = 128) -> np.ndarray:
    """``value.T`` of a 2-D array as a new C-contiguous array, copied in square tiles; with
    ``flatten_hw=(h, w)`` the columns, ordered (C, H, W), become rows ordered (H, W, C).

    numpy copies a transposed view element by element down the source's columns, a cache miss
    each: VGG's fc6 (4096 x 25088, 411 MB) took 2.4-2.7 s that way, with or without the
    reordering, and 0.5-0.9 s in 128 x 128 tiles (2-core AVX2 machine, 2026-12-05)."""
    rows, cols = value.shape
    out = np.empty((cols, rows), value.dtype)
    for i in range(0, rows, block):
        src = value[i:i + block]
        if flatten_hw is not None:  # reorder this band's columns first: a small copy in cache
            src = src.reshape(len(src), -1, flatten_hw[0] * flatten_hw[1]).transpose(0, 2, 1)
            src = src.reshape(len(src), cols)
        for j in range(0, cols, block):
            out[j:j + block, i:i + block] = src[:, j:j + block].T
    return out


def _to_flax(value: np.ndarray, flatten_hw: Optional[Tuple[int, int]]) -> np.ndarray:
    """A torch-layout array in the Flax layout (one copy at most: these can be 400 MB)."""
    if value.ndim == 4:  # OIHW -> HWIO
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if value.ndim == 2:  # [out, in] -> [in, out]; torch orders a flattened conv map's inputs
        return _transposed(value, flatten_hw)  # (C, H, W), NHWC (H, W, C)
    return value.copy()  # never share memory with the caller's tensors


def _as_numpy(key: str, value: Any) -> np.ndarray:
    """A float32 numpy view (or copy) of a torch tensor / numpy / jax array."""
    if hasattr(value, "detach"):  # a torch tensor; .float() also handles bf16/fp16 files
        value = value.detach().cpu().float().numpy()
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ConversionError(f"{key}: expected a floating-point array, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def normalize_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Keys as torchvision's current models name them: no ``module.`` prefix, new DenseNet keys."""
    keys = list(state_dict)
    strip = bool(keys) and all(k.startswith("module.") for k in keys)  # saved from DataParallel
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key[len("module."):] if strip else key
        new = _LEGACY_DENSENET.sub(r"\1\2", new)
        if new in out:
            raise ConversionError(f"{key}: key {new!r} occurs twice in the state_dict")
        out[new] = value
    return out


def checkpoint_num_classes(arch: str, state_dict: Mapping[str, Any]) -> Optional[int]:
    """The class count of a torchvision state_dict of ``arch`` (None if it has no classifier)."""
    from cnn_jax.models import create_model

    prefix = key_map(arch, create_model(arch))(_classifier_path(arch))
    head = state_dict.get(f"{prefix}.weight")
    return int(np.shape(head)[0]) if head is not None and np.ndim(head) == 2 else None


def expected_variables(model: Any, image_size: int = 224) -> Dict[str, Any]:
    """``{'params', 'batch_stats'}`` of ``model.init`` as ShapeDtypeStructs (no compute)."""
    from cnn_jax.models import abstract_variables

    shapes = abstract_variables(model, image_size)
    return {c: shapes[c] for c in ("params", "batch_stats") if c in shapes}


def from_torch_state_dict(arch: str, state_dict: Mapping[str, Any],
                          num_classes: Optional[int] = None, **model_kwargs) -> Dict[str, Any]:
    """Convert a torchvision ``state_dict`` into ``create_model(arch, ...)``'s variables.

    ``state_dict`` maps names to torch tensors or numpy arrays. ``num_classes=None`` takes the class
    count of the file's classifier; ``model_kwargs`` are the model's options (e.g. GoogLeNet's
    ``aux_logits=True``). Returns ``{'params': ..., 'batch_stats': ...}`` (only the collections the
    model has) with the tree structure of ``model.init`` and float32 numpy leaves. Raises
    :class:`ConversionError` naming the offending keys and shapes if anything does not fit.
    """
    from flax import traverse_util

    from cnn_jax.models import create_model, model_info

    state_dict = normalize_state_dict(state_dict)
    info = model_info(arch)
    if num_classes is None:
        num_classes = checkpoint_num_classes(arch, state_dict)
    model = create_model(arch, num_classes=num_classes, **model_kwargs)
    expected = expected_variables(model)
    prefix_of = key_map(arch, model)
    flatten_inputs = info.flatten_inputs

    missing: List[str] = []
    wrong_shape: List[str] = []
    no_counterpart: List[str] = []
    used = set()
    flat_out: Dict[Tuple[str, ...], np.ndarray] = {}
    for collection, tree in expected.items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            module, name = path[:-1], path[-1]
            torch_name = _LEAF_NAMES.get((collection, name))
            prefix = prefix_of(module) if module else None
            flax_name = f"{collection}/{'/'.join(path)}"
            if torch_name is None or prefix is None:
                no_counterpart.append(f"{flax_name} {tuple(leaf.shape)}")
                continue
            key = f"{prefix}.{torch_name}"
            want = _torch_shape(tuple(leaf.shape))
            if key not in state_dict:
                missing.append(f"{key} {want} (for {flax_name})")
                continue
            used.add(key)
            value = _as_numpy(key, state_dict[key])
            if tuple(value.shape) != want:
                wrong_shape.append(f"{key}: the file has {tuple(value.shape)}, {arch} expects "
                                   f"{want} (for {flax_name} {tuple(leaf.shape)})")
                continue
            hw = flatten_inputs.get("/".join(module))
            flat_out[(collection,) + path] = _to_flax(value, hw)

    ignored = {k for k in state_dict if k.endswith(".num_batches_tracked")}
    for aux in info.aux_classifiers:
        if aux.split("/")[0] not in expected["params"]:
            # GoogLeNet's published file carries the (unused) auxiliary heads; a model without
            # them drops them.
            aux_prefix = prefix_of(tuple(aux.split("/"))) + "."
            ignored |= {k for k in state_dict if k.startswith(aux_prefix)}
    unexpected = [f"{k} {tuple(np.shape(state_dict[k]))}" for k in state_dict
                  if k not in used and k not in ignored]

    kinds = [("wrong shape", wrong_shape), ("missing", missing), ("unexpected", unexpected),
             ("no torchvision counterpart", no_counterpart)]
    if any(items for _, items in kinds):
        # A few of each kind: a file of another architecture has hundreds of each.
        shown = "; ".join(f"{kind}: {item}" for kind, items in kinds for item in items[:3])
        more = sum(max(0, len(items) - 3) for _, items in kinds)
        hint = ("is it a checkpoint of another architecture (or of other model options)?"
                if missing or unexpected else "check num_classes and the model options")
        raise ConversionError(
            f"the state_dict does not fit {arch!r} ({len(wrong_shape)} wrong shape, "
            f"{len(missing)} missing, {len(unexpected)} unexpected): {shown}"
            f"{f'; ... ({more} more)' if more else ''}; {hint}")
    return traverse_util.unflatten_dict(flat_out)


# ----------------------------------------------------------------------------- files


def _import_torch():
    try:
        import torch
    except ImportError:
        raise TorchNotInstalledError(
            "reading a .pth file needs PyTorch: pip install 'cnn_jax[torch]' (or pip install torch)"
        ) from None
    return torch


def load_torch_state_dict(path: str) -> Dict[str, Any]:
    """The state_dict in a torch file: a bare state_dict, or one under 'state_dict' or 'model'."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no torch checkpoint at {path}")
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled modules etc. are refused by weights_only loading
        raise ConversionError(f"{path} is not a file of tensors torch.load(weights_only=True) "
                              f"can read ({type(e).__name__}); save model.state_dict() with "
                              "torch.save") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ConversionError(f"{path} holds no state_dict (a mapping of names to tensors); save "
                              "model.state_dict() with torch.save")
    return obj


def default_model_options(arch: str) -> Dict[str, Any]:
    """Options the published torchvision weights of ``arch`` need (GoogLeNet: transform_input)."""
    from cnn_jax.models import model_info

    return dict(model_info(arch).torchvision_options)


def is_converted(meta: Optional[Mapping[str, Any]]) -> bool:
    """Whether a checkpoint's meta marks it as written by this module (weights only)."""
    return bool(meta) and meta.get("source") == SOURCE


def converted_meta(arch: str, num_classes: int, model_kwargs: Mapping[str, Any],
                   source_file: str = "") -> Dict[str, Any]:
    """The meta of a converted checkpoint: the training meta's keys (with the ImageNet recipe of
    ``arch`` as ``config``) plus ``source`` and the name of the torch file."""
    from cnn_jax import configs

    config = configs.load(configs.recipe_path(arch, "imagenet2012"), arch)
    config.arch = arch
    config.model = configs.model_config(model_kwargs)
    return {"arch": arch, "dataset": config.dataset, "num_classes": int(num_classes),
            "image_size": int(config.image_size), "config": config.to_dict(), "source": SOURCE,
            "torch_checkpoint": os.path.basename(source_file)}


def save_converted(output: str, arch: str, variables: Mapping[str, Any],
                   model_kwargs: Optional[Mapping[str, Any]] = None,
                   source_file: str = "") -> str:
    """Write ``variables`` as step 0 of a Checkpointer in ``output``; returns the step directory.

    The ``state`` item is ``{'params', 'batch_stats'}`` (``batch_stats`` empty for BN-free nets).
    """
    from flax import traverse_util

    from cnn_jax import checkpoint as ckpt_lib

    model_kwargs = dict(model_kwargs or {})
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    num_classes = int(np.shape(flat[_classifier_path(arch) + ("bias",)])[0])
    meta = converted_meta(arch, num_classes, model_kwargs, source_file)
    checkpointer = ckpt_lib.Checkpointer(output, max_to_keep=1, keep_best=False, async_save=False)
    try:
        if checkpointer.latest_step() is not None:
            raise ValueError(f"{checkpointer.directory} already holds a checkpoint; pass a new "
                             "--output directory")
        state = {"params": variables["params"], "batch_stats": variables.get("batch_stats") or {}}
        checkpointer.save(0, state, meta)
    finally:
        checkpointer.close()
    return os.path.join(checkpointer.directory, "0")


def load_converted(directory: str) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
    """``(model, variables, meta)`` of a checkpoint written by :func:`save_converted`.

    ``variables`` holds ``params`` and, for nets with batch norm, ``batch_stats``: ready for
    ``model.apply(variables, images, train=False)``.
    """
    import jax

    from cnn_jax import checkpoint as ckpt_lib
    from cnn_jax import configs
    from cnn_jax.models import create_model

    checkpointer = ckpt_lib.Checkpointer(directory, read_only=True, keep_best=False)
    try:
        meta = checkpointer.read_meta()
        if not is_converted(meta):
            raise ValueError(f"{checkpointer.directory} holds no converted torchvision checkpoint; "
                             "write one with python -m cnn_jax.convert")
        model = create_model(meta["arch"], num_classes=meta["num_classes"],
                             **configs.model_options(meta))
        target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                        expected_variables(model))
        target.setdefault("batch_stats", {})
        variables, meta, _ = checkpointer.restore(target, 0)
    finally:
        checkpointer.close()
    if not variables["batch_stats"]:
        del variables["batch_stats"]
    return model, dict(variables), meta


def init_from_converted(directory: str, variables: Mapping[str, Any], arch: Optional[str] = None
                        ) -> Tuple[Dict[str, Any], List[str]]:
    """Fill freshly initialized ``variables`` with a converted checkpoint, for fine-tuning.

    Every variable is taken from the checkpoint except where the checkpoint cannot provide it:
    the classifier (and GoogLeNet's auxiliary classifiers) when the class count differs, and
    auxiliary heads the checkpoint lacks; those keep their fresh initialization and are listed in
    the returned ``(variables, reinitialized_paths)``. Any other difference is an error, as is an
    ``arch`` other than the checkpoint's.
    """
    _, pretrained, meta = load_converted(directory)
    if arch is not None and arch != meta["arch"]:
        raise ValueError(f"{directory} holds {meta['arch']!r} weights, not {arch!r}")
    return fit_pretrained(pretrained, variables, meta["arch"], directory)


def fit_pretrained(pretrained: Mapping[str, Any], variables: Mapping[str, Any], arch: str,
                   directory: str) -> Tuple[Dict[str, Any], List[str]]:
    """``variables`` filled with the arrays of ``pretrained`` that fit (init_from_converted)."""
    from flax import traverse_util

    from cnn_jax.models import model_info

    fresh = traverse_util.flatten_dict({k: v for k, v in variables.items()
                                        if k in ("params", "batch_stats")})
    loaded = traverse_util.flatten_dict(pretrained)
    info = model_info(arch)
    heads = [tuple(info.classifier)] + [tuple(a.split("/")) for a in info.aux_classifiers]
    out, reinitialized, problems = {}, [], []
    for path, value in fresh.items():
        name = "/".join(path)
        if path in loaded and np.shape(loaded[path]) == np.shape(value):
            out[path] = loaded[path]
        elif any(path[1:1 + len(h)] == h for h in heads):
            out[path] = value
            reinitialized.append(name)
        else:
            have = np.shape(loaded[path]) if path in loaded else "missing"
            problems.append(f"{name}: checkpoint {have}, model {np.shape(value)}")
    unused = sorted("/".join(p) for p in loaded if p not in fresh)
    problems += [f"{name}: in the checkpoint, not in the model" for name in unused]
    if problems:
        raise ConversionError(f"{directory} does not fit the model beyond its classifier: "
                              + "; ".join(problems[:6]))
    result = traverse_util.unflatten_dict(out)
    return {**dict(variables), **result}, reinitialized


# ----------------------------------------------------------------------------- command


def define_flags(fv, argv: List[str]) -> None:
    """The command's flags on ``fv``; ``argv`` tells config_flags which ``--model.*`` to define."""
    import ml_collections
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("arch", None, "registered architecture, e.g. resnet50", flag_values=fv)
    flags.DEFINE_string("torch_checkpoint", None, "the .pth file", flag_values=fv)
    flags.DEFINE_string("output", None, "directory to write (must be empty)", flag_values=fv)
    flags.DEFINE_integer("num_classes", None, "expected class count (default: the file's)",
                         flag_values=fv)
    config_flags.DEFINE_config_dict(
        "model", ml_collections.ConfigDict(),
        "model options, e.g. --model.aux_logits=true (GoogLeNet gets transform_input=True, which "
        "torchvision's published weights need, unless --model.transform_input=false)",
        flag_values=fv, lock_config=False, accept_new_attributes=True, sys_argv=argv)


def run(fv) -> int:
    """Convert as the parsed flags say (bad input: a ValueError, one line from cli.run_command)."""
    from cnn_jax.models import check_model_options
    from cnn_jax.models.layers import count_params

    for name in ("arch", "torch_checkpoint", "output"):
        if not fv[name].value:
            raise ValueError(f"pass --{name}")
    options = check_model_options(fv.arch, {**default_model_options(fv.arch),
                                            **fv.model.to_dict()}, flag_prefix="--model.")
    try:
        state_dict = load_torch_state_dict(fv.torch_checkpoint)
    except (ImportError, FileNotFoundError) as e:
        raise ValueError(str(e)) from e
    variables = from_torch_state_dict(fv.arch, state_dict, fv.num_classes, **options)
    step_dir = save_converted(fv.output, fv.arch, variables, options, fv.torch_checkpoint)
    print(f"converted {fv.torch_checkpoint} -> {step_dir} ({fv.arch}, "
          f"{count_params(variables['params']):,} parameters)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m cnn_jax.convert --arch=... --torch_checkpoint=... --output=...``."""
    from absl import logging

    from cnn_jax import cli

    logging.set_verbosity(logging.ERROR)  # Orbax's notes on checkpoint options are noise here
    return cli.run_command("cnn_jax.convert", define_flags, run, argv)


if __name__ == "__main__":
    sys.exit(main())
