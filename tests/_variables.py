"""Test utilities: model variables as shapes (``abstract_init``) or drawn by NumPy instead of
the model's JAX initializers (``fast_init``).

``jax.random.normal`` compiles once per parameter shape (1-2 s each on a busy 2-core CPU), which
would dominate shape tests of 35 models. Values follow torchvision's init distributions; tests of
the initializers themselves use ``model.init`` on tiny shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.models import layers


@functools.lru_cache(maxsize=None)
def _traced_init(model, shape, dtype, call_items):
    x = jax.ShapeDtypeStruct(shape, dtype)
    with layers.shapes_only():  # shapes: the initializers' random draws need no tracing
        return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False,
                                                               **dict(call_items)), x)


def _copy_dicts(tree):
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def abstract_init(model, size=224, batch=1, dtype=jnp.float32, **call_kwargs):
    """(eval-mode output, variables) of ``model.init_with_output`` on ``batch`` images of
    ``size`` px, as shapes (``jax.eval_shape``: traced, never compiled or run).

    Traced once per distinct (model, input) in a test process: modules hash and compare by their
    fields, and tracing a deep model's init costs 0.5-1.5 s, which the shape tests of one file
    repeated for the same networks (resnet18 at 224 px five times in test_resnet.py). Each call
    gets its own copy of the dicts; the leaves are immutable ``ShapeDtypeStruct``s."""
    return _abstract_init_of_shape(model, (batch, size, size, 3), dtype, **call_kwargs)


def _abstract_init_of_shape(model, shape, dtype, **call_kwargs):
    args = (model, tuple(shape), jnp.dtype(dtype), tuple(sorted(call_kwargs.items())))
    try:
        hash(args)
    except TypeError:  # a module with an unhashable field: trace it every time
        return _traced_init.__wrapped__(*args)
    out, variables = _traced_init(*args)
    return out, _copy_dicts(variables)


def abstract_variables(model, size=224, batch=1, **call_kwargs):
    """``model.init``'s variables as shapes (see ``abstract_init``)."""
    return abstract_init(model, size, batch, **call_kwargs)[1]


def fast_init(model, x, seed=0, **call_kwargs):
    """Variables with ``model``'s exact tree and shapes, filled by numpy (He/LeCun normal)."""
    rng = np.random.default_rng(seed)
    # Kernels take slices of one pool of normals at random offsets: sampling every value would
    # take seconds for the deep models (60M for ResNet-152, 138M for VGG), and shape tests need
    # spread, not independence. Small kernels (up to a 3x3x16x16 conv) are sampled directly.
    pool = rng.standard_normal(1 << 20, dtype=np.float32)

    def normal(shape, std):
        n = int(np.prod(shape))
        if n <= 3 * 3 * 16 * 16:
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        # The scaled pool read cyclically from a random offset, ``out[k] = pool[(offset + k) %
        # size] * std``, in one pass over the output only: rotating the whole 4 MB pool for each
        # kernel (most are far smaller) cost ~5 s of test_forward_jit.py's CPU.
        offset, out = int(rng.integers(pool.size)), np.empty(n, np.float32)
        done = 0
        while done < n:
            take = min(n - done, pool.size - offset)
            np.multiply(pool[offset:offset + take], np.float32(std), out=out[done:done + take])
            done, offset = done + take, 0
        return out.reshape(shape)

    def fill_leaf(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":  # conv: He normal, fan_out (HWIO); dense: LeCun normal, fan_in
            fan = np.prod(shape[:-2]) * shape[-1] if len(shape) == 4 else shape[0]
            std = np.sqrt((2.0 if len(shape) == 4 else 1.0) / fan)
            return normal(shape, std)
        # numpy: jnp.ones/zeros would compile a program per distinct shape (DenseNet has a
        # hundred; ~1.5 s per model).
        fill = np.ones if name in ("scale", "var") else np.zeros
        return fill(shape, leaf.dtype)

    shapes = _abstract_init_of_shape(model, x.shape, x.dtype, **call_kwargs)[1]
    # One transfer of the whole tree (a jnp.asarray per leaf costs ~1 ms each, 777 leaves for
    # ResNet-152).
    return jax.device_put(jax.tree_util.tree_map_with_path(fill_leaf, shapes))


def normal(seed, shape, dtype=jnp.float32, scale=1.0):
    """Standard-normal test data drawn by NumPy: ``jax.random.normal`` compiles a program per
    shape and dtype (~0.1 s each at the tests' -O0; 131 of them cost the suite 16 s). Converted
    by NumPy and transferred with ``device_put``: ``jnp.asarray`` of a NumPy array compiles a
    program per shape and dtype too (a conversion or a copy, ~10 ms each; 345 in
    test_fast_layers.py); ``scale`` multiplies them before the conversion, for the same reason."""
    values = (scale * np.random.default_rng(seed).standard_normal(shape)).astype(jnp.dtype(dtype))
    return jax.device_put(values)
