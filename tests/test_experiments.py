"""The experiments (experiments/): every experiment's --smoke config end to end through the one
runner, the runner's resume, the statistics on known numbers, the hooks, and the variant configs.

All smoke runs run in the test process, once (a module fixture), with the test session's XLA
flags and compilation cache (tests/conftest.py). Each experiment trains one or two (variant, seed) runs of
6 steps on 96 images; what costs time is the fixed cost of a training run (tracing, tf.data
pipelines), so the smoke configs keep runs and evaluations few.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import signal
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `experiments` is a top-level folder of the repository, not installed
    sys.path.insert(0, REPO)

from experiments import common, run, shortcuts, stats  # noqa: E402

# experiment -> the (variant, seed) runs its smoke config trains
SMOKE = {
    "activations": ["sigmoid"],
    "shortcuts": ["C"],
    "bn_placement": ["none"],
    "degradation": ["plain8", "resnet14"],
    "alexnet_ablation": ["paper"],
    "resnet_vs_densenet": ["densenet_bc_10_k4"],
}

@contextlib.contextmanager
def _absl_verbosity_kept():
    """The runner silences absl's INFO lines (TFDS's notices); the test session's level comes
    back after it."""
    from absl import logging

    verbosity = logging.get_verbosity()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every experiment's --smoke config, once, trained by two single-core worker processes
    (--jobs=2; they inherit the test session's XLA flags and compilation cache through the
    environment: tests/conftest.py); then degradation again on the same workdirs."""
    out, work, data = (tmp_path_factory.mktemp(n) for n in ("results", "work", "tfds"))
    # The session's compilation cache (or none) stays as conftest.py set it.
    flags = [f"--workdir={work}", f"--config.data_dir={data}", "--smoke", "--nocompilation_cache"]
    first_log, second_log = io.StringIO(), io.StringIO()
    with _absl_verbosity_kept():
        with contextlib.redirect_stdout(first_log), contextlib.redirect_stderr(first_log):
            first = run.main(["all", f"--out={out}", "--jobs=2", *flags])
        with contextlib.redirect_stdout(second_log), contextlib.redirect_stderr(second_log):
            second = run.main(["degradation", f"--out={out}/again", *flags])
    status = json.loads((out / "status.json").read_text())
    driver = {"first": first, "second": second, "second_log": second_log.getvalue()}
    return types.SimpleNamespace(out=out, work=work, data=data, driver=driver, status=status,
                                 log=first_log.getvalue())


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_run_writes_results(smoke, name):
    assert smoke.driver["first"] == 0 and smoke.status[name]["status"] == "ok", smoke.log[-4000:]
    out = smoke.out / name
    labels = SMOKE[name]

    runs = _read_csv(out / "runs.csv")
    assert [r["variant"] for r in runs] == labels and {r["seed"] for r in runs} == {"0"}
    for row in runs:
        assert int(row["params"]) > 0 and int(row["macs"]) > 0
        assert int(row["steps"]) == (4 if name == "degradation" else 6)  # 96 / 16, one epoch
        assert 0.0 <= float(row["best_val_top1"]) <= 1.0
        assert math.isfinite(float(row["train_loss"]))  # the train-probe hook's records
        assert 0.0 <= float(row["train_top1"]) <= 1.0
    summary = _read_csv(out / "summary.csv")
    assert [r["variant"] for r in summary] == labels
    assert {"best_val_top1_mean", "best_val_top1_std", "train_loss_mean"} <= set(summary[0])

    curves = _read_csv(out / "curves.csv")
    for label in labels:
        mine = [r for r in curves if r["variant"] == label]
        assert {r["split"] for r in mine} == {"train", "eval", "train_probe"}
        evals = [int(r["step"]) for r in mine if r["split"] == "eval"]
        assert evals == ([2, 4] if name == "degradation" else [6])

    png = (out / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # three drawn panels

    md = (out / "README.md").read_text()
    assert f"python -m experiments.run {name} " in md and "--smoke" in md  # the exact command
    assert md.index("## Hypotheses (written before the runs)") < md.index("## Results") < \
        md.index("## Outcomes")
    assert f"![{name}]({name}.png)" in md
    outcomes = md.split("## Outcomes")[1]
    assert outcomes.count("- **H") >= 1
    assert all(any(f": {v}.**" in line for v in ("confirmed", "not confirmed", "inconclusive"))
               for line in outcomes.splitlines() if line.startswith("- **H"))
    for label in labels:
        assert f"| {label} |" in md
    # what the runs trained on, recorded by each run (a worker's CPU is this process's)
    from cnn_jax import host

    assert f"- trained on: {host.cpu_name()} (XLA compiles for the processor" in md
    for label in labels:
        device = smoke.work / name / label / "seed0" / "device.txt"
        shared = "(= " in next(r["status"] for r in runs if r["variant"] == label)
        assert shared or device.read_text() == host.cpu_name() + "\n"


def test_plateau_stops_runs_and_rerun_resumes(smoke):
    """degradation's smoke criterion holds at its second evaluation: both runs stop at step 4
    of 6, with a `plateau` record; the second invocation reads them instead of training."""
    from cnn_jax import metrics

    runs = _read_csv(smoke.out / "degradation" / "runs.csv")
    assert all(r["status"] == "plateau at epoch 0.7" for r in runs)
    records = metrics.read_metrics(str(smoke.work / "degradation" / "plain8" / "seed0"))
    assert [r["step"] for r in records if r["split"] == "plateau"] == [4]
    assert smoke.driver["second"] == 0
    assert "--- degradation" not in smoke.driver["second_log"]  # nothing trained again
    assert "wrote " in smoke.driver["second_log"]
    again = _read_csv(smoke.out / "again" / "degradation" / "runs.csv")
    assert [(r["variant"], r["steps"], r["best_val_top1"]) for r in again] == \
        [(r["variant"], r["steps"], r["best_val_top1"]) for r in runs]


def test_activations_gradient_norms(smoke):
    """At init without BN the sigmoid net's first layer gets a far smaller gradient than ReLU's,
    the more so the deeper; the trained run's hook recorded every layer at step 0 and 6."""
    rows = _read_csv(smoke.out / "activations" / "grad_norms.csv")

    def norms(source, act, depth, step=0):
        sel = [r for r in rows if (r["source"], r["activation"], r["depth"], r["step"]) ==
               (source, act, str(depth), str(step))]
        return [float(r["grad_norm"]) for r in sorted(sel, key=lambda r: int(r["layer_index"]))]

    ratios = {}
    for depth in (8, 14):
        relu, sigmoid = norms("init", "relu", depth), norms("init", "sigmoid", depth)
        assert len(relu) == len(sigmoid) == depth and min(relu + sigmoid) > 0
        ratios[depth] = sigmoid[0] / sigmoid[-2]
        assert ratios[depth] < 1e-2 < relu[0] / relu[-2]
    assert ratios[14] < ratios[8]
    assert len(norms("trained", "sigmoid", 8, 0)) == len(norms("trained", "sigmoid", 8, 6)) == 8
    md = (smoke.out / "activations" / "README.md").read_text()
    assert "![grad_norms](grad_norms.png)" in md and "First-conv / last-conv" in md


def test_workers_run_on_one_core_and_jobs_do_not_change_a_run(smoke, tmp_path):
    """Every smoke run trained in a worker pinned to one CPU core that keeps XLA:CPU's step
    buffers (``hostmem``: its log's first line says otherwise); one worker (--jobs=1) trains the
    same run to the same numbers as one of two workers did."""
    logs = sorted(smoke.work.glob("*/*/seed0/train.log"))
    assert len(logs) == sum(len(v) for v in SMOKE.values())
    for log in logs:
        first = log.read_text().splitlines()[0]
        assert re.fullmatch(r"worker pid \d+ on CPU cores \[\d+\]", first), (log, first)
    assert "training 7 run(s) in 2 process(es), one CPU core each" in smoke.log

    assert run.main(["shortcuts", "--smoke", "--jobs=1", f"--workdir={tmp_path / 'w'}",
                     f"--out={tmp_path / 'o'}", f"--config.data_dir={smoke.data}",
                     "--nocompilation_cache"]) == 0

    def numbers(path):
        return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in _read_csv(path)]

    assert numbers(tmp_path / "o" / "shortcuts" / "runs.csv") == \
        numbers(smoke.out / "shortcuts" / "runs.csv")


