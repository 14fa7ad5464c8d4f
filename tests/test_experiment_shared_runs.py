"""Experiments that share a config train it once: a finished run of the same resolved config (and
the same hooks and probe) in a sibling experiment's workdir is read instead of trained again."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `experiments` is a top-level folder of the repository, not installed
    sys.path.insert(0, REPO)

from experiments import bn_placement, common, shortcuts  # noqa: E402


class Trained(Exception):
    """Raised instead of training: the test only asks whether a run would train."""


@pytest.fixture
def no_training(monkeypatch):
    from cnn_jax import train_lib

    def train_and_evaluate(config, workdir, hooks=()):
        raise Trained(workdir)

    monkeypatch.setattr(train_lib, "train_and_evaluate", train_and_evaluate)


def finished_run(workdir, exp, label, seed, total, key=None):
    """A workdir as a finished run leaves it: its key, metrics up to ``total`` steps, wall time."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, common.RUN_KEY_FILE), "w") as f:
        f.write(key or common.run_key(exp, exp.variant_config(label, seed)))
    records = [{"step": total, "split": "train", "loss": 1.0},
               {"step": total, "split": "eval", "top1": 0.25, "loss": 2.0},
               {"step": total, "split": "train_probe", "top1": 0.5, "loss": 1.5}]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    with open(os.path.join(workdir, "wall_seconds.txt"), "w") as f:
        f.write("12.5")
    return records


def total_steps(exp, label):
    from cnn_jax import input_pipeline, optim

    config = exp.variant_config(label, 0)
    info = input_pipeline.get_dataset_info(config.dataset, None, image_size=config.image_size)
    return optim.total_train_steps(config, info.num_train_examples, config.batch_size)


def test_the_same_config_in_two_experiments_has_one_key_and_other_configs_another():
    short, bn = shortcuts.get_experiment(smoke=True), bn_placement.get_experiment(smoke=True)
    # The same resnet with option A and post-activation BN, written two ways.
    a = common.run_key(short, short.variant_config("A", 0))
    assert common.run_key(bn, bn.variant_config("post", 0)) == a
    assert common.run_key(short, short.variant_config("A", 1)) != a  # another seed
    assert common.run_key(short, short.variant_config("B", 0)) != a  # another model
    assert common.run_key(bn, bn.variant_config("pre", 0)) != a
    other = short.variant_config("A", 0)
    other.learning_rate = 1e-3
    assert common.run_key(short, other) != a  # another recipe


def test_a_finished_run_of_another_experiment_is_read_not_trained(tmp_path, no_training):
    short, bn = shortcuts.get_experiment(smoke=True), bn_placement.get_experiment(smoke=True)
    total = total_steps(short, "A")
    records = finished_run(str(tmp_path / "shortcuts" / "A" / "seed0"), short, "A", 0, total)
    probe = (np.zeros((2, 32, 32, 3), np.float32), np.zeros((2,), np.int32))

    run = common.train_run(bn, "post", 0, str(tmp_path / "bn_placement" / "post" / "seed0"),
                           probe=probe, log=lambda m: None)
    assert run.shared_from == "shortcuts/A"
    assert run.records == records and run.wall_seconds == 12.5
    assert run.status == "budget (= shortcuts/A)"
    assert run.metric("best_val_top1") == 0.25 and run.metric("train_loss") == 1.5
    assert not (tmp_path / "bn_placement" / "post" / "seed0").exists()  # nothing written

    # Another seed, another config, or an unfinished run of the same config: trained.
    with pytest.raises(Trained):
        common.train_run(bn, "post", 1, str(tmp_path / "bn_placement" / "post" / "seed1"),
                         probe=probe, log=lambda m: None)
    with pytest.raises(Trained):
        common.train_run(bn, "pre", 0, str(tmp_path / "bn_placement" / "pre" / "seed0"),
                         probe=probe, log=lambda m: None)
    finished_run(str(tmp_path / "degradation" / "resnet20" / "seed2"), short, "A", 2, total - 1)
    with pytest.raises(Trained):
        common.train_run(bn, "post", 2, str(tmp_path / "bn_placement" / "post" / "seed2"),
                         probe=probe, log=lambda m: None)
    # A run that trains records its key, for the experiments after it.
    key = (tmp_path / "bn_placement" / "pre" / "seed0" / common.RUN_KEY_FILE).read_text()
    assert key == common.run_key(bn, bn.variant_config("pre", 0))


def test_a_parallel_plan_trains_a_shared_config_once_longest_first(tmp_path, no_training):
    """`experiments.run --jobs`: bn_placement's post is shortcuts' A, so the plan trains it
    once (in shortcuts, the first to name it); it orders runs by cost, draws each experiment's
    probe from its first run's config, and leaves out runs that finished (here or in a sibling
    experiment's workdir). ``--jobs=0`` trains in the process; with workers, writing the
    results reads runs and never trains one."""
    from experiments import parallel

    short = dataclasses.replace(shortcuts.get_experiment(smoke=True), default_variants=("A", "C"))
    bn = dataclasses.replace(bn_placement.get_experiment(smoke=True),
                             default_variants=("post", "none"))

    def where(name):
        return str(tmp_path / name)

    tasks = parallel.plan([short, bn], None, None, {}, where)
    assert sorted((t.name, t.label) for t in tasks) == [
        ("bn_placement", "none"), ("shortcuts", "A"), ("shortcuts", "C")]
    costs = {(t.name, t.label): t.cost for t in tasks}
    assert [t.cost for t in tasks] == sorted(costs.values(), reverse=True)
    assert costs["shortcuts", "C"] > costs["shortcuts", "A"]  # C adds projection convolutions
    assert {t.probe_from for t in tasks} == {("A", 0), ("post", 0)}
    assert tasks[0].workdir == str(tmp_path / "shortcuts" / "C" / "seed0")

    finished_run(str(tmp_path / "shortcuts" / "A" / "seed0"), short, "A", 0,
                 total_steps(short, "A"))
    assert [(t.name, t.label) for t in parallel.plan([short, bn], None, None, {}, where)] == [
        ("shortcuts", "C"), ("bn_placement", "none")]
    assert [t.label for t in parallel.plan([bn], None, None, {}, where)] == ["none"]
    assert parallel.plan([short], [0], ["A"], {}, where) == []
    # Bad input plans nothing: the runner reports it in one line when it writes the results.
    assert parallel.plan([short], None, ["Z"], {}, where) == []

    with pytest.raises(RuntimeError, match="shortcuts / C / seed 0 has not finished training"):
        common.run(short, workdir=where("shortcuts"), out=str(tmp_path / "out"), jobs=2,
                   log=lambda m: None)
