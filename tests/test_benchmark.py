"""The benchmark harnesses: ``--compare=torch`` and ``--suite=gpu`` (run here on CPU devices)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn_jax import benchmark_ab, benchmark_gpu, benchmark_layers, benchmark_torch

import _train_helpers as h

# The random init's values do not matter to a timing harness, and with threefry's partitionable
# mode (jax's default) XLA:CPU compiles a model's init ~6x slower (measured: 22 s vs 3.7 s for a
# tiny resnet20 on the loaded 2-core machine), which would dominate these tests.
FAST_INIT = {"JAX_THREEFRY_PARTITIONABLE": "0"}
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None,
    reason="torch/torchvision not installed (pip install -e '.[torch]')")


@pytest.fixture
def one_torch_thread():
    """torch on one thread: two spin-waiting beside the other test worker take 10x longer."""
    torch, _ = benchmark_torch.import_torch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_select_rows_defaults_and_overrides():
    rows = benchmark_torch.select_rows()
    assert len(rows) == 12 and {d for _, d in rows} == {"float32", "bfloat16"}
    assert rows[0] == (benchmark_torch.Row("resnet50", 224, 16, 1000), "float32")
    assert (benchmark_torch.Row("resnet18", 32, 64, 10), "bfloat16") in rows
    assert (benchmark_torch.Row("vgg16", 224, 8, 1000), "float32") in rows
    rows = benchmark_torch.select_rows(["resnet18", "resnet34"], batch_size=2, dtypes=["bfloat16"])
    assert rows == [(benchmark_torch.Row("resnet18", 32, 2, 10), "bfloat16"),
                    (benchmark_torch.Row("resnet34", 224, 2, 1000), "bfloat16")]
    with pytest.raises(ValueError, match="unknown dtype"):
        benchmark_torch.select_rows(dtypes=["float16"])


def test_alternate_interleaves_after_warmup(monkeypatch):
    """Calls alternate, and each timed one starts after the pause (outside its time)."""
    calls = []
    monkeypatch.setattr(benchmark_torch.time, "sleep", lambda s: calls.append(s))
    times = benchmark_torch.alternate([lambda: calls.append("a"), lambda: calls.append("b")],
                                      warmup=1, steps=3, pause_s=0.05)
    assert calls == ["a", "b"] + [0.05, "a", 0.05, "b"] * 3
    assert [len(t) for t in times] == [3, 3] and all(x >= 0 for t in times for x in t)


@needs_torch
def test_compare_torch_one_row(tmp_path):
    # One torch thread: two spin-waiting OpenMP threads on a busy 2-core machine take 10x longer.
    proc = h.run_python(["-m", "cnn_jax.benchmark", "--compare=torch", "--arch=resnet18",
                         "--batch_size=2", "--steps=1", "--warmup=0", "--dtype=bfloat16",
                         "--torch_threads=1", "--profile=1", "--json", f"--output={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(h.last_line(proc.stdout))
    assert result == json.loads((tmp_path / "compare_torch.json").read_text())
    # --profile=1: one more train step of each side traced, each op's time per step
    profile = result["rows"][0]["profile"]
    assert profile["cnn_jax"]["steps"] == profile["torch"]["steps"] == 1
    assert profile["torch"]["source"] == "trace of torch.profiler"
    assert profile["torch"]["idle_ms_per_step"] is None  # torch's: each op's own CPU time
    assert profile["cnn_jax"]["idle_ms_per_step"] >= 0  # XLA's: shares of the wall time
    for side in profile.values():
        assert side["op_ms_per_step"] > 0 and side["top_ops"]
        assert side["op_ms_per_step"] == pytest.approx(
            sum(k["ms_per_step"] for k in side["kinds"]), rel=0.2)  # the kinds cover most
    torch_ops = {k["kind"] for k in profile["torch"]["kinds"]}
    assert {"aten::mkldnn_convolution", "aten::convolution_backward"} <= torch_ops
    env = result["environment"]
    assert env["torch"] and env["torchvision"] and env["torch_threads"] == 1
    (row,) = result["rows"]
    assert (row["arch"], row["image_size"], row["batch_size"], row["num_classes"],
            row["dtype"]) == ("resnet18", 32, 2, 10, "bfloat16")
    assert row["params"] == 11_181_642  # torchvision's resnet18(num_classes=10), checked equal
    assert "autocast" in row["torch_peer"]
    for kind in ("train", "eval"):
        r = row[kind]
        assert len(r["cnn_jax_step_ms"]) == len(r["torch_step_ms"]) == 1
        assert r["cnn_jax_ms"] > 0 and r["torch_ms"] > 0 and r["cnn_jax_compile_s"] > 0
        assert r["ratio"] == pytest.approx(r["torch_ms"] / r["cnn_jax_ms"])
        assert r["cnn_jax_images_per_sec"] == pytest.approx(2e3 / r["cnn_jax_ms"])
        assert r["torch_images_per_sec"] == pytest.approx(2e3 / r["torch_ms"])
        assert r["faster"] == ("cnn_jax" if r["ratio"] > 1 else "torch")
    table = (tmp_path / "compare_torch.md").read_text()
    assert "| resnet18 (10 classes) | 32 | 2 | bfloat16 |" in table
    assert f"**{row['train']['ratio']:.2f}**" in table and "torch step time / cnn_jax" in table
    assert "resnet18 32px b2 bfloat16: train" in proc.stderr  # the progress line
    assert "resnet18 32 px batch 2 bfloat16, cnn_jax train step: " in table
    assert "resnet18 32 px batch 2 bfloat16, torch train step: " in table
    assert "ms of torch ops' own CPU time per step (1 traced steps" in table


def test_ab_rounds_rotate_the_order_of_the_arms():
    assert [benchmark_ab.rotated("abc", r) for r in range(4)] == [
        list("abc"), list("bca"), list("cab"), list("abc")]
    calls = []
    times = benchmark_ab.time_rounds({k: (lambda k=k: calls.append(k)) for k in "ab"},
                                     rounds=3, warmup=1, pause_s=0.0)
    assert calls == list("ab") + list("ab") + list("ba") + list("ab")  # warm-up, then 3 rounds
    assert [len(t) for t in times.values()] == [3, 3]
    assert benchmark_ab.parse_arms(" xla, auto ,torch") == ["xla", "auto", "torch"]
    with pytest.raises(ValueError, match="unknown arm 'eigen'; arms are layer implementations"):
        benchmark_ab.parse_arms("xla,eigen")
    with pytest.raises(ValueError, match="two or more different arms"):
        benchmark_ab.parse_arms("auto,auto")
    # one formulation at a time
    assert benchmark_ab.parse_arms("xla,fast:max_pool,fast:conv1x1+max_pool") == [
        "xla", "fast:max_pool", "fast:conv1x1+max_pool"]
    for bad in ("fast:eigen", "fast:", "fast:max_pool+eigen"):
        with pytest.raises(ValueError, match=f"unknown arm '{re.escape(bad)}'.*fast:OP\\+OP"):
            benchmark_ab.parse_arms(f"xla,{bad}")


def test_host_train_state_is_create_train_state_on_the_cpu():
    """The benchmarks' state: the same parameters and statistics as ``create_train_state`` of the
    bf16 model (float32 values either way), made by the float32 clone on the CPU, with the bf16
    model's ``apply_fn``."""
    import jax.numpy as jnp
    import optax
    from cnn_jax import train_step
    from cnn_jax.models import create_model

    model = create_model(h.TINY_ARCH, num_classes=10, dtype=jnp.bfloat16,
                         **h.TINY_MODEL)
    ours = benchmark_gpu.host_train_state(model, (8, 8, 3))
    ref = train_step.create_train_state(model, optax.sgd(0.01, momentum=0.9),
                                        jax.random.PRNGKey(0), (8, 8, 3), jnp.bfloat16)
    for a, b in ((ours.params, ref.params), (ours.batch_stats, ref.batch_stats),
                 (ours.opt_state, ref.opt_state)):
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y)), a, b)
    assert ours.apply_fn == model.apply and ours.step == 0
    leaves = jax.tree_util.tree_leaves(ours.params)
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in leaves)