def test_sigterm_stops_the_workers_at_a_checkpoint(smoke, tmp_path, capsys):
    """SIGTERM to the runner: each worker's training loop saves a checkpoint and the worker
    exits; the runner says to re-run the same command (which resumes from that checkpoint).

    The runner is this process (``run.main``, as ``python -m experiments.run`` calls it; its
    worker is a real process): a thread sends SIGTERM once the run has evaluated, when the
    runner's handler is in place (it is installed before the workers start)."""
    import threading
    import time

    work = tmp_path / "w"
    run_dir = work / "shortcuts" / "C" / "seed0"
    metrics, done, sent = run_dir / "metrics.jsonl", threading.Event(), []

    def sigterm_after_the_first_evaluation():
        deadline = time.time() + 240
        while not done.is_set() and time.time() < deadline:
            if metrics.exists() and '"eval"' in metrics.read_text():
                sent.append(time.time())
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.2)

    sender = threading.Thread(target=sigterm_after_the_first_evaluation, daemon=True)
    sender.start()
    try:
        with _absl_verbosity_kept():
            code = run.main(["shortcuts", "--smoke", "--jobs=1", f"--workdir={work}",
                             f"--out={tmp_path / 'o'}", f"--config.data_dir={smoke.data}",
                             "--config.num_epochs=1000", "--nocompilation_cache"])
    finally:
        done.set()
        sender.join()
    err = capsys.readouterr().err
    assert sent, "the run never evaluated"
    assert code == 1 and "re-run the same command to resume" in err, err[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "SIGTERM: saved a checkpoint at step" in log, log[-3000:]
    assert any((run_dir / "checkpoints").iterdir())
    with pytest.raises(ProcessLookupError):  # the worker is gone, not orphaned
        os.kill(int(re.search(r"worker pid (\d+)", log).group(1)), 0)


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path):
    """A worker whose run raises reports the error (one line per experiment, the traceback in
    the log) and trains the next run."""
    from experiments import parallel

    tasks = [parallel.Task(name, "X", 0, str(tmp_path / name), ("X", 0), 1.0)
             for name in ("no_such_experiment", "nor_this_one")]
    lines = []
    assert parallel.run(tasks, 1, True, {}, log=lines.append) == {  # one worker did both
        name: f"{name} / X / seed 0: ModuleNotFoundError: No module named 'experiments.{name}'"
        for name in ("no_such_experiment", "nor_this_one")}
    assert "[1/2, " in lines[1] and ": error: ModuleNotFoundError" in lines[1]
    assert "Traceback" in lines[2] and "[2/2, " in lines[3]


