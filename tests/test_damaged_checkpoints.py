"""Damaged checkpoints, changed optimizers/models, clean run records after a resume, EMA weights
from a workdir, and one end-to-end run with every new training option."""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest

import _train_helpers as h
from cnn_jax import checkpoint as ckpt_lib
from cnn_jax import configs, input_pipeline, loading, metrics as metrics_lib, train_lib
from cnn_jax import train_step as ts
from test_checkpoint import tiny_config

META = {"arch": "tiny", "dataset": "d", "num_classes": 10, "config": {"grad_clip_norm": 5.0}}


@functools.lru_cache(maxsize=None)
def _fresh(features=None):
    """A tiny state (initialized once per model: jit compiles are the slow part)."""
    model = h.tiny_module()
    if features:  # another width: another model
        import flax.linen as nn

        class Wider(type(model)):
            @nn.compact
            def __call__(self, x, train: bool = False):
                x = nn.Conv(features, (3, 3), name="conv")(x)
                return nn.Dense(10, name="fc")(x.mean(axis=(1, 2)))

        model = Wider()
    return ts.create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(0), (8, 8, 3))


def _state(tx=None, features=None, ema=False):
    fresh = _fresh(features)
    tx = tx or optax.chain(optax.clip_by_global_norm(5.0), optax.adamw(1e-3))
    state = ts.TrainState.create(apply_fn=fresh.apply_fn, params=fresh.params, tx=tx,
                                 batch_stats=fresh.batch_stats, rng=fresh.rng)
    state = ts.init_ema(state) if ema else state
    return jax.tree_util.tree_map(np.asarray, state)


def _save(workdir, steps, state):
    c = ckpt_lib.Checkpointer(workdir, max_to_keep=5, async_save=False)
    for s in steps:
        c.save(s, state.replace(step=np.int32(s)), META, {"top1": 0.1 * s})
    c.close()


def _damage(step_dir, data_only=False):
    """Truncate every file of a checkpoint, as a crash mid-write without atomic renames does
    (``data_only``: only the array data, so that the JSON files still parse)."""
    for root, _, files in os.walk(step_dir):
        for f in files:
            if data_only and ("METADATA" in f or os.path.basename(root) in ("meta", "metrics")):
                continue
            path = os.path.join(root, f)
            size = os.path.getsize(path)
            with open(path, "r+b") as fh:
                fh.truncate(size // 2)


def _restore(workdir, target):
    notices = []
    c = ckpt_lib.Checkpointer(workdir, async_save=False)
    try:
        state, step = ckpt_lib.restore_for_training(c, target, META, notices.append)
        return state, step, notices, c.all_steps()
    finally:
        c.close()


@pytest.mark.parametrize("data_only", [False, True], ids=["all_files", "array_data"])
def test_unreadable_newest_checkpoint_is_moved_aside_and_the_previous_used(tmp_path, data_only):
    workdir = str(tmp_path)
    state = _state()
    _save(workdir, [1, 2], state)
    _damage(os.path.join(workdir, "checkpoints", "2"), data_only)
    restored, step, notices, left = _restore(workdir, state)
    assert step == 1 and int(restored.step) == 1 and left == [1]
    moved = os.path.join(workdir, ckpt_lib.DAMAGED_DIR, "2")
    assert os.path.isdir(moved) and os.listdir(moved)  # kept, not deleted
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "checkpoint 2" in notices[0] and "unreadable" in notices[0]
    assert f"moved it to {moved} and resumed from step 1" in notices[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, state.params)

    _damage(os.path.join(workdir, "checkpoints", "1"))  # nothing readable left: start afresh
    restored, step, notices, left = _restore(workdir, state)
    assert restored is None and step is None and left == []
    assert "no readable checkpoint is left, starting from step 0" in notices[0]
    assert sorted(os.listdir(os.path.join(workdir, ckpt_lib.DAMAGED_DIR))) == ["1", "2"]


def test_changed_optimizer_keeps_weights_and_restarts_optimizer_state(tmp_path):
    state = _state(ema=True)
    trained = state.replace(params=jax.tree_util.tree_map(lambda p: p + 1.0, state.params))
    _save(str(tmp_path), [3], trained)
    target = _state(tx=optax.adamw(1e-3), ema=True)  # clipping dropped: another state tree
    restored, step, notices, _ = _restore(str(tmp_path), target)
    assert step == 3 and int(restored.step) == 3
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, trained.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.batch_stats,
                           trained.batch_stats)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.ema_params, trained.ema_params)
    assert jax.tree_util.tree_structure(restored.opt_state) == \
        jax.tree_util.tree_structure(target.opt_state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.opt_state, target.opt_state)
    assert len(notices) == 1 and "the optimizer differs from the checkpoint's" in notices[0]
    assert "optimizer state starts afresh" in notices[0]


