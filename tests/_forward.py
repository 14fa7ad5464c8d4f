"""The registry-wide forward check, run jitted (test_forward_jit.py) and un-jitted
(test_forward_eager.py): two files so that pytest-xdist's --dist loadfile puts them on different
workers."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.models import create_model, model_info
from cnn_jax.models.layers import split_logits

from _variables import fast_init, normal

# Families whose classifier uses dropout (DenseNet's drop_rate defaults to 0, ResNet has none).
HAS_DROPOUT = ("alexnet", "vgg", "googlenet")


def forward_size(name):
    """32x32, or the next multiple of 32 that the registry entry's minimum input allows."""
    return max(32, -(-model_info(name).min_input_size // 32) * 32)


# Options that repeat a block (ResNet's blocks per stage, DenseNet's layers per dense block).
REPEAT_OPTIONS = ("stage_sizes", "block_config")


def shortened(name, keep=2):
    """Model options that cut every repeat count in ``REPEAT_OPTIONS`` to at most ``keep``: the
    same modules, each block kind once as the first (down-sampling or transition-fed) block of a
    stage and once after it, in a fraction of the layers."""
    model = create_model(name)
    return {option: tuple(min(keep, n) for n in getattr(model, option))
            for option in REPEAT_OPTIONS if hasattr(model, option)}


# Entries checked with an option on: GoogLeNet's auxiliary heads are off by default (torchvision's
# inference layout) but are real modules that only train mode runs.
CHECK_OPTIONS = {"googlenet": {"aux_logits": True}}


def _model(name, **options):
    return create_model(name, num_classes=5, **{**CHECK_OPTIONS.get(name, {}), **options})


def check_forward(variant, name, passed=None, **options):
    """Eval and train mode of ``name`` through ``variant`` (chex's jit or no-jit wrapper): shapes,
    finite logits, deterministic eval that reads batch statistics without changing them, train
    mode that updates all of them and differs from eval where there is batch norm or dropout, and
    dropout rngs that change the output (the same rng repeating it); auxiliary heads only in train
    mode, each different from the others.

    ``passed``: a set kept by the calling test file (one variant), of the checks that passed in
    this process. The check is a function of the model (modules compare by their fields), the
    input size and the entry's batch-norm and family flags, so an entry whose model equals one
    already checked (shortened, resnet101 and resnet152 are resnet50's (2, 2, 2, 2)) would
    repeat the same computation with the same results; it is not run again."""
    model = _model(name, **options)
    size = forward_size(name)
    info = model_info(name)
    key = (model, size, info.has_batch_norm, info.family in HAS_DROPOUT)
    if passed is not None and key in passed:
        variant(lambda: None)()  # chex.variants fails a test that never calls its variant
        return
    x = normal(1, (2, size, size, 3))
    variables = fast_init(model, x)
    stats = variables.get("batch_stats", {})

    # One program per mode: XLA's compile time grows faster than the program (ResNet-152's eval
    # and train modes: 3.7 s + 7.4 s apart, 13.7 s as one program).
    @variant
    def evaluate(variables, x):
        # mutable in eval mode too: a model that wrote batch_stats there would show it.
        return model.apply(variables, x, train=False, mutable=["batch_stats"])

    @variant
    def train(variables, x, seed):
        return model.apply(variables, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(seed)})

    logits, eval_updates = evaluate(variables, x)
    out, updates = train(variables, x, 2)
    assert not isinstance(logits, tuple), f"{name}: eval mode returns more than the logits"
    chex.assert_shape(logits, (2, 5))
    chex.assert_tree_all_finite(logits)
    # Eval mode reads batch statistics without changing them.
    chex.assert_trees_all_equal(eval_updates.get("batch_stats", {}), stats)

    main, aux = split_logits(out)
    heads = [main, *aux]
    chex.assert_shape(heads, (2, 5))
    chex.assert_tree_all_finite(heads)
    assert len(aux) == (2 if getattr(model, "aux_logits", False) else 0), f"{name}: aux heads"
    for i, j in itertools.combinations(range(len(heads)), 2):
        assert not np.allclose(heads[i], heads[j]), f"{name}: output heads {i} and {j} are equal"
    if stats:
        chex.assert_trees_all_equal_shapes(updates["batch_stats"], stats)
        # numpy: jnp would compile two programs per distinct statistics shape (~4 s for DenseNet).
        changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                         stats, updates["batch_stats"])
        assert all(jax.tree_util.tree_leaves(changed)), f"{name}: batch_stats not all updated"
    # Train mode differs from eval mode exactly where there is batch norm (batch statistics) or
    # dropout.
    assert (not np.allclose(main, logits)) == (info.has_batch_norm or info.family in HAS_DROPOUT)

    np.testing.assert_array_equal(evaluate(variables, x)[0], logits)  # eval is deterministic
    differs = not np.allclose(main, split_logits(train(variables, x, 3)[0])[0])
    assert differs == (info.family in HAS_DROPOUT), (
        f"{name}: a new dropout rng {'changed' if differs else 'did not change'} the output")
    if differs:  # ... and the same rng repeats the same output
        np.testing.assert_array_equal(split_logits(train(variables, x, 2)[0])[0], main)
    if passed is not None:
        passed.add(key)


def check_forward_shapes(name, **options):
    """The structural half of ``check_forward``, abstractly (``jax.eval_shape``: traced, never
    compiled or run): eval mode (``init_with_output``: init runs the eval forward pass) returns
    only the logits, float32 of shape (2, 5); train mode returns the main head and exactly the
    expected auxiliary heads, each float32 (2, 5), and batch_stats of the init's tree, shapes and
    dtypes. What it cannot check (finite values, eval mode leaving the statistics unchanged and
    train mode changing all of them, eval != train, dropout) needs a real forward pass."""
    model = _model(name, **options)
    size = forward_size(name)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    logits, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)
    stats = variables.get("batch_stats", {})
    out, updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(2)}), variables, x)
    assert not isinstance(logits, tuple), f"{name}: eval mode returns more than the logits"
    assert (logits.shape, logits.dtype) == ((2, 5), jnp.float32), f"{name}: eval logits {logits}"
    main, aux = split_logits(out)
    assert len(aux) == (2 if getattr(model, "aux_logits", False) else 0), f"{name}: aux heads"
    for head in (main, *aux):
        assert (head.shape, head.dtype) == ((2, 5), jnp.float32), f"{name}: train head {head}"
    assert set(updates) == ({"batch_stats"} if stats else set()), f"{name}: {set(updates)}"
    if stats:
        chex.assert_trees_all_equal_shapes_and_dtypes(updates["batch_stats"], stats)