def test_a_sigterm_too_late_to_stop_a_run_stops_the_set(tmp_path):
    """A SIGTERM that arrives at a run's last evaluation (the run ends normally) still stops the
    runner before the next run; the same command then reads the finished run."""
    sent = []

    def sigterm_at_the_end(event):
        if event.step == event.total_steps and not sent:
            sent.append(event.step)
            os.kill(os.getpid(), signal.SIGTERM)

    exp = dataclasses.replace(shortcuts.get_experiment(smoke=True),
                              hooks=lambda config, *probe: [sigterm_at_the_end])
    workdir = str(tmp_path / "C" / "seed0")
    with pytest.raises(common.Interrupted, match="re-run the same command"):
        common.train_run(exp, "C", 0, workdir, log=lambda *a: None)
    assert sent == [6]
    run = common.train_run(exp, "C", 0, workdir, log=lambda *a: None)  # read, not trained
    assert run.status == "budget" and len(sent) == 1


# ------------------------------------------------------------------------- no training below


def test_mean_std_and_welch_on_known_numbers():
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert stats.mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in stats.mean_std([]))
    # a - b = -3; se = sqrt(1/3 + 1/3); Welch df = 4; t(0.975, 4) = 2.7764451
    d = stats.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    half = 2.7764451 * math.sqrt(2 / 3)
    assert d.diff == -3.0 and d.df == pytest.approx(4.0)
    assert (d.low, d.high) == (pytest.approx(-3 - half), pytest.approx(-3 + half))
    assert d.p == pytest.approx(0.021312, abs=1e-5)  # scipy.stats.ttest_ind(equal_var=False)
    assert d.significant
    wide = stats.welch([0.40, 0.45, 0.50], [0.42, 0.44, 0.46])
    assert not wide.significant and wide.low < 0 < wide.high
    assert "95% CI [" in wide.describe() and "n = 3 vs 3" in wide.describe()
    one = stats.welch([0.5], [0.4, 0.3])
    assert math.isnan(one.low) and not one.significant and "too few seeds" in one.describe()


def test_plateau_criterion():
    p = stats.Plateau(patience=2, min_delta=0.01, min_epochs=3, max_loss_drop=None)
    top1 = [0.10, 0.30, 0.40, 0.405, 0.41, 0.409]
    epochs = [1, 2, 3, 4, 5, 6]
    assert p.index(top1, epochs) == 4  # best 0.41 vs 0.40 two evaluations before
    assert p.index(top1, [0.4 * e for e in epochs]) is None  # too early: epochs 0.4 to 2.4
    no_loss = dict(max_loss_drop=None)
    assert stats.Plateau(patience=2, min_delta=0.0, **no_loss).index([0.1, 0.2, 0.3],
                                                                     [1.0] * 3) is None
    # with the training loss: flat validation is not enough while the loss still falls 10%
    lossy = dataclasses.replace(p, max_loss_drop=0.05)
    losses = [3.0, 2.0, 1.5, 1.4, 1.35, 1.33]  # 1.5 -> 1.35: -10%; 1.4 -> 1.33: -5.0%
    assert lossy.index(top1, epochs, losses) == 5
    assert lossy.index(top1, epochs, losses[:5] + [1.0]) is None
    assert lossy.index(top1, epochs, losses[:5] + [math.nan]) is None
    # the same over a run's evaluations as (step, top-1, loss), 10 steps an epoch; the budget
    # plays no part
    assert lossy.index_of(list(zip(range(10, 70, 10), top1, losses)), 10) == 5
    assert lossy.index_of(list(zip(range(10, 70, 10), top1, losses)), 25) is None  # epoch < 3
    assert lossy.index_of([], 10) is None
    with pytest.raises(ValueError, match="training loss"):
        lossy.index(top1, epochs)
    assert "fell by at most 5%" in lossy.describe() and "fell" not in p.describe()
    assert "from epoch 3" in p.describe()
    # the record names its criterion; a stop under another one does not count
    assert lossy.matches(json.loads(json.dumps(lossy.record())))
    assert not p.matches(lossy.record()) and not lossy.matches({"reached": 1.0})
    # a record of the criterion in fractions of the budget (before 2026-12-06) is judged again
    fractions = {**{k: v for k, v in p.record().items() if k != "min_epochs"},
                 "min_fraction": 0.5}
    assert not p.matches(fractions)
    # with one drop: the criterion holds twice, the second time after `patience` evaluations
    # at the lower rate; min_epochs bounds the first hold only
    dropping = dataclasses.replace(p, drops=1, min_epochs=1.5)
    top1 = [0.10, 0.30, 0.302, 0.305, 0.50, 0.55, 0.555, 0.556]
    epochs = [0.5 * i for i in range(1, 9)]
    assert dropping.holds(top1, epochs) == [3, 7] and dropping.index(top1, epochs) == 7
    assert dropping.holds(top1[:7], epochs[:7]) == [3] and \
        dropping.index(top1[:7], epochs[:7]) is None
    assert p.holds(top1, epochs) == [7]  # without drops: one hold (from epoch 3)
    assert "multiplied by 0.1 (once)" in dropping.describe() and "multiplied" not in p.describe()
    assert dropping.matches(dropping.record()) and not p.matches(dropping.record())
    assert not dropping.matches(p.record())
    # a run at chance takes no first plateau before stuck_epochs; one that left it (best top-1
    # at min_top1) takes it from min_epochs as before
    chance = dataclasses.replace(dropping, min_top1=0.2, stuck_epochs=3)
    flat = [0.05, 0.06, 0.061, 0.062, 0.062, 0.063, 0.063, 0.063]
    assert dropping.holds(flat, epochs) == [3, 5]
    assert chance.holds(flat, epochs) == [5, 7]  # from epoch 3: still at chance
    late = flat[:5] + [0.30, 0.45, 0.46]  # started at epoch 3: no plateau yet
    assert dropping.holds(late, epochs) == [3] and chance.holds(late, epochs) == []
    assert chance.holds(top1, epochs) == [3, 7]  # 0.30 >= 0.2: as without the rule
    assert "20% or more until epoch 3" in chance.describe()
    assert chance.matches(chance.record()) and not dropping.matches(chance.record())
    assert not chance.matches(dropping.record())


