"""`python -m cnn_jax.train` / `cnn_jax.evaluate` end to end, SIGTERM, and one-line errors."""

import glob
import json
import os
import re
import signal
import time

import pytest

import _train_helpers as h
from _cli_zygote import Zygote
from cnn_jax import checkpoint as ckpt_lib, input_pipeline, metrics as metrics_lib

STEPS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    input_pipeline.prepare_dataset(h.TINY_DATASET, d, image_size=32)
    return d


def train_args(workdir, data_dir, *extra, arch=h.TINY_ARCH):
    return ["-m", "cnn_jax.train", f"--arch={arch}", f"--workdir={workdir}",
            f"--dataset={h.TINY_DATASET}", f"--data_dir={data_dir}",
            *h.TINY_MODEL_FLAGS, "--config.image_size=32",
            "--config.batch_size=16", "--config.eval_batch_size=32",
            f"--config.num_train_steps={STEPS}", "--config.log_every_steps=1",
            "--config.eval_every_steps=2", *extra]


@pytest.fixture(scope="module")
def cli():
    """Runs `python -m cnn_jax.<command>` in forked processes that skip the imports (5-7 s of
    CPU each): every command here but the first training run, whose first screen and fresh start
    are what it checks (h.run_python). `benchmark` and `predict` also run as plain subprocesses
    (test_benchmark.py, test_predict_export.py); a forked child runs `evaluate`'s module as
    `__main__` just as `python -m` does, minus the imports."""
    zygote = Zygote()
    yield zygote
    zygote.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("run") / "w")
    proc = h.run_python(train_args(workdir, data_dir))
    return workdir, proc


def test_train_command(trained):
    workdir, proc = trained
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = h.last_line(proc.stdout)
    assert re.match(rf"{h.TINY_ARCH} on {re.escape(h.TINY_DATASET)}: {STEPS} steps in \d+m\d+s; "
                    r"val top-1 \d+\.\d\d%, top-5 \d+\.\d\d%, loss \d+\.\d+; "
                    r"best top-1 \d+\.\d\d% at step \d; workdir ", summary), summary
    assert "Traceback" not in proc.stderr
    assert "img/s=" in proc.stderr and "loss=" in proc.stderr  # the progress bar
    # A quiet first screen: one line on what is trained where, then the bar (no TFDS notices).
    first_screen = proc.stderr.split("train:")[0].strip().splitlines()
    assert len(first_screen) == 1 and first_screen[0].startswith(
        f"training {h.TINY_ARCH} (") and first_screen[0].endswith(f"; workdir {workdir}"), \
        proc.stderr[:3000]
    train = metrics_lib.read_metrics(workdir, "train")
    evals = metrics_lib.read_metrics(workdir, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"loss", "accuracy", "learning_rate", "grad_norm", "images_per_sec"} <= set(train[0])
    assert [r["step"] for r in evals] == [2, 4] and evals[-1]["count"] == 64
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))  # TensorBoard summaries
    c = ckpt_lib.Checkpointer(workdir, read_only=True)
    assert c.all_steps() == [2, 4]
    assert c.read_meta()["arch"] == h.TINY_ARCH
    c.close()


def test_evaluate_command(trained, cli):
    workdir, _ = trained
    proc = cli.run(["-m", "cnn_jax.evaluate", f"--arch={h.TINY_ARCH}", f"--workdir={workdir}"])
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = h.last_line(proc.stdout)
    m = re.search(r"step (\d+) on .* \((\d+) images, 32px\): top-1 ([\d.]+)%, top-5 ([\d.]+)%, "
                  r"loss ([\d.]+)", line)
    assert m, line
    final = metrics_lib.read_metrics(workdir, "eval")[-1]
    assert int(m.group(1)) == STEPS and int(m.group(2)) == 64
    assert float(m.group(3)) == pytest.approx(100 * final["top1"], abs=0.006)
    assert float(m.group(4)) == pytest.approx(100 * final["top5"], abs=0.006)
    assert float(m.group(5)) == pytest.approx(final["loss"], abs=1e-4)


def _assert_one_line_error(proc, expected):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = h.last_line(proc.stderr)
    assert line.startswith("error: ") and expected in line, proc.stderr[-3000:]


def test_workdir_of_another_architecture(trained, data_dir, cli):
    workdir, _ = trained
    proc = cli.run(train_args(workdir, data_dir, arch="plain20"))
    _assert_one_line_error(proc, "holds a checkpoint of arch='resnet20', not 'plain20'")
    proc = cli.run(["-m", "cnn_jax.evaluate", "--arch=plain20", f"--workdir={workdir}"])
    _assert_one_line_error(proc, "holds a checkpoint of arch='resnet20', not 'plain20'")