def test_gpu_ab_script_commands_parse(tmp_path):
    """scripts/gpu_ab.sh (the device call's formulation A/B): every command it would run parses
    with the benchmark's flags, and every --ab arm is a known one (DRY_RUN prints them)."""
    proc = subprocess.run(["bash", os.path.join(h.REPO, "scripts", "gpu_ab.sh"),
                           str(tmp_path / "out")], env=h.python_env(DRY_RUN="1"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    commands = [line.split() for line in proc.stdout.splitlines()]
    assert [c[0] for c in commands] == ["ab_resnet50", "ab_googlenet", "ab_densenet121",
                                        "resnet50_b256", "resnet50_b512"]
    assert list((tmp_path / "out").iterdir()) == []  # a dry run writes nothing
    check = ("import sys, json\n"
             "from cnn_jax import benchmark, benchmark_ab\n"
             "out = []\n"
             "for argv in json.loads(sys.argv[1]):\n"
             "    benchmark.FLAGS.unparse_flags()\n"
             "    benchmark.FLAGS(['benchmark'] + argv)\n"
             "    f = benchmark.FLAGS\n"
             "    out.append([f.arch, f.batch_size, f.ab and benchmark_ab.parse_arms(f.ab)])\n"
             "print(json.dumps(out))\n")
    proc = h.run_python(["-c", check, json.dumps([c[1:] for c in commands])])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(h.last_line(proc.stdout)) == [
        ["resnet50", 256, ["xla", "fast:max_pool", "fast:conv1x1", "fast:batch_norm"]],
        ["googlenet", 256, ["xla", "fast:max_pool"]],
        ["densenet121", 256, ["xla", "fast:conv1x1"]],
        ["resnet50", 256, None], ["resnet50", 512, None]]


def test_ab_builds_each_arm_as_its_own_program(tmp_path):
    """The arms really differ: each built after clearing JAX's caches (the layers' inner jits
    would otherwise replay the first arm's traces), so XLA's and the fast layers compile to two
    programs; the first arm's ratio is 1."""
    proc = h.run_python(["-m", "cnn_jax.benchmark", "--ab=xla,fast", "--arch=resnet20",
                         "--model.widths=4,8,16", "--image_size=8", "--batch_size=2",
                         "--num_classes=10", "--steps=2", "--warmup=0", "--json",
                         f"--output={tmp_path}"], **FAST_INIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(h.last_line(proc.stdout))["results"]
    assert r["arms"] == ["xla", "fast"] and r["model_options"] == {"widths": [4, 8, 16]}
    assert r["distinct_programs"] and len(set(r["fingerprints"].values())) == 2
    for kind in ("train", "eval"):
        assert r[kind]["xla"]["ratio"] == 1.0
        fast = r[kind]["fast"]
        assert len(fast["step_ms"]) == 2 and fast["compile_s"] > 0
        assert fast["ratio"] == pytest.approx(r[kind]["xla"]["ms"] / fast["ms"])
        assert fast["images_per_sec"] == pytest.approx(2e3 / fast["ms"])
    table = (tmp_path / "ab.md").read_text()
    assert f"| resnet20 | fast | {r['train']['fast']['ms']:.1f} |" in table
    assert "same program" not in table
    assert "resnet20: built arm fast" in proc.stderr


@needs_torch
def test_ab_with_a_torch_arm_and_the_same_program_flagged(one_torch_thread):
    r = benchmark_ab.run_ab("resnet18", ["auto", "fast", "torch"], 2, 32, 10, rounds=1,
                            warmup=0, pause_s=0.0)
    # On the CPU "auto" is the fast layers: the same traced program, which the table says.
    assert r["fingerprints"]["auto"] == r["fingerprints"]["fast"] and not r["distinct_programs"]
    assert "torch" not in r["fingerprints"]
    assert r["train"]["torch"]["ms"] > 0 and "compile_s" not in r["train"]["torch"]
    table = benchmark_ab.markdown([r])
    assert "**Warning: two arms traced the same program.**" in table
    assert "| resnet18 | torch |" in table
    with pytest.raises(ValueError, match="the torch arm runs the stock network"):
        benchmark_ab.run_ab("resnet18", ["auto", "torch"], 1, 32, 10,
                            model_options={"widths": "8,16,32,64"})


def test_convolutions_of_a_network_with_counts():
    convs = benchmark_layers.convolutions("resnet50", 2, 224)
    assert sum(n for _, n in convs) == 53  # the stem, 16 bottlenecks x 3, 4 downsamples
    stem, count = convs[0]
    assert (stem.input_shape, stem.kernel_shape, stem.strides, stem.padding, count) == (
        (2, 224, 224, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3)), 1)
    assert stem.label() == "7x7/2 3->64 at 224x224"
    counts = {conv.label(): n for conv, n in convs}
    assert counts["3x3 64->64 at 56x56"] == 3 and counts["1x1 1024->256 at 14x14"] == 5


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compare_layers_against_torch_conv2d(one_torch_thread, dtype):
    result = benchmark_layers.compare("resnet18", 2, 32, 10, steps=1, warmup=0, dtype=dtype)
    assert result["dtype"] == dtype
    rows = result["rows"]
    assert sum(r["count"] for r in rows) == 20 and len(rows) == 11
    assert [r["grad_input"] for r in rows] == [False] + [True] * 10
    for kind in ("forward_ms", "train_ms"):
        assert all(r[kind]["cnn_jax"] > 0 and r[kind]["torch"] > 0 for r in rows)
        assert result["total"][kind]["torch"] == pytest.approx(
            sum(r["count"] * r[kind]["torch"] for r in rows))
    table = benchmark_layers.markdown(result)
    assert table.startswith(f"resnet18, batch 2 at 32 px, {dtype}: each convolution alone")
    assert ("autocast" in table.splitlines()[0]) == (dtype == "bfloat16")
    assert "| 7x7/2 3->64 at 32x32 (no input gradient) | 1 |" in table
    total = result["total"]["train_ms"]
    assert "| **all, times count** | 20 |" in table
    assert f"**{total['torch'] / total['cnn_jax']:.2f}** |" in table.splitlines()[-1]


def test_cpu_name_tells_two_cpus_of_one_name_apart(monkeypatch):
    """Benchmark tables and experiment write-ups name the CPU: AMD's AVX2 and AVX-512 EPYCs have
    one model name but other XLA kernels (other speed, other float32 rounding)."""
    import platform

    from cnn_jax import host
    from cnn_jax.models import layers

    genoa = {"model name": "AMD EPYC", "cpu family": "25", "model": "17",
             "flags": "fpu avx f16c avx2 avx512f avx512_bf16"}
    monkeypatch.setattr(host, "_cpuinfo", lambda: genoa)
    assert host.cpu_name() == "AMD EPYC (family 25 model 17, AVX-512)"
    assert layers._cpu_has_avx512_bf16() and benchmark_torch.cpu_name() == host.cpu_name()
    monkeypatch.setattr(host, "_cpuinfo", lambda: {**genoa, "model": "1", "flags": "fpu avx avx2"})
    assert host.cpu_name() == "AMD EPYC (family 25 model 1, AVX2)"
    assert not layers._cpu_has_avx512_bf16()
    emerald = {"model name": "Intel(R) Xeon(R) Processor", "cpu family": "6", "model": "207",
               "flags": "fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile"}
    monkeypatch.setattr(host, "_cpuinfo", lambda: emerald)
    assert host.cpu_name() == "Intel(R) Xeon(R) Processor (family 6 model 207, AVX-512, AMX)"
    assert host.has_amx_bf16() and layers._cpu_has_avx512_bf16()
    monkeypatch.setattr(host, "_cpuinfo", dict)  # no /proc/cpuinfo (macOS)
    assert host.cpu_name() == (platform.processor() or platform.machine())
    assert host.vector_isa() == "" and not host.has_avx512_bf16() and not host.has_amx_bf16()
    monkeypatch.undo()
    if os.path.exists("/proc/cpuinfo"):  # the real file's first processor
        info = host._cpuinfo()
        assert info and host.cpu_name().startswith(info.get("model name", ""))


def test_compare_and_suite_reject_bad_flags_in_one_line(tmp_path):
    proc = h.run_python(["-m", "cnn_jax.benchmark", "--compare=torch", "--arch=resnet18",
                         "--model.widths=8,16,32,64"])
    assert proc.returncode != 0
    assert h.last_line(proc.stderr).startswith("error: --model.* options change the network")
    proc = h.run_python(["-m", "cnn_jax.benchmark", "--suite=gpu", "--arch=resnet50",
                         "--model.colour=2", f"--output={tmp_path}"])
    assert proc.returncode != 0 and not os.listdir(tmp_path)
    assert h.last_line(proc.stderr).startswith(
        "error: --model.colour is not an option of 'resnet50'; valid options: ")
    proc = h.run_python(["-m", "cnn_jax.benchmark", "--arch=resnet50", "--model.widths"])
    assert proc.returncode != 0
    assert h.last_line(proc.stderr) == (
        "error: write model options as --model.FIELD=VALUE, not '--model.widths'")
    proc = h.run_python(["-m", "cnn_jax.benchmark", "--ab=xla,auto", "--compare=torch"])
    assert proc.returncode != 0
    assert h.last_line(proc.stderr) == (
        "error: pass one of --compare=torch, --suite=gpu and --ab=ARMS")
    proc = h.run_python(["-m", "cnn_jax.benchmark", "--ab=xla,auto"])
    assert proc.returncode != 0
    assert h.last_line(proc.stderr) == (
        "error: --ab needs --arch=<name>[,<name>...], e.g. --arch=resnet50")
    proc = h.run_python(["-m", "cnn_jax.benchmark", "--compare=torch", "--arch=resnet50",
                         "--profile=-1"])
    assert proc.returncode != 0
    assert h.last_line(proc.stderr) == (
        "error: --profile takes a number of steps (0: none), got -1")
    proc = h.run_python(["-m", "cnn_jax.benchmark", "--compare=torch", "--layers",
                         "--arch=resnet50", "--profile=1"])
    assert proc.returncode != 0
    assert h.last_line(proc.stderr) == ("error: --profile traces whole train steps; --layers "
                                        "times single convolutions: pass one of them")


@pytest.mark.parametrize("devices", [8, 1])
def test_gpu_suite_on_cpu_devices_without_tensorflow(tmp_path, devices):
    """The suite end to end at a tiny size, with TF & co. unimportable: pmap over 8 CPU devices,
    and on one device (a one-GPU machine's path) the step jitted without the device axis."""
    site = h.blocking_site(tmp_path, benchmark_gpu.FORBIDDEN)
    out = tmp_path / "out"
    proc = h.run_python(
        ["-m", "cnn_jax.benchmark", "--suite=gpu", f"--arch={h.TINY_ARCH}",
         *h.TINY_MODEL_OPTIONS, "--image_size=32", "--num_classes=10",
         "--batch_size=2", "--steps=2", "--warmup=1", "--kind_budget_s=0.1", "--dtype=float32",
         "--profile_steps=2", f"--output={out}", "--json"], num_cpu_devices=devices,
        PYTHONPATH=os.pathsep.join([str(site), h.REPO]), **FAST_INIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(h.last_line(proc.stdout))
    assert result == json.loads((out / "gpu_suite.json").read_text())
    assert result["forbidden_modules"] == []
    (row,) = result["rows"]
    assert "error" not in row, row.get("error")
    assert row["forbidden_modules"] == []
    assert (row["arch"], row["dtype"], row["devices"], row["global_batch"], row["platform"],
            row["parallel"]) == (h.TINY_ARCH, "float32", devices, 2 * devices, "cpu",
                                 "pmap" if devices > 1 else "jit (one device)")
    for kind in ("train", "eval"):
        r = row[kind]
        assert r["compile_s"] > 0 and 2 <= r["steps"] <= 2 and r["step_ms"] > 0
        assert r["images_per_sec"] == pytest.approx(devices * r["images_per_sec_per_device"])
        assert r["peak_mib"] is None and r["xla_estimate_mib"] > 0  # CPU: no allocator stats
    assert row["train"]["xla_flops_per_device_step"] > 0
    target = result["target"]
    assert target["forward_flops_per_image"] == pytest.approx(8.18e9, rel=0.01)  # resnet50
    assert row["flop_share_images_per_sec"] == pytest.approx(
        7000 * target["forward_flops_per_image"] / row["forward_flops_per_image"])
    assert row["train_vs_share"] == pytest.approx(
        row["train"]["images_per_sec_per_device"] / row["flop_share_images_per_sec"])
    table = (out / "gpu_suite.md").read_text()
    assert f"| {h.TINY_ARCH} | float32 | 2 |" in table and f"{devices} x cpu" in table
    profile = row["train"]["profile"]  # --profile_steps: the traced steps' XLA ops
    assert profile["steps"] == 2 and profile["op_ms_per_step"] > 0 and profile["kinds"]
    assert profile["source"] == "host thunks"
    assert f"- {h.TINY_ARCH} float32: " in table and "Where each train step's time goes" in table


def test_profile_of_a_train_step_on_the_cpu():
    """benchmark.run(profile=N): the traced train steps' XLA ops, by kind and by op."""
    from cnn_jax import benchmark, profiling

    r = benchmark.run(h.TINY_ARCH, 2, 32, 10, "float32", steps=1, eval_step=False,
                      model={"stage_sizes": (1, 1, 1), "widths": (4, 8, 8)}, profile=2)
    p = r["train"]["profile"]
    assert p["steps"] == 2 and p["op_ms_per_step"] > 0 and p["ops_counted"] >= len(p["top_ops"])
    assert p["source"] == "host thunks"  # the CPU: XLA's thunks
    shares = [k["share"] for k in p["kinds"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert any(k["kind"].startswith("conv") for k in p["kinds"]), p["kinds"]  # the convolutions
    assert all(o["kind"] == profiling.kind(o["op"]) for o in p["top_ops"])
    assert p["idle_ms_per_step"] >= 0
    table = profiling.markdown(p, "train step")
    assert table.startswith("train step: ") and "| op kind | ms/step | calls/step | share |" in table
    assert "read from the host thunks" in table and "ms/step with none" in table


_XSPACE = """
planes {{
  name: "/device:GPU:0"
  {xla_ops}
  lines {{
    name: "Stream #14(compute)" timestamp_ns: 1000
    events {{ metadata_id: 3 offset_ps: 0 duration_ps: 2500000
             stats {{ metadata_id: 4 str_value: "convolution.1" }} }}
    events {{ metadata_id: 5 offset_ps: 2600000 duration_ps: 100000 }}
  }}
  event_metadata {{ key: 1 value {{ id: 1 name: "convolution.1" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "loop_fusion.7" }} }}
  event_metadata {{ key: 3 value {{ id: 3 name: "sm90_xmma_fprop_kernel" }} }}
  event_metadata {{ key: 5 value {{ id: 5 name: "MemcpyD2D" }} }}
  stat_metadata {{ key: 4 value {{ id: 4 name: "hlo_op" }} }}
}}
planes {{
  name: "/host:CPU"
  lines {{ name: "tf_XLAEigen/1" timestamp_ns: 0
          events {{ metadata_id: 1 offset_ps: 0 duration_ps: 9000000
                   stats {{ metadata_id: 2 str_value: "launch.1" }} }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "ThunkExecutor::Execute" }} }}
  stat_metadata {{ key: 2 value {{ id: 2 name: "hlo_op" }} }}
}}
"""
_XLA_OPS = """lines {
    name: "XLA Ops" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 3000000 }
    events { metadata_id: 2 offset_ps: 3000000 duration_ps: 1000000 }
    events { metadata_id: 1 offset_ps: 5000000 duration_ps: 3000000 }
  }"""


def test_profiling_reads_a_gpu_trace():
    """A device plane's "XLA Ops" line where there is one, else its kernels by their hlo_op (not
    the host's launch spans), and the host's thunks only without device ops."""
    from cnn_jax import profiling

    def read(text):
        return profiling.read_ops(jax.profiler.ProfileData.from_text_proto(text))

    assert read(_XSPACE.format(xla_ops=_XLA_OPS)) == (  # 1 us with no op between the two
        {"convolution.1": (pytest.approx(6e-6), 2), "loop_fusion.7": (pytest.approx(1e-6), 1)},
        "device XLA Ops", pytest.approx(1e-6))
    ops = read(_XSPACE.format(xla_ops=_XLA_OPS))  # no thread pool on a device: not mentioned
    table = profiling.markdown(profiling.summarize(ops.times, 1, source=ops.source,
                                                   idle_s=ops.idle_s))
    assert "each moment shared among the ops running, 0.00 ms/step with none" in table
    assert read(_XSPACE.format(xla_ops="")) == (
        {"convolution.1": (pytest.approx(2.5e-6), 1)}, "device kernels", 0)  # memcpy: no op
    host_only = _XSPACE.format(xla_ops="").split("planes {\n  name: \"/host:CPU\"")[1]
    assert read('planes {\n  name: "/host:CPU"' + host_only) == (
        {"launch.1": (pytest.approx(9e-6), 1)}, "host thunks", 0)


_HOST_XSPACE = """
planes {
  name: "/host:CPU"
  lines { name: "tf_XLAEigen/1" timestamp_ns: 0
    events { metadata_id: 1 offset_ps: 0 duration_ps: 1000000 stats { metadata_id: 9 str_value: "dot.1" } }
    events { metadata_id: 2 offset_ps: 500000 duration_ps: 1000 stats { metadata_id: 7 int64_value: 42 } }
    events { metadata_id: 1 offset_ps: 1000000 duration_ps: 2000000 stats { metadata_id: 9 str_value: "fusion.2" } }
    events { metadata_id: 1 offset_ps: 6000000 duration_ps: 1000000 stats { metadata_id: 9 str_value: "copy.3" } }
  }
  lines { name: "tf_XLAEigen/2" timestamp_ns: 0
    events { metadata_id: 3 offset_ps: 1000000 duration_ps: 1000 stats { metadata_id: 8 int64_value: 42 } }
    events { metadata_id: 4 offset_ps: 5000000 duration_ps: 1000 }
  }
  event_metadata { key: 1 value { id: 1 name: "ThunkExecutor::Execute" } }
  event_metadata { key: 2 value { id: 2 name: "ThreadpoolListener::Record" } }
  event_metadata { key: 3 value { id: 3 name: "ThreadpoolListener::StartRegion" } }
  event_metadata { key: 4 value { id: 4 name: "ThreadpoolListener::StopRegion" } }
  stat_metadata { key: 7 value { id: 7 name: "_p" } }
  stat_metadata { key: 8 value { id: 8 name: "_c" } }
  stat_metadata { key: 9 value { id: 9 name: "hlo_op" } }
}
"""


def test_profiling_credits_thread_pool_tasks_to_their_op():
    """On the CPU an op's work on XLA's thread pool (an Eigen dot, say) runs outside its own
    event, which covers the launch only: each pool task counts for the op that scheduled it, and
    each moment of the step goes in equal shares to what runs then, so the times add up."""
    from cnn_jax import profiling

    ops = profiling.read_ops(jax.profiler.ProfileData.from_text_proto(_HOST_XSPACE))
    # dot.1 ran 0-1 us and scheduled task 42, which ran 1-5 us on the other thread beside
    # fusion.2 (1-3 us); nothing ran 5-6 us; copy.3 ran 6-7 us.
    assert ops == ({"dot.1": (pytest.approx(4e-6), 1), "fusion.2": (pytest.approx(1e-6), 1),
                    "copy.3": (pytest.approx(1e-6), 1)}, "host thunks", pytest.approx(1e-6))
    assert sum(s for s, _ in ops.times.values()) + ops.idle_s == pytest.approx(7e-6)
    summary = profiling.summarize(ops.times, 1, source=ops.source, idle_s=ops.idle_s)
    assert summary["op_ms_per_step"] == pytest.approx(6e-3)
    assert summary["idle_ms_per_step"] == pytest.approx(1e-3)
    table = profiling.markdown(summary)
    assert "thread-pool tasks counted for their op; 0.00 ms/step with none" in table
    # Two ops at once on two threads: each gets half of the time they share.
    shares, idle = profiling._shares([("a", 0, 10), ("b", 5, 15), ("c", 20, 30)])
    assert (dict(shares), idle) == ({"a": 7.5, "b": 7.5, "c": 10.0}, 5)


def test_profiling_exclusive_times_and_kinds():
    from cnn_jax import profiling

    # An op inside another on the same line (a while loop's body) is taken out of its parent.
    pieces = profiling._segments([[("while.1", 0, 100), ("fusion.2", 10, 40),
                                   ("fusion.2", 50, 60), ("copy.3", 100, 130)]])
    assert pieces == [("while.1", 0, 10), ("fusion.2", 10, 40), ("while.1", 40, 50),
                      ("fusion.2", 50, 60), ("while.1", 60, 100), ("copy.3", 100, 130)]
    shares, idle = profiling._shares(pieces)
    assert (dict(shares), idle) == ({"while.1": 60, "fusion.2": 40, "copy.3": 30}, 0)
    assert [profiling.kind(n) for n in ("convolution.21", "loop_add_fusion", "copy.1.2")] == [
        "convolution", "loop_add_fusion", "copy"]
    summary = profiling.summarize({"convolution.1": (0.3, 2), "convolution.2": (0.1, 2),
                                   "fusion.7": (0.1, 2)}, steps=2)
    assert summary["op_ms_per_step"] == pytest.approx(250) and summary["idle_ms_per_step"] is None
    assert "ops running at once on two threads both count" in profiling.markdown(summary)
    assert [(k["kind"], round(k["share"], 2), k["calls_per_step"]) for k in summary["kinds"]] == [
        ("convolution", 0.8, 2), ("fusion", 0.2, 1)]
    assert summary["top_ops"][0] == {"op": "convolution.1", "kind": "convolution",
                                     "ms_per_step": pytest.approx(150), "calls_per_step": 1,
                                     "share": pytest.approx(0.6)}


def test_gpu_check_script_records_the_environment_and_skips_parts_given_0_s(tmp_path):
    """scripts/gpu_check.sh (the device call) parses, writes env.txt, and runs neither the suite
    nor the degradation experiment when their seconds are 0 (both run in the tests above and in
    tests/test_experiments.py)."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(h.REPO, "scripts", "gpu_check.sh"), str(out),
                           "0", "0"], env=h.python_env(PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = (out / "env.txt").read_text()
    assert f"jax {jax.__version__}" in env and "CpuDevice" in env
    assert sorted(p.name for p in out.iterdir()) == ["env.txt"]
    assert "suite: exit" not in proc.stdout and "degradation: exit" not in proc.stdout


def test_gpu_suite_keeps_to_its_time_budget(tmp_path):
    """Rows start only while time is left; a row's process gets at most the time left."""
    now = [0.0]
    timeouts = []

    def launch(spec, timeout_s):
        timeouts.append(timeout_s)
        now[0] += 100.0
        return {**spec, "error": "boom"}

    result = benchmark_gpu.run_suite(str(tmp_path), ["resnet50", "vgg16"], time_budget_s=260,
                                     row_timeout_s=180, progress=lambda line: None,
                                     launch=launch, clock=lambda: now[0])
    rows = result["rows"]
    assert [(r["arch"], r["dtype"]) for r in rows] == [
        ("resnet50", "bfloat16"), ("vgg16", "bfloat16"), ("resnet50", "float32"),
        ("vgg16", "float32")]
    assert timeouts == [180, 145, 45]  # 260 - 15 reserved - elapsed, capped at row_timeout_s
    assert [r.get("error") for r in rows[:3]] == ["boom"] * 3
    assert "time budget" in rows[3]["skipped"] and rows[1]["per_device_batch"] == 128
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| vgg16 | float32 | 128 | time budget (260 s) spent |" in table
    with pytest.raises(ValueError, match="leaves no time"):
        benchmark_gpu.run_suite(str(tmp_path), time_budget_s=10)


def test_gpu_suite_row_process_failure_is_a_row_error():
    row = benchmark_gpu.launch_row({"arch": "resnet50"}, timeout_s=60)  # a spec missing fields
    assert row["arch"] == "resnet50" and row["error"] == "KeyError: 'per_device_batch'"


def test_gpu_suite_table_of_a_gpu_row(tmp_path, monkeypatch):
    """What a GPU row (allocator peaks, XLA FLOPs) looks like in the table, without a GPU."""
    monkeypatch.setattr(benchmark_gpu, "forward_flops", lambda arch, size, *a: 8e9)
    kind = {"compile_s": 20.0, "steps": 20, "step_ms": 50.0, "images_per_sec_per_device": 5120.0,
            "images_per_sec": 5120.0, "xla_flops_per_device_step": 6e12,
            "tflops_per_device": 120.0, "peak_mib": 30 * 1024.0, "xla_estimate_mib": 1.0,
            "peak_source": "device memory_stats"}

    def launch(spec, timeout_s):
        return {**spec, "devices": 1, "global_batch": 256, "platform": "gpu",
                "device_kind": "NVIDIA H200", "jax": "0.11.0", "forward_flops_per_image": 4e9,
                "train": dict(kind), "eval": dict(kind, compile_s=5.0)}

    result = benchmark_gpu.run_suite(str(tmp_path), ["resnet50"], ["bfloat16"],
                                     progress=lambda line: None, launch=launch)
    (row,) = result["rows"]
    assert row["flop_share_images_per_sec"] == 14000  # half resnet50's FLOPs: twice the images
    assert row["train_vs_share"] == pytest.approx(5120 / 14000)
    lines = (tmp_path / "gpu_suite.md").read_text().splitlines()
    assert lines[0].startswith("1 x NVIDIA H200 (gpu, jax 0.11.0)")
    assert lines[-1] == ("| resnet50 | bfloat16 | 256 | 5,120 | 5,120 | 20.0 s | 5.0 s | 30.0 GiB"
                         " | 30.0 GiB | 4.00 | 61.4 | 14,000 | 0.37 |")  # 3 x 4 GFLOP x 5,120