def test_eval_mode_metrics_in_chunks_equal_one_pass():
    """The train probe evaluates in chunks (``lax.map``); means over all images as one pass."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(12, 2, 2, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, size=12), jnp.int32)
    state = types.SimpleNamespace(
        params={"w": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)}, batch_stats={},
        apply_fn=lambda v, x, train: x.reshape(x.shape[0], -1) @ v["params"]["w"])
    one = common.eval_mode_metrics(state, images, labels)
    for chunk in (3, 4, 5):  # 5 does not divide 12: one pass
        out = common.eval_mode_metrics(state, images, labels, chunk=chunk)
        np.testing.assert_allclose(out["loss"], one["loss"], rtol=1e-6)
        assert float(out["top1"]) == float(one["top1"])


def test_plateau_hook_stops_and_writes():
    plateau = stats.Plateau(patience=1, min_delta=0.05, min_epochs=0, max_loss_drop=0.1)
    hook = common.PlateauHook(plateau, history=[(10, 0.50, 2.0)])  # an evaluation before a resume
    written = []

    def event(step, top1, loss=None):
        return types.SimpleNamespace(
            step=step, total_steps=100, steps_per_epoch=10, metrics=None if top1 is None else {"top1": top1},
            train_metrics=None if loss is None else {"loss": loss}, stop=False,
            write=lambda split, s: written.append((step, split, s)))

    # 20: top-1 flat but the loss fell 25%; 30: both flat
    e0, e1, e2 = event(0, None), event(20, 0.52, 1.5), event(30, 0.53, 1.4)
    for e in (e0, e1, e2):
        hook(e)
    assert (e0.stop, e1.stop, e2.stop) == (False, False, True)
    assert written == [(30, "plateau", plateau.record())]


def test_plateau_hook_drops_the_rate_then_stops():
    plateau = stats.Plateau(patience=1, min_delta=0.05, min_epochs=0, max_loss_drop=None,
                            drops=1)
    written = []

    def event(step, top1):
        return types.SimpleNamespace(step=step, total_steps=100, steps_per_epoch=10,
                                     metrics={"top1": top1},
                                     train_metrics={"loss": 1.0}, stop=False,
                                     write=lambda split, s: written.append((step, split)))

    hook = common.PlateauHook(plateau)
    events = [event(10, 0.3), event(20, 0.31)]
    for e in events:
        hook(e)
    assert events[1].stop and hook.dropped_at == 20 and not written  # train_run records it
    # resumed at the lower rate with the history so far: the next hold is the run's plateau
    hook = common.PlateauHook(plateau, history=[(10, 0.3, 1.0), (20, 0.31, 1.0)])
    events = [event(30, 0.5), event(40, 0.52)]
    for e in events:
        hook(e)
    assert [e.stop for e in events] == [False, True] and hook.dropped_at is None
    assert written == [(40, "plateau")]


def test_a_drop_lowers_the_rate_and_the_run_goes_on_to_its_plateau(smoke, tmp_path):
    """degradation's smoke run (evaluations at steps 2, 4, 6) under its criterion with one drop:
    it holds at step 4 (the rate is divided by 10 from there, resumed from that checkpoint) and
    again at step 6, the run's plateau. A workdir of another training config is refused."""
    from cnn_jax import metrics
    from experiments import degradation

    exp = degradation.get_experiment(smoke=True)
    exp = dataclasses.replace(exp, plateau=dataclasses.replace(exp.plateau, drops=1))
    overrides = {"data_dir": str(smoke.data), "lr_schedule": "constant"}
    workdir = tmp_path / "drop"
    lines = []
    result = common.train_run(exp, "plain8", 0, str(workdir), overrides, log=lines.append)
    records = metrics.read_metrics(str(workdir))
    assert [(r["split"], r["step"]) for r in records if r["split"] in ("lr_drop", "plateau")] \
        == [("lr_drop", 4), ("plateau", 6)]
    lr = {r["step"]: r["learning_rate"] for r in records if r["split"] == "train"}
    peak = exp.variant_config("plain8", 0).learning_rate
    assert lr[4] == pytest.approx(peak) and lr[6] == pytest.approx(peak / 10)
    assert [r["learning_rate"] for r in records if r["split"] == "lr_drop"] == \
        [pytest.approx(peak / 10)]
    assert result.status == "plateau at epoch 1.0 (lr dropped at epoch 0.7)"
    assert result.drop_epochs == [pytest.approx(4 / 6)]
    assert any("learning rate x0.1" in line for line in lines)
    again = common.train_run(exp, "plain8", 0, str(workdir), overrides, log=lines.append)
    assert again.records == records  # finished: read, not trained
    with pytest.raises(ValueError, match="holds a run of another training config"):
        common.train_run(exp, "plain8", 0, str(workdir), {**overrides, "learning_rate": 0.5})


