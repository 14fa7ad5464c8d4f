"""Time the compiled train and eval steps of a model on device-resident fake data.

``python -m cnn_jax.benchmark --arch=resnet50 --batch_size=64 [--dtype=bfloat16]`` reports, per
step kind, compile time, images/second (and the process's CPU time per step) and peak memory: the
device's ``memory_stats()`` where the backend has them (GPU), otherwise XLA's ``memory_analysis()``
of the compiled step (arguments + outputs + temporaries - donated aliases).

``--compare=torch``: against torchvision's same network in PyTorch on the same CPU, alternating
(:mod:`cnn_jax.benchmark_torch`); with ``--layers``, each of its convolutions alone
(:mod:`cnn_jax.benchmark_layers`). ``--ab=xla,auto``: the same network under several layer
implementations (and torch) in one process, rounds in rotated order
(:mod:`cnn_jax.benchmark_ab`). ``--suite=gpu``: fp32 and bf16 of every family over all local
accelerators within a time budget (:mod:`cnn_jax.benchmark_gpu`). Neither this module nor those
import TensorFlow or ml_collections (a GPU machine may have neither).
"""

import functools
import json
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional

from absl import app, flags

from cnn_jax import cli

cli.quiet_tensorflow_env("1")  # before anything imports TensorFlow

FLAGS = flags.FLAGS
flags.DEFINE_string("arch", None, "Registered architecture, e.g. resnet50 (--compare, --suite: "
                    "a comma-separated list picks rows; default: all rows).")
flags.DEFINE_integer("batch_size", 32, "Images per step (on one device; --compare and --suite: "
                     "overrides every row's batch, per device for --suite).")
flags.DEFINE_integer("image_size", 224, "Square input resolution (--compare: overrides the rows').")
flags.DEFINE_integer("num_classes", 1000, "Classifier outputs (--compare: overrides the rows').")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay fp32; "
                  "--compare and --suite run both unless given).")
flags.DEFINE_integer("steps", 10, "Timed steps after the warm-up (--compare: default 5; --suite: "
                     "at most this many, default 20, within --kind_budget_s).")
flags.DEFINE_bool("eval", True, "Also time the eval step.")
flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
flags.DEFINE_enum("compare", None, ["torch"], "Compare with torchvision's same network in "
                  "PyTorch on the same CPU, alternating steps; default rows: issue 10's six, "
                  "float32 and bfloat16.")
flags.DEFINE_string("ab", None, "A/B of layer implementations in one process: two or more "
                    "of auto, xla, fast, torch (e.g. xla,auto), each --arch's train and eval "
                    "steps built after clearing JAX's caches and timed in rounds of rotated "
                    "order; ratios against the first arm.")
flags.DEFINE_enum("suite", None, ["gpu"], "One-shot accelerator check: every family, fp32 and "
                  "bf16, pmap over all local devices; writes JSON and markdown to --output.")
flags.DEFINE_bool("layers", False, "--compare=torch: each convolution of the networks alone "
                  "against torch's Conv2d (forward and with gradients; float32 unless --dtype), "
                  "not whole steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (--compare, --suite).")
flags.DEFINE_string("output", None, "Directory for the results (--suite: default "
                    "benchmark_results; --compare: optional).")
flags.DEFINE_integer("torch_threads", 0, "--compare: torch's intra-op threads (0: its "
                     "default).")
flags.DEFINE_float("time_budget_s", 450.0, "--suite: the whole suite's wall-time limit.")
flags.DEFINE_integer("profile", 0, "Trace this many train steps after the timed ones and print "
                     "where they spend their time: XLA op kinds and ops (cnn_jax.profiling); "
                     "with --compare=torch, each row's torch step too (torch.profiler).")
flags.DEFINE_integer("profile_steps", 0, "--suite: trace this many train steps of each row after "
                     "its timing; the op kinds go into the JSON and the table.")
