"""Test utility: model variables drawn by NumPy instead of the model's JAX initializers.

``jax.random.normal`` compiles once per parameter shape (1-2 s each on a busy 2-core CPU), which
would dominate shape tests of 35 models. Values follow torchvision's init distributions; tests of
the initializers themselves use ``model.init`` on tiny shapes.
"""

import jax
import numpy as np


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
        # One pass over the output: the scaled pool, rotated by a random offset, tiled.
        src = np.roll(pool, -int(rng.integers(pool.size))) * np.float32(std)
        out = np.empty(n, np.float32)
        reps = n // pool.size
        out[:reps * pool.size].reshape(reps, pool.size)[...] = src
        out[reps * pool.size:] = src[:n - reps * pool.size]
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

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False, **call_kwargs))
    # One transfer of the whole tree (a jnp.asarray per leaf costs ~1 ms each, 777 leaves for
    # ResNet-152).
    return jax.device_put(jax.tree_util.tree_map_with_path(fill_leaf, shapes))