def test_a_stop_under_another_criterion_is_judged_again(smoke, tmp_path):
    """degradation's smoke run stopped at step 4 of 6. A criterion that also holds there keeps
    the stop (nothing trains); a stricter one resumes the run to its own stop at step 6; one that
    would have stopped earlier (step 2) is an error that says what to do. A stop at the budget
    (step 6) that a third criterion does not share becomes a budget end, not a plateau; under a
    higher epoch cap (the same run key) that run goes on from its checkpoint."""
    import shutil

    from cnn_jax import metrics
    from experiments import degradation

    exp = degradation.get_experiment(smoke=True)
    overrides = {"data_dir": str(smoke.data)}
    done = smoke.work / "degradation" / "plain8" / "seed0"

    def judged(name, source=done, epochs=None, **plateau):
        workdir = tmp_path / name
        shutil.copytree(source, workdir)
        lines = []
        rerun = dataclasses.replace(exp, plateau=dataclasses.replace(exp.plateau, **plateau))
        cap = {} if epochs is None else {"num_epochs": epochs}
        result = common.train_run(rerun, "plain8", 0, str(workdir), {**overrides, **cap},
                                  log=lines.append)
        return result, metrics.read_metrics(str(workdir)), "\n".join(lines)

    before = metrics.read_metrics(str(done))
    same, records, log = judged("same", min_delta=0.9)
    assert "is a plateau stop under this criterion too" in log and same.steps == 4
    assert [r for r in records if r["split"] != "plateau"] == \
        [r for r in before if r["split"] != "plateau"]  # nothing trained
    assert [(r["step"], r["min_delta"]) for r in records if r["split"] == "plateau"] == [(4, 0.9)]

    later, records, log = judged("later", min_epochs=0.9)
    assert "resumes it from there" in log and later.status == "plateau at epoch 1.0"
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4, 6]
    assert [(r["step"], r["min_epochs"]) for r in records if r["split"] == "plateau"] == \
        [(6, 0.9)]

    ended, records, log = judged("ended", source=tmp_path / "later", min_delta=-1.0)
    assert "does not hold there, the budget's end" in log
    assert ended.status == "budget" and not ended.plateaued and ended.steps == 6
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4, 6]  # nothing trained

    ended_records = records
    longer, records, log = judged("longer", source=tmp_path / "ended", epochs=2.0,
                                  min_delta=-1.0)
    assert longer.status == "budget" and longer.steps == 12 and longer.total_steps == 12
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4, 6, 8, 10, 12]
    assert records[:len(ended_records)] == ended_records  # went on from step 6

    with pytest.raises(ValueError, match="stops it at step 2, before it: remove the workdir"):
        judged("earlier", patience=0, min_epochs=0)