@pytest.mark.parametrize("case", ["unknown_arch", "not_prepared", "not_divisible",
                                  "mistyped_field"])
def test_one_line_errors(case, tmp_path, data_dir, cli):
    workdir = str(tmp_path / "w")
    if case == "unknown_arch":
        proc = cli.run(train_args(workdir, data_dir, arch="resnet9000"))
        _assert_one_line_error(proc, "unknown architecture 'resnet9000'; valid names: ")
        assert "resnet18" in h.last_line(proc.stderr)
    elif case == "not_prepared":
        proc = cli.run(["-m", "cnn_jax.train", "--arch=resnet18", f"--workdir={workdir}",
                             "--dataset=cifar10", f"--data_dir={tmp_path / 'empty'}"])
        _assert_one_line_error(proc, "cifar10 is not prepared in")
    elif case == "not_divisible":
        proc = cli.run(train_args(workdir, data_dir, "--config.batch_size=15"),
                            num_cpu_devices=2)
        _assert_one_line_error(proc, "batch_size 15 is not divisible by the 2 devices")
    else:  # every other class of config mistake: tests/test_registry.py, in-process
        proc = cli.run(train_args(workdir, data_dir, "--config.learnin_rate=0.1"))
        _assert_one_line_error(proc, "unknown config field --config.learnin_rate; did you mean "
                                     "--config.learning_rate?")
        assert not os.path.exists(workdir)  # checked before anything is written


def _stderr_tail(proc) -> str:
    """The end of a started command's stderr (killed first if it still runs)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(60).stderr[-3000:]


def test_sigterm_saves_and_the_same_command_resumes(tmp_path, data_dir, cli):
    workdir = str(tmp_path / "w")
    args = train_args(workdir, data_dir, "--config.eval_every_steps=100000",
                      "--config.progress_bar=False")
    args = [a for a in args if not a.startswith("--config.num_train_steps")]
    args.append("--config.num_train_steps=100000")
    # A forked child of the zygote is a process of its own (its own pid, signal handlers and exit
    # code): the signal and the clean exit are the same as for a `python -m` process.
    proc = cli.start(args)
    try:
        deadline = time.time() + 600
        while not metrics_lib.read_metrics(workdir, "train"):  # wait until it is training
            assert proc.poll() is None and time.time() < deadline, _stderr_tail(proc)
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        err = proc.wait(timeout=300).stderr
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(60)
    assert proc.returncode == 0, err[-3000:]
    m = re.search(r"SIGTERM: saved a checkpoint at step (\d+)", err)
    assert m, err[-3000:]
    step = int(m.group(1))
    c = ckpt_lib.Checkpointer(workdir, read_only=True)
    assert c.latest_step() == step
    c.close()
    logged = [r["step"] for r in metrics_lib.read_metrics(workdir, "train")]
    assert logged == list(range(1, step + 1))

    again = cli.run(args + ["--config.max_steps_per_run=2"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {h.TINY_ARCH} from step {step}" in again.stderr
    assert f"stopped at step {step + 2} of 100000" in again.stdout
    logged = [r["step"] for r in metrics_lib.read_metrics(workdir, "train")]
    assert logged == list(range(1, step + 3))


def test_benchmark_command(cli):
    proc = cli.run(["-m", "cnn_jax.benchmark", f"--arch={h.TINY_ARCH}", "--batch_size=4",
                    "--image_size=32", "--num_classes=10", "--steps=2", "--json",
                    *h.TINY_MODEL_OPTIONS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(h.last_line(proc.stdout))
    assert result["arch"] == h.TINY_ARCH and result["platform"] == "cpu"
    for kind in ("train", "eval"):
        r = result[kind]
        assert r["compile_s"] > 0 and r["images_per_sec"] > 0 and r["cpu_ms"] > 0
        assert r["peak_mib"] > 0 and r["source"] == "compiled.memory_analysis()"
    proc = cli.run(["-m", "cnn_jax.benchmark", "--arch=resnet9000"])
    _assert_one_line_error(proc, "unknown architecture 'resnet9000'")


def test_tensorflow_import_notices_are_filtered_and_other_lines_kept(tmp_path):
    """What TensorFlow's import writes to fd 2 past TF_CPP_MIN_LOG_LEVEL (its oneDNN notice) is
    dropped; any other line (a real warning) is written back. A stand-in `tensorflow` package
    writes both from C-level stderr, as the real one's absl logging does."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are "
        "written to STDERR\\n')\n"
        "os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on. You may see...\\n')\n"
        "os.write(2, b'W0000 something worth reading\\n')\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from cnn_jax import cli; "
            "cli.import_tensorflow_quietly(); import tensorflow; print(tensorflow.__file__)")
    proc = h.run_python(["-c", code, str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(fake / "__init__.py")
    assert proc.stderr == "W0000 something worth reading\n"
