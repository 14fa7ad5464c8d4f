"""Test utility: the train/eval contract of a classifier with dropout (AlexNet, VGG)."""

import chex
import jax
import numpy as np


def check_dropout_modes(model, variables, x, variant, num_classes):
    """Eval is deterministic; in train mode the dropout rng changes the output and the same rng
    repeats it; without batch norm, dropout is the only difference between the modes."""
    params, stats = variables["params"], variables.get("batch_stats", {})

    def apply(p, s, x, train, rng=None):
        out = model.apply({"params": p, "batch_stats": s}, x, train=train,
                          rngs={"dropout": rng} if train else None, mutable=["batch_stats"])
        return out[0]

    eval_fn = variant(lambda p, s, x: apply(p, s, x, False))
    train_fn = variant(lambda p, s, x, rng: apply(p, s, x, True, rng))

    logits = eval_fn(params, stats, x)
    chex.assert_shape(logits, (x.shape[0], num_classes))
    chex.assert_tree_all_finite(logits)
    np.testing.assert_array_equal(logits, eval_fn(params, stats, x))

    out1, out2 = (train_fn(params, stats, x, jax.random.key(2)),
                  train_fn(params, stats, x, jax.random.key(3)))
    chex.assert_shape([out1, out2], logits.shape)
    assert not np.allclose(out1, out2), "dropout rng does not change the train output"
    np.testing.assert_array_equal(out1, train_fn(params, stats, x, jax.random.key(2)))
    if not stats:
        assert not np.allclose(out1, logits), "train mode applies no dropout"
        no_dropout = model.clone(dropout_rate=0.0)
        np.testing.assert_allclose(
            no_dropout.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)}),
            logits, rtol=1e-5, atol=1e-6)