def test_ema_added_later_starts_at_the_restored_weights(tmp_path):
    state = _state()
    trained = state.replace(params=jax.tree_util.tree_map(lambda p: p + 1.0, state.params))
    _save(str(tmp_path), [2], trained)
    restored, _, notices, _ = _restore(str(tmp_path), _state(ema=True))
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.ema_params, trained.params)
    assert any("has no EMA of the weights" in n for n in notices)


def test_changed_model_is_refused_in_one_line(tmp_path):
    _save(str(tmp_path), [1], _state())
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
        _restore(str(tmp_path), _state(features=16))
    message = str(e.value)
    assert "\n" not in message and "the model in" in message
    assert "params/conv/kernel is (3, 3, 3, 8) in the checkpoint, (3, 3, 3, 16) here" in message
    assert "pass another --workdir" in message


def test_load_variables_raw_ema_and_best(tmp_path):
    state = _state(ema=True)
    state = state.replace(ema_params=jax.tree_util.tree_map(lambda p: p - 1.0, state.params))
    _save(str(tmp_path), [1, 2], state)
    raw, meta, step = ckpt_lib.load_variables(str(tmp_path))
    assert step == 2 and meta["arch"] == "tiny" and set(raw) == {"params", "batch_stats"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, raw["params"], state.params)
    ema, _, _ = ckpt_lib.load_variables(str(tmp_path), step="best", ema=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ema["params"], state.ema_params)

    _save(str(tmp_path / "plain"), [1], _state())
    with pytest.raises(ValueError, match="has no EMA weights: it was trained without "
                                         "--config.ema_decay"):
        ckpt_lib.load_variables(str(tmp_path / "plain"), ema=True)
    with pytest.raises(ValueError, match="no checkpoint of step 7"):
        ckpt_lib.load_variables(str(tmp_path), step=7)


def _events(workdir):
    from tensorboard.backend.event_processing import event_accumulator

    points = []
    for name in os.listdir(workdir):
        if "tfevents" not in name:
            continue
        acc = event_accumulator.EventAccumulator(os.path.join(workdir, name),
                                                 purge_orphaned_data=False)
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            points += [(tag, e.step) for e in acc.Tensors(tag)]
    return points


def test_discard_after_leaves_one_record_per_split_and_step(tmp_path):
    workdir = str(tmp_path)
    writer = metrics_lib.MetricWriter(workdir)
    for step in range(1, 6):  # the killed run: steps 1-5, checkpoint at 3
        writer.write(step, "train", {"loss": step})
    writer.write(3, "eval", {"top1": 0.5})
    writer.close()
    with open(os.path.join(workdir, metrics_lib.METRICS_FILE), "a") as f:
        f.write('{"step": 5, "split": "tr')  # cut short by the kill
    metrics_lib.discard_after(workdir, 3)
    writer = metrics_lib.MetricWriter(workdir)
    for step in range(4, 6):  # the resumed run logs 4 and 5 again
        writer.write(step, "train", {"loss": 10 + step})
    writer.close()
    records = [(r["split"], r["step"]) for r in metrics_lib.read_metrics(workdir)]
    assert sorted(records) == sorted(set(records)) == sorted(
        [("train", s) for s in range(1, 6)] + [("eval", 3)])
    assert metrics_lib.read_metrics(workdir, "train")[-1]["loss"] == 15
    points = _events(workdir)
    assert sorted(points) == sorted(set(points))
    assert sorted(s for tag, s in points if tag == "train/loss") == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    input_pipeline.prepare_dataset(h.TINY_DATASET, d, image_size=32)
    return d