flags.DEFINE_float("kind_budget_s", 4.0, "--suite: timed seconds per train or eval step kind.")
# Model options: --model.FIELD=VALUE (e.g. --model.aux_logits=false --model.widths=8,16,32), the
# spelling of the training command's --config.model.FIELD; cli.split_model_options takes them
# out of the command line before absl parses the rest.
MODEL_OPTIONS: Dict[str, str] = {}


def model_dtype(name: str) -> Any:
    """The compute dtype of a ``--dtype`` name (train_lib's would import TensorFlow)."""
    import jax.numpy as jnp

    from cnn_jax import benchmark_gpu

    if name not in benchmark_gpu.DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(benchmark_gpu.DTYPES)}")
    return jnp.dtype(name)


def _mib(n) -> float:
    return float(n) / 2**20


def memory_report(compiled, device) -> dict:
    """Peak memory: the device's allocator statistics if any, else XLA's compile-time estimate."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_mib": _mib(stats["peak_bytes_in_use"]), "source": "device memory_stats"}
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {"peak_mib": float("nan"), "source": "unavailable"}
    args = analysis.argument_size_in_bytes
    out = analysis.output_size_in_bytes
    temp = analysis.temp_size_in_bytes
    alias = analysis.alias_size_in_bytes
    return {"peak_mib": _mib(args + out + temp - alias), "arguments_mib": _mib(args),
            "outputs_mib": _mib(out), "temp_mib": _mib(temp), "aliased_mib": _mib(alias),
            "source": "compiled.memory_analysis()"}


def time_compiled(fn, args, steps: int, carry_state: bool):
    """(compile s, wall s per step, process CPU s per step, compiled, args) of a jitted ``fn``.

    CPU seconds (all threads) are the load-independent number on a shared host machine.
    """
    from cnn_jax.profiling import run_steps

    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    args = run_steps(compiled, args, 1, carry_state)  # warm-up (first run allocates)
    t0, c0 = time.perf_counter(), time.process_time()
    args = run_steps(compiled, args, steps, carry_state)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return compile_s, seconds / steps, cpu_seconds / steps, compiled, args


def run(arch: str, batch_size: int, image_size: int = 224, num_classes: int = 1000,
        dtype: str = "float32", steps: int = 10, eval_step: bool = True,
        model: Optional[Mapping[str, Any]] = None, profile: int = 0) -> dict:
    """Benchmark one model on the first device; returns a dict of the numbers. ``model``: the
    model options (checked against the architecture's fields); ``profile``: trace that many
    more train steps into ``result["train"]["profile"]`` (:func:`cnn_jax.profiling.summarize`)."""
    import jax

    from cnn_jax import train_step as step_lib
    from cnn_jax.benchmark_gpu import host_train_state
    from cnn_jax.models import check_model_options, count_params, create_model

    device = jax.devices()[0]
    options = check_model_options(arch, dict(model or {}), flag_prefix="--model.")
    model = create_model(arch, num_classes=num_classes, dtype=model_dtype(dtype), **options)
    image_shape = (image_size, image_size, 3)
    state = host_train_state(model, image_shape)  # SGD momentum, initialized on the CPU
    key_x, key_y = jax.random.split(jax.random.PRNGKey(1))
    batch = {"image": jax.random.normal(key_x, (batch_size,) + image_shape, model_dtype(dtype)),
             "label": jax.random.randint(key_y, (batch_size,), 0, num_classes)}
    state, batch = jax.device_put((state, batch), device)
    result = {"arch": arch, "device": device.device_kind, "platform": device.platform,
              "batch_size": batch_size, "image_size": image_size, "dtype": dtype,
              "params": count_params(state.params)}

    train = jax.jit(functools.partial(step_lib.train_step, label_smoothing=0.0),
                    donate_argnums=(0,))
    compile_s, step_s, cpu_s, compiled, (state, _) = time_compiled(train, (state, batch), steps,
                                                                   True)
    result["train"] = {"compile_s": compile_s, "step_ms": 1e3 * step_s, "cpu_ms": 1e3 * cpu_s,
                       "images_per_sec": batch_size / step_s, **memory_report(compiled, device)}
    if profile:
        from cnn_jax import profiling

        result["train"]["profile"], (state, _) = profiling.profile_steps(
            compiled, (state, batch), profile, carry=True)
    if eval_step:
        ev = jax.jit(step_lib.eval_step)
        compile_s, step_s, cpu_s, compiled, _ = time_compiled(ev, (state, batch), steps, False)
        result["eval"] = {"compile_s": compile_s, "step_ms": 1e3 * step_s, "cpu_ms": 1e3 * cpu_s,
                          "images_per_sec": batch_size / step_s,
                          **memory_report(compiled, device)}
    return result


def format_result(r: dict) -> str:
    lines = [f"{r['arch']} ({r['params'] / 1e6:.2f}M params) on {r['platform']} "
             f"({r['device']}), batch {r['batch_size']} x {r['image_size']}px {r['dtype']}:"]
    for kind in ("train", "eval"):
        if kind in r:
            k = r[kind]
            lines.append(f"  {kind:5s} compile {k['compile_s']:6.1f} s | {k['step_ms']:9.1f} ms/step"
                         f" ({k['cpu_ms']:.0f} CPU-ms) | {k['images_per_sec']:9.1f} img/s"
                         f" | peak {k['peak_mib']:8.1f} MiB ({k['source']})")
    return "\n".join(lines)


def _given(name: str):
    """A flag's value if given on the command line, else None (the rows' own value)."""
    return FLAGS[name].value if FLAGS[name].present else None


def _archs() -> List[str]:
    """The --arch list, each a registered name."""
    from cnn_jax.models import list_models

    archs = [a.strip() for a in (FLAGS.arch or "").split(",") if a.strip()]
    unknown = [a for a in archs if a not in list_models()]
    if unknown:
        raise ValueError(f"unknown architecture {unknown[0]!r}; valid names: "
                         f"{', '.join(list_models())}")
    return archs


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _emit(name: str, result: dict, table: str) -> None:
    """The table (or with --json the result) on stdout, and both as ``--output/name.{md,json}``."""
    if FLAGS.output:
        os.makedirs(FLAGS.output, exist_ok=True)
        with open(os.path.join(FLAGS.output, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(FLAGS.output, f"{name}.md"), "w") as f:
            f.write(table + "\n")
    print(json.dumps(result) if FLAGS.json else table, flush=True)


def main_compare() -> None:
    """``--compare=torch``: the rows the flags pick, table (or JSON) on stdout."""
    from cnn_jax import benchmark_torch

    if MODEL_OPTIONS:
        raise ValueError("--model.* options change the network; --compare=torch times the "
                         "stock networks that torchvision also builds")
    # --layers: float32 alone unless --dtype says (each network's layers take minutes)
    dtypes = ([FLAGS.dtype] if FLAGS["dtype"].present or FLAGS.layers
              else benchmark_torch.DTYPES)
    rows = benchmark_torch.select_rows(
        _archs(), _given("batch_size"), _given("image_size"), _given("num_classes"), dtypes)
    steps = FLAGS.steps if FLAGS["steps"].present else 5
    if FLAGS.layers:
        if FLAGS.profile:
            raise ValueError("--profile traces whole train steps; --layers times single "
                             "convolutions: pass one of them")
        return _compare_layers(rows, steps)
    result = benchmark_torch.run_compare(rows, steps, FLAGS.warmup, FLAGS.torch_threads,
                                         progress=_progress, profile=FLAGS.profile)
    _emit("compare_torch", result, benchmark_torch.markdown(result))


def _compare_layers(rows, steps: int) -> None:
    """``--compare=torch --layers``: one table per network, on stdout."""
    from cnn_jax import benchmark_layers

    results = [benchmark_layers.compare(
        row.arch, row.batch_size, row.image_size, row.num_classes, steps, FLAGS.warmup,
        progress=_progress, dtype=dtype) for row, dtype in rows]
    _emit("compare_layers", {"networks": results},
          "\n\n".join(benchmark_layers.markdown(r) for r in results))


def main_ab() -> None:
    """``--ab=ARMS``: each --arch under every arm, one table (or JSON) on stdout."""
    from cnn_jax import benchmark_ab

    arms = benchmark_ab.parse_arms(FLAGS.ab)
    archs = _archs()
    if not archs:
        raise ValueError("--ab needs --arch=<name>[,<name>...], e.g. --arch=resnet50")
    results = []
    for arch in archs:
        r = benchmark_ab.run_ab(arch, arms, FLAGS.batch_size, FLAGS.image_size,
                                FLAGS.num_classes, FLAGS.dtype,
                                FLAGS.steps if FLAGS["steps"].present else 7, FLAGS.warmup,
                                MODEL_OPTIONS, progress=_progress)
        results.append(r)
        _progress(f"{arch}: " + ", ".join(f"{a} {r['train'][a]['ms']:.1f} ms"
                                          for a in arms) + " per train step")
    _emit("ab", {"results": results}, benchmark_ab.markdown(results))


def main_suite() -> None:
    """``--suite=gpu``: every row in its own process; JSON and table in --output."""
    from cnn_jax import benchmark_gpu

    from cnn_jax.models import check_model_options

    archs = _archs() or list(benchmark_gpu.FAMILY_BATCH)
    for arch in archs:  # bad options fail here in one line, not in every row's process
        check_model_options(arch, MODEL_OPTIONS, flag_prefix="--model.")
    output = FLAGS.output or "benchmark_results"
    result = benchmark_gpu.run_suite(
        output, archs, [FLAGS.dtype] if FLAGS["dtype"].present else benchmark_gpu.DTYPES,
        _given("batch_size"), FLAGS.image_size, FLAGS.num_classes, MODEL_OPTIONS,
        FLAGS.steps if FLAGS["steps"].present else 20, FLAGS.warmup, FLAGS.kind_budget_s,
        FLAGS.time_budget_s, profile_steps=FLAGS.profile_steps,
        compilation_cache_dir=(FLAGS.compilation_cache_dir if FLAGS.compilation_cache
                               else None),
        progress=_progress)
    print(json.dumps(result) if FLAGS.json else benchmark_gpu.markdown(result), flush=True)
    print(f"wrote {os.path.join(output, 'gpu_suite.json')} and gpu_suite.md", file=sys.stderr)


def main(argv):
    cli.setup(argv)
    with cli.one_line_errors():
        if sum(map(bool, (FLAGS.compare, FLAGS.suite, FLAGS.ab))) > 1:
            raise ValueError("pass one of --compare=torch, --suite=gpu and --ab=ARMS")
        if FLAGS.profile < 0:
            raise ValueError(f"--profile takes a number of steps (0: none), got {FLAGS.profile}")
        if FLAGS.ab:
            return main_ab()
        if FLAGS.compare:
            return main_compare()
        if FLAGS.suite:
            return main_suite()
        if not FLAGS.arch:
            raise ValueError("pass --arch=<name>, e.g. --arch=resnet50")
        r = run(FLAGS.arch, FLAGS.batch_size, FLAGS.image_size, FLAGS.num_classes, FLAGS.dtype,
                FLAGS.steps, FLAGS.eval, MODEL_OPTIONS, FLAGS.profile)
    if FLAGS.json:
        print(json.dumps(r), flush=True)
        return
    print(format_result(r), flush=True)
    if "profile" in r["train"]:
        from cnn_jax import profiling

        print("\n" + profiling.markdown(r["train"]["profile"], "train step"), flush=True)


def parse_flags(argv: List[str]) -> List[str]:
    """absl's parse of ``argv`` less the ``--model.FIELD=VALUE`` options (into MODEL_OPTIONS)."""
    argv, options = cli.split_model_options(argv)
    MODEL_OPTIONS.update(options)
    return cli.parse_flags(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