def test_a_run_is_judged_again_by_its_drops_and_last_evaluation(tmp_path):
    """Records of a run (evaluations at epochs 1-6, 10 steps an epoch) judged by a criterion with
    one drop that holds at epochs 3 (a drop) and 6 (the stop): a run that dropped at step 30
    and ended at 60 stops there; one that dropped elsewhere, or ran past a drop this criterion
    takes, is an error; one whose last evaluation is this criterion's drop drops there."""
    from cnn_jax import metrics

    top1 = [0.1, 0.3, 0.305, 0.5, 0.6, 0.605]
    exp = types.SimpleNamespace(plateau=stats.Plateau(
        patience=1, min_delta=0.01, min_epochs=2, max_loss_drop=None, drops=1))

    def restate(name, evaluations, drops=()):
        workdir = str(tmp_path / name)
        writer = metrics.MetricWriter(workdir, tensorboard=False)
        for i, t in enumerate(top1[:evaluations]):
            step = 10 * (i + 1)
            writer.write(step, "train", {"loss": 1.0})
            writer.write(step, "eval", {"top1": t, "loss": 1.0})
            if step in drops:
                writer.write(step, common.LR_DROP, {"learning_rate": 0.1})
        writer.close()
        lines = []
        records = common._restate_plateau(exp, workdir, metrics.read_metrics(workdir), 10, 120,
                                          1.0, lines.append)
        return [(r["split"], r["step"]) for r in records
                if r["split"] in ("plateau", common.LR_DROP)], "\n".join(lines)

    assert restate("stop", 6, drops=(30,)) == (
        [("lr_drop", 30), ("plateau", 60)],
        f"{tmp_path / 'stop'}: its last evaluation at step 60 is a plateau stop under this "
        "criterion too")
    with pytest.raises(ValueError, match=r"step\(s\) \[20\] under another plateau criterion; "
                       r"this one would at \[30\]"):
        restate("elsewhere", 6, drops=(20,))
    with pytest.raises(ValueError, match="lowers its learning rate at step 30, before it"):
        restate("past", 6)
    dropped, log = restate("drop", 3)
    assert dropped == [("lr_drop", 30)] and "it resumes from there" in log
    assert restate("going", 2) == ([], "")  # nothing holds yet: it goes on


def test_outcomes_from_known_results():
    """greater/equivalent turn Welch intervals into verdicts."""
    def fake(label, seed, top1):
        records = [{"split": "eval", "step": 10, "top1": top1, "loss": 1.0},
                   {"split": "train_probe", "step": 10, "top1": top1 + 0.1, "loss": 1.0 - top1}]
        return common.Run(label, seed, "resnet20", 1, 1, records, 10, 10, 1.0)

    exp = types.SimpleNamespace(variants={"a": {}, "b": {}, "c": {}})
    r = common.Results(exp, [fake("a", s, v) for s, v in enumerate([0.50, 0.51, 0.52])] +
                       [fake("b", s, v) for s, v in enumerate([0.40, 0.41, 0.42])] +
                       [fake("c", s, v) for s, v in enumerate([0.505, 0.515, 0.51])])
    assert common.greater(r, "a", "b", "best_val_top1").verdict == "confirmed"
    assert common.greater(r, "b", "a", "best_val_top1").verdict == "not confirmed"
    assert common.greater(r, "a", "c", "best_val_top1").verdict == "inconclusive"
    assert common.greater(r, "a", "b", "train_loss", percent=False,
                          confirmed_if="less").verdict == "confirmed"
    assert common.equivalent(r, ["a", "c"], "best_val_top1", 0.05).verdict == "confirmed"
    assert common.equivalent(r, ["a", "b"], "best_val_top1", 0.03).verdict == "not confirmed"
    assert r.values("a", "gap") == pytest.approx([0.1] * 3)


def test_variants_are_the_papers_comparisons_and_valid():
    """The default configs (not trained here): every variant's training config passes the
    training command's checks, and the variants are the comparisons the READMEs name."""
    import importlib

    from cnn_jax import configs

    exps = {n: importlib.import_module(f"experiments.{n}").get_experiment(False)
            for n in run.EXPERIMENTS}
    for exp in exps.values():
        assert len(exp.seeds) >= 3 and exp.hypotheses
        for label in exp.variants:
            configs.validate(exp.variant_config(label, 0), check_paths=False)
    deg = exps["degradation"].variants
    assert exps["degradation"].default_variants == ("plain20", "plain32", "resnet20", "resnet32")
    assert {k: (v["arch"], v["model"]["stage_sizes"]) for k, v in deg.items()} == {
        "plain20": ("plain20", (3, 3, 3)), "plain32": ("plain20", (5, 5, 5)),
        "plain56": ("plain20", (9, 9, 9)), "plain110": ("plain20", (18, 18, 18)),
        "resnet20": ("resnet20", (3, 3, 3)), "resnet32": ("resnet20", (5, 5, 5)),
        "resnet56": ("resnet20", (9, 9, 9)), "resnet110": ("resnet20", (18, 18, 18))}
    assert [v["model"]["norm_placement"] for v in exps["bn_placement"].variants.values()] == \
        ["post", "pre", "conv_relu_bn", "none"]
    sc = exps["shortcuts"]
    assert [sc.variants[k]["model"]["shortcut"] for k in sc.default_variants] == ["A", "B", "C"]
    assert sc.variants["B34"] == {"arch": "resnet34", "model": {"shortcut": "B"}}
    alex = exps["alexnet_ablation"]
    assert alex.default_variants == ("paper", "no_dropout")
    assert alex.variants["paper"]["model"]["dropout_rate"] == 0.5
    assert alex.variants["no_dropout"]["model"]["dropout_rate"] == 0.0
    acts = exps["activations"].variants
    assert {v["model"]["activation"] for v in acts.values()} == {"relu", "tanh", "sigmoid"}
    # DenseNet-BC-34 at k = 8: the nearest depth in parameters has 7.7% fewer than the ResNet
    # (depth 40 would have more). Never more (+2%), at most 10% fewer: the paper's claim is
    # DenseNet's accuracy with fewer parameters.
    res, dense = exps["resnet_vs_densenet"].extra["params"]
    assert (res, dense) == (68_380, 63_148)
    assert 0.9 <= dense / res <= 1.02, (res, dense)
    # the learning-rate sweep: each arm as it is, at another rate; the DenseNet runs at 1e-3
    rvd = exps["resnet_vs_densenet"]
    assert rvd.default_variants == ("resnet20", "densenet_bc_34_k8_lr0.001")
    assert rvd.variant_config("densenet_bc_34_k8_lr0.001", 0).arch == "densenet121"
    for arm in ("resnet20", "densenet_bc_34_k8"):
        for lr in (1e-3, 1e-2):
            assert rvd.variants[f"{arm}_lr{lr:g}"] == {**rvd.variants[arm], "learning_rate": lr}
            assert rvd.variant_config(f"{arm}_lr{lr:g}", 0).learning_rate == lr