def test_loop_options_end_to_end_with_a_crash_and_a_damaged_checkpoint(data_dir, tmp_path,
                                                                       capsys):
    """EMA, accumulation, float16 and the profiler in one run, resumed after a kill that left a
    half-written checkpoint 3 and records of steps 1-4. (mixup/CutMix, TrivialAugment, random
    erasing and stochastic depth are tested in the step, in tf.data and in the model: each adds
    seconds of tracing and compiling here.)"""
    workdir = str(tmp_path / "w")
    config = tiny_config(
        data_dir, num_train_steps=4, eval_every_steps=2, ema_decay=0.9, grad_accum_steps=2,
        # Step 4 is traced: after step 3 compiled the step (a trace of the compile holds every
        # Python call of tracing and lowering, and writing its perfetto JSON takes ~20 s).
        dtype="float16", best_metric="ema_top1", profile_steps="3:4",
        # One stage of one block: compiling is most of a tiny run's time.
        model=configs.model_config({"stage_sizes": (1,), "widths": (4,)}))
    # The killed run, without training it (compiles are the slow part): its checkpoint 2
    # (4 micro-batches) and a half-written checkpoint 3, and the records it logged up to step 4.
    info = input_pipeline.get_dataset_info(config.dataset, data_dir, 32)
    setup = train_lib.create_setup(config, info)
    meta = train_lib.checkpoint_meta(config, info.num_classes)
    c = ckpt_lib.Checkpointer(workdir, async_save=False, best_metric="ema_top1")
    for step in (2, 3):
        c.save(step, setup.host_state.replace(step=np.int32(2 * step)), meta,
               {"top1": 0.0, "ema_top1": 0.0})
    c.close()
    _damage(os.path.join(workdir, "checkpoints", "3"))
    with open(os.path.join(workdir, metrics_lib.METRICS_FILE), "w") as f:
        for step in (1, 2, 3, 4):
            f.write(json.dumps({"step": step, "split": "train", "loss": 9.0 + step}) + "\n")
        f.write(json.dumps({"step": 2, "split": "eval", "top1": 0.0}) + "\n")
    capsys.readouterr()

    result = train_lib.train_and_evaluate(config, workdir)
    err = capsys.readouterr().err
    assert not result["stopped"] and result["step"] == 4 and "ema_top1" in result
    assert "checkpoint 3" in err and "unreadable" in err and "resumed from step 2" in err
    assert "2 micro-batches per step, float16" in err
    assert os.path.isdir(os.path.join(workdir, ckpt_lib.DAMAGED_DIR, "3"))
    records = [(r["split"], r["step"]) for r in metrics_lib.read_metrics(workdir)]
    assert sorted(records) == sorted(set(records))  # one record per (split, step)
    train = {r["step"]: r for r in metrics_lib.read_metrics(workdir, "train")}
    assert sorted(train) == [1, 2, 3, 4] and train[2]["loss"] == 11.0  # before the resume: kept
    assert train[3]["loss"] != 12.0 and "skipped_steps" in train[3] and "loss_scale" in train[3]
    assert {s for split, s in records if split == "eval_ema"} == {4}
    traces = [f for _, _, fs in os.walk(os.path.join(workdir, "plugins", "profile")) for f in fs]
    assert any(f.endswith(".xplane.pb") for f in traces)
    assert any(f.startswith("perfetto_trace") for f in traces)

    c = ckpt_lib.Checkpointer(workdir, read_only=True, best_metric="ema_top1")
    assert c.latest_step() == 4
    c.close()
    # What evaluate, predict and export read with --ema (and without).
    ema, raw = loading.load(workdir, "best", ema=True), loading.load(workdir, "best")
    assert ema.step == raw.step == 4 and ema.meta["config"]["ema_decay"] == 0.9
    assert not np.allclose(jax.tree_util.tree_leaves(ema.variables["params"])[0],
                           jax.tree_util.tree_leaves(raw.variables["params"])[0])
