"""Orbax checkpoints, exact resume, the NaN guard and the error cases of the training loop."""

import shutil

import jax
import numpy as np
import optax
import pytest

import _train_helpers as h
from cnn_jax import checkpoint as ckpt_lib
from cnn_jax import configs, input_pipeline, metrics as metrics_lib, train_lib
from cnn_jax import train_step as ts


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    input_pipeline.prepare_dataset(h.TINY_DATASET, d, image_size=32)
    return d


def tiny_config(data_dir, **overrides):
    c = configs.load(configs.DEFAULT_CONFIG, h.TINY_ARCH)
    c.arch = h.TINY_ARCH
    c.model = configs.model_config(h.TINY_MODEL)
    c.dataset = h.TINY_DATASET
    c.data_dir = data_dir
    c.image_size = 32
    c.batch_size = 16
    c.eval_batch_size = 32
    c.num_train_steps = 6
    c.warmup_epochs = 0.0
    c.log_every_steps = 1
    c.eval_every_steps = 3
    c.progress_bar = False
    c.update(overrides)
    return c


def _host_state():
    state = ts.create_train_state(h.tiny_module(), optax.adamw(1e-3), jax.random.PRNGKey(0),
                                  (8, 8, 3))
    return jax.tree_util.tree_map(np.asarray, state)


def test_keeps_last_k_plus_best(tmp_path):
    c = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
    state = _host_state()
    for step, top1 in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, None)]:
        c.save(step, state.replace(step=np.int32(step)), {"arch": "tiny"},
               None if top1 is None else {"top1": top1})
    c.wait_until_finished()
    assert c.all_steps() == [2, 4, 5]  # the last two, plus the best (step 2)
    assert c.best_step() == 2 and c.latest_step() == 5
    restored, meta, step = c.restore(state)
    c.close()
    assert step == 5 and meta == {"arch": "tiny"} and int(restored.step) == 5
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, state.params)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)


def test_meta_mismatch_is_one_line():
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="arch='vgg11', not 'resnet18'"):
        ckpt_lib.check_compatible({"arch": "vgg11"}, {"arch": "resnet18"}, "/w/checkpoints")
    ckpt_lib.check_compatible(None, {"arch": "resnet18"}, "/w")
    ckpt_lib.check_compatible({"arch": "resnet18", "num_classes": 10},
                              {"arch": "resnet18", "num_classes": 10}, "/w")


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """tiny_config's 6 steps in one run: (workdir, result). Tests that start from a finished run
    copy the workdir (compiling and building pipelines is most of a run's time)."""
    workdir = str(tmp_path_factory.mktemp("full") / "w")
    return workdir, train_lib.train_and_evaluate(tiny_config(data_dir), workdir)


def _copy(full_run, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(full_run[0], workdir)
    return workdir


def _train_losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_lib.read_metrics(workdir, "train")}


def test_resume_equals_uninterrupted_run(data_dir, tmp_path, full_run):
    """Stop after 3 of 6 steps, re-run: same losses, eval metrics and final state as one run."""
    full_dir, full = full_run
    assert not full["stopped"] and full["step"] == 6

    part_dir = str(tmp_path / "parts")
    first = train_lib.train_and_evaluate(tiny_config(data_dir, max_steps_per_run=3), part_dir)
    assert first["stopped"] and first["step"] == 3
    second = train_lib.train_and_evaluate(tiny_config(data_dir, max_steps_per_run=3), part_dir)
    assert not second["stopped"] and second["step"] == 6

    expected, resumed = _train_losses(full_dir), _train_losses(part_dir)
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([resumed[s] for s in range(1, 7)],
                               [expected[s] for s in range(1, 7)], rtol=1e-6)
    for k in ("top1", "top5", "loss"):
        np.testing.assert_allclose(second[k], full[k], rtol=1e-6)

    target = train_lib.create_setup(
        tiny_config(data_dir), input_pipeline.get_dataset_info(h.TINY_DATASET, data_dir, 32)
    ).host_state
    states = []
    for d in (full_dir, part_dir):
        c = ckpt_lib.Checkpointer(d, read_only=True)
        states.append(c.restore(target)[0])
        c.close()
    assert int(states[0].step) == int(states[1].step) == 6
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           (states[0].params, states[0].opt_state, states[0].batch_stats),
                           (states[1].params, states[1].opt_state, states[1].batch_stats))


def test_nan_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    config = tiny_config(data_dir, learning_rate=1e30, checkpoint_every_steps=1,
                         eval_every_steps=100, grad_clip_norm=0.0)
    with pytest.raises(train_lib.NonFiniteLossError,
                       match=r"training diverged at step 2 \(loss .*, gradient norm nan\)") as e:
        train_lib.train_and_evaluate(config, str(tmp_path))
    assert "\n" not in str(e.value)
    c = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
    assert c.all_steps() == [1]
    c.close()


def test_workdir_of_another_architecture(data_dir, tmp_path, full_run):
    workdir = _copy(full_run, tmp_path)
    other = tiny_config(data_dir, arch="plain20")
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match="holds a checkpoint of arch='resnet20', not 'plain20'"):
        train_lib.train_and_evaluate(other, workdir)


def test_finished_run_is_not_retrained(data_dir, tmp_path, full_run):
    workdir, first = _copy(full_run, tmp_path), full_run[1]
    again = train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
    assert again["step"] == 6 and not again["stopped"]
    np.testing.assert_allclose(again["top1"], first["top1"])
    assert len(_train_losses(workdir)) == 6


@pytest.mark.parametrize("overrides, error", [
    ({"arch": "resnet9000"}, "unknown architecture 'resnet9000'; valid names: "),
    ({"arch": ""}, "no architecture given"),
    ({"dataset": "cifar10"}, "cifar10 is not prepared in"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
    ({"parallel": "xmap"}, "unknown parallel mode 'xmap'"),
])
def test_bad_input_is_a_one_line_value_error(data_dir, tmp_path, overrides, error):
    with pytest.raises(ValueError, match=error) as e:
        train_lib.train_and_evaluate(tiny_config(str(tmp_path / "empty") if "dataset" in overrides
                                                 else data_dir, **overrides), str(tmp_path / "w"))
    assert "\n" not in str(e.value)