def test_densenet_depth_matches_resnet_parameters():
    """ResNet-20 at 8-16-32 against DenseNet-BC with k=6, and at the paper's widths (k=12): the
    same depth, 52, matches within 2% (10 classes)."""
    from experiments import resnet_vs_densenet as rd

    target = rd.param_count("resnet20", {"widths": (8, 16, 32)}, 10, 32)
    depth, params = rd.match_depth(target, 6, 10, 32)
    assert depth == 52 and abs(params / target - 1) <= 0.02, (depth, params, target)
    paper = rd.param_count("resnet20", {"widths": (16, 32, 64)}, 10, 32)
    dense = rd.param_count(rd.DENSENET_TEMPLATE, rd.densenet_options(52, 12), 10, 32)
    assert (paper, dense) == (269_722, 264_586)  # -1.9%
    with pytest.raises(ValueError, match="6n \\+ 4"):
        rd.densenet_options(50, 12)


def test_runner_bad_input_is_one_line(capsys):
    assert run.main(["nope"]) == 1
    assert capsys.readouterr().err.strip() == ("error: unknown experiment(s) nope; choose from "
                                               + ", ".join(run.EXPERIMENTS) + " or all")
    assert run.main([]) == 1
    assert "error: name an experiment" in capsys.readouterr().err
    assert run.main(["shortcuts", "--seeds=0,a"]) == 1
    assert "error: --seeds takes integers, e.g. --seeds=0,1,2 (got 0,a)" in capsys.readouterr().err
    assert run.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m experiments.run NAME|all")
    # A flag's value given as the next argument stays in the command each README records.
    assert run.recorded_args(["all", "--workdir", "/tmp/w", "--smoke"]) == \
        ["--workdir", "/tmp/w", "--smoke"]
    assert run.main(["shortcuts", "--smoke", "--variants=Z", "--nocompilation_cache"]) == 1
    assert "error: unknown variant(s) Z of shortcuts; choose from A, B, C" in \
        capsys.readouterr().err
    # --config.* is the training command's language, checked the same way before anything runs
    assert run.main(["shortcuts", "--smoke", "--config.learnin_rate=0.1",
                     "--nocompilation_cache"]) == 1
    assert ("error: unknown config field --config.learnin_rate; did you mean "
            "--config.learning_rate?") in capsys.readouterr().err


