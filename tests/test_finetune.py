"""Fine-tuning imported weights: `--config.init_from=<cnn_jax.convert output>` with a new head."""

import chex
import jax.numpy as jnp
import numpy as np

import _train_helpers as h
from _variables import fast_init
from cnn_jax import checkpoint as ckpt_lib, configs, convert, input_pipeline, train_lib
from cnn_jax.configs import default
from cnn_jax.models import create_model


def test_train_starts_from_converted_weights_with_a_new_head(tmp_path):
    kwargs = {"stage_sizes": (1, 1, 1), "widths": (4, 8, 8)}
    pretrained = fast_init(create_model(h.TINY_ARCH, num_classes=1000, **kwargs),
                           jnp.zeros((1, 32, 32, 3)))
    source = str(tmp_path / "converted")
    convert.save_converted(source, h.TINY_ARCH, pretrained, kwargs)

    config = default.get_config(h.TINY_ARCH)
    config.arch, config.model = h.TINY_ARCH, configs.model_config(h.TINY_MODEL)
    config.dataset, config.data_dir = h.TINY_DATASET, str(tmp_path / "data")
    config.batch_size, config.num_train_steps, config.progress_bar = 32, 1, False
    # A rate of 0 is refused as a mistake; 1e-12 moves no weight by more than ~1e-12.
    config.learning_rate, config.weight_decay = 1e-12, 0.0
    config.init_from = source
    workdir = str(tmp_path / "work")
    train_lib.train_and_evaluate(config, workdir)

    info = input_pipeline.get_dataset_info(config.dataset, config.data_dir, config.image_size)
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    try:
        state, _, _ = checkpointer.restore(train_lib.create_setup(config, info).host_state)
    finally:
        checkpointer.close()
    params = dict(state.params)
    head = params.pop("fc")
    assert head["kernel"].shape == (8, info.num_classes)  # re-initialized for 10 classes
    expected = dict(pretrained["params"])
    expected.pop("fc")
    chex.assert_trees_all_close(params, expected, atol=1e-9)
    assert not np.allclose(head["kernel"], pretrained["params"]["fc"]["kernel"][:, :10])