def test_degradation_gpu_script_runs_without_tensorflow(tmp_path):
    """The accelerator script end to end at a toy size on the CPU, with TensorFlow, TFDS,
    ml_collections and clu unimportable (the GPU machine has none of them). Steps are few and
    small: at the session's -O0 a step runs slowly (0.2-0.4 s per 16 images), while two
    evaluations of two networks check the same paths as more."""
    import _train_helpers as h
    from cnn_jax import benchmark_gpu

    site = h.blocking_site(tmp_path, benchmark_gpu.FORBIDDEN)
    out = tmp_path / "out"
    proc = h.run_python(
        ["-m", "experiments.degradation_gpu", "--depths=8,14", "--families=plain", "--widths=4,4,8",
         "--train_images=600", "--val_images=500", "--steps=4", "--chunk=2",
         "--eval_every=2", "--batch_size=8", "--workers=2", f"--out={out}",
         # fitted to a budget far above the toy runs: --steps (the most) stays
         "--time_budget_s=3000"],
        PYTHONPATH=os.pathsep.join([str(site), REPO]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    fit = result["meta"]["fitted_steps"]
    assert (fit["steps"], fit["eval_every"], fit["calibrated_on"]) == (4, 2, "plain14")
    assert fit["step_ms"] > 0 and fit["estimated_s"] < fit["budget_s"] < 3000
    assert "fitted to 3000 s: 4 steps per network" in proc.stdout
    assert [r["variant"] for r in result["runs"]] == ["plain8", "plain14"]
    for r in result["runs"]:
        assert [c["step"] for c in r["curve"]] == [2, 4] and r["steps"] == 4
        assert math.isfinite(r["final"]["train_loss"]) and 0 <= r["final"]["val_top1"] <= 1
        assert r["params"] > 0
    assert result["runs"][1]["params"] > result["runs"][0]["params"]  # 14 layers > 8
    md = (out / "README.md").read_text()
    assert "| plain14 | 0 |" in md and "the deeper plain net has the higher training loss" in md
    assert proc.stdout.count("train loss") == 4  # two evaluations of two networks
    assert "![curves](curves.png)" in md and (out / "curves.png").stat().st_size > 0
    # --report rewrites the README from results.json with the recorded command's flags
    (out / "README.md").unlink()
    from experiments import degradation_gpu

    assert degradation_gpu.main(["--report", f"--out={out}"]) == 0
    assert (out / "README.md").read_text() == md
    # The same with a drawing time whose rounding to 0.1 s (results.json) moves its whole seconds
    # (2.54: "3 s", its record 2.5: "2 s"; the README must say what --report will say)
    from absl import flags

    fv = flags.FlagValues()
    degradation_gpu._define(fv, [])
    fv(["degradation_gpu", *result["meta"]["command"].split(" -m experiments.degradation_gpu")[1]
        .split()])
    degradation_gpu.write(str(out), result["runs"], fv, [8, 14], result["meta"]["command"], 2.54,
                          fit)
    md = (out / "README.md").read_text()
    assert "(drawn in 2 s)" in md
    assert degradation_gpu.main(["--report", f"--out={out}"]) == 0
    assert (out / "README.md").read_text() == md


def test_degradation_gpu_steps_for_budget():
    from experiments import degradation_gpu as g

    runs = [("plain", 20), ("plain", 56), ("plain", 20), ("plain", 56)]  # two seeds
    # calibrated on the 56-layer net: 10 ms per step, 1 s per evaluation, 20 s to compile
    fit = g.steps_for_budget(0.010, 1.0, 20.0, 56, runs, 400.0, 100, 64_000)
    scale = 20 / 56
    fixed = (1 + scale) * (20.0 + 8 * 1.0) + (1 + scale) * (0.2 * 20.0 + 8 * 1.0)
    per_step = 2 * 0.010 * (1 + scale)
    assert fit["steps"] == int((400 - fixed) / per_step) // 100 * 100 == 12_700
    assert fit["eval_every"] == 1_600 and fit["steps"] / fit["eval_every"] <= g.EVALS
    assert fit["estimated_s"] == pytest.approx(fixed + per_step * 12_700, abs=0.1)
    assert g.steps_for_budget(0.010, 1.0, 20.0, 56, runs, 400.0, 100, 2_000)["steps"] == 2_000
    with pytest.raises(ValueError, match="not one chunk of 100 steps each"):
        g.steps_for_budget(0.010, 1.0, 20.0, 56, runs, 56.0, 100, 64_000)


def test_degradation_gpu_bad_depth_is_one_line(capsys):
    from experiments import degradation_gpu

    assert degradation_gpu.main(["--depths=21"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --depths must be 6n + 2 (20, 32, 44, 56, "
                                               "110), got [21]")
    # Fewer images than one evaluation batch (a division by zero at the first evaluation before).
    assert degradation_gpu.main(["--val_images=100", "--train_images=200"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --val_images must be a multiple of 500 and --train_images at "
                          "least 500") and err.endswith("got 100 and 200") and "\n" not in err
    assert degradation_gpu.main(["--report", "--out=/nonexistent/results"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --report: no results.json in "
                                               "/nonexistent/results; pass the --out of a "
                                               "finished run")


def test_setup_states_the_runs_config_overrides():
    """A README's Setup describes the config the runs trained with: the recipe with the
    command's --config.* (an 80-epoch cap, not the default set's 40)."""
    from experiments import degradation

    exp = degradation.get_experiment(smoke=True)
    lines = "\n".join(common.setup_lines(common.Results(exp, [], {"num_epochs": 7.0})))
    assert "at most 7 epochs" in lines and "at most 1 epochs" not in lines
    assert "at most 1 epochs" in "\n".join(common.setup_lines(common.Results(exp, [])))
    never = stats.Plateau(patience=stats.NO_STOP)  # alexnet_ablation's: no plateau stop
    assert not never.stops and stats.Plateau().stops
    assert never.describe() == "none: every run trains to the end of its epoch budget"
    no_stop = dataclasses.replace(exp, plateau=never)
    assert "- stopping: none: every run trains to the end of its epoch budget\n" in "\n".join(
        common.setup_lines(common.Results(no_stop, []))) + "\n"


def test_gradient_norms_of_each_seed_share_one_program():
    """The activations hook's norms compile once per network, not once per train state (each
    state has a new optimizer object), and equal an unjitted computation."""
    import jax
    import optax

    from cnn_jax import train_step
    from experiments import activations

    model = activations.PlainCifarNet(depth=8, widths=(4, 8, 8), num_classes=5)
    images = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
    labels = jax.numpy.arange(8) % 5
    hook = activations.GradNormHook(images, labels)
    states = [train_step.create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(s),
                                            (32, 32, 3)) for s in (0, 1)]
    before = activations._kernel_grad_norms._cache_size()
    norms = [hook.norms(s) for s in states]
    assert activations._kernel_grad_norms._cache_size() - before <= 1
    assert norms[0] != norms[1] and set(norms[0]) == set(activations.layer_names(8))
    with jax.disable_jit():
        eager = activations.kernel_grad_norms(states[1], images, labels)
    for name, value in eager.items():
        assert math.isclose(float(value), norms[1][name], rel_tol=1e-4)
