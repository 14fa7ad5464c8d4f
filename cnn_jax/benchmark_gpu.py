"""One-shot accelerator check (``--suite=gpu``): fp32 and bf16 train/eval img/s of every family.

    PYTHONPATH=. python -m cnn_jax.benchmark --suite=gpu --output=DIR

Each family (alexnet, vgg16, googlenet, resnet50, densenet121) runs at a per-device batch that
keeps a large GPU busy (``FAMILY_BATCH``; ``--batch_size`` overrides), ``jax.pmap`` over all local
devices (:mod:`cnn_jax.parallel`, today's ``train_step``/``eval_step``: SGD momentum, per-device BN)
on device-resident random data. Per row: compile times, img/s (per device and in total), XLA's
FLOPs of the train step (in the JSON only: on GPU they leave out cuDNN's convolutions; the
table's TFLOP/s are 3 x the forward FLOPs per image), peak memory from the devices'
``memory_stats()`` (XLA's compile-time estimate where a backend has none, e.g. CPU), with
``--profile_steps`` the train step's time by XLA op kind (:mod:`cnn_jax.profiling`), and the
row's "FLOP-proportional share" of the ResNet-50 target: ``7000 * resnet50_flops /
family_flops`` img/s per device (forward FLOPs = 2 x MACs per image from :mod:`cnn_jax.analysis`;
issue 10's goal is bf16 training within 2x of it, ResNet-50 itself at >= 7,000 img/s on one
H200).

Every row runs in its own process, so that each device peak belongs to its row and a crash or
a hung compile costs one row; the whole suite keeps to ``--time_budget_s`` (rows that no longer
fit are recorded as skipped). Nothing here imports TensorFlow, TFDS, ml_collections or clu: the
GPU machine has none of them. Results: ``DIR/gpu_suite.json`` and ``DIR/gpu_suite.md``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

# The families in the order they run (the headline ResNet-50 first, then by compile time, so
# that a spent budget costs the fewest rows) and their per-device batch.
FAMILY_BATCH = {"resnet50": 256, "alexnet": 512, "vgg16": 128, "googlenet": 256,
                "densenet121": 256}
DTYPES = ("bfloat16", "float32")
TARGET_ARCH, TARGET_IMAGES_PER_SEC, TARGET_IMAGE_SIZE = "resnet50", 7000.0, 224
FORBIDDEN = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu")
# What a row's process needs beyond its own run time (imports, the FLOP count) and what the
# parent keeps for itself (reference FLOPs, writing the results).
ROW_MIN_S, RESERVE_S = 30.0, 15.0


def forbidden_modules() -> List[str]:
    """Modules of the packages the GPU machine lacks that this process has imported."""
    return sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)


def forward_flops(arch: str, image_size: int, num_classes: int = 1000,
                  model: Optional[Dict[str, Any]] = None) -> float:
    """2 x MACs of one image's forward pass (the papers' convention), traced, not compiled."""
    from cnn_jax import analysis
    from cnn_jax.models import create_model

    model = create_model(arch, num_classes=num_classes, **(model or {}))
    return 2.0 * analysis.analyze(model, (1, image_size, image_size, 3)).totals.macs


def host_train_state(model, image_shape, seed: int = 0):
    """``create_train_state`` (SGD momentum) computed on the CPU, with the model's float32 clone.

    An accelerator compiles the jitted init into thousands of small random-number kernels (its
    convolutions are dead code): on one H200, 15 s of resnet50's row and 38 s of densenet121's
    went there (2026-12-04, ``init_s``). XLA:CPU compiles it in 6-13 s on two cores here. The
    parameters are float32 whatever the compute dtype, so both dtypes' rows trace one program,
    which the persistent compilation cache then keeps for the second. ``apply_fn`` is the
    model's own."""
    import jax
    import jax.numpy as jnp
    import optax

    from cnn_jax import train_step as step_lib

    float32 = model.clone(dtype=jnp.float32) if hasattr(model, "dtype") else model
    with jax.default_device(jax.devices("cpu")[0]):
        state = step_lib.create_train_state(float32, optax.sgd(0.01, momentum=0.9),
                                            jax.random.PRNGKey(seed), image_shape, jnp.float32)
        state = jax.device_get(state)
    return state.replace(apply_fn=model.apply)


def _device_memory_mib(devices, key: str = "peak_bytes_in_use") -> Optional[float]:
    """The largest ``memory_stats()[key]`` over ``devices`` in MiB (None: no allocator stats)."""
    values = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and key in stats:
            values.append(stats[key] / 2**20)
    return max(values) if values else None


def _xla_estimate_mib(compiled) -> Optional[float]:
    """XLA's compile-time memory of one step: arguments + outputs + temporaries - aliases."""
    try:
        a = compiled.memory_analysis()
    except Exception:  # best-effort, like cost analysis: a one-shot run must not die of it
        return None
    if a is None:
        return None
    return (a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes
            - a.alias_size_in_bytes) / 2**20


def _xla_flops(compiled) -> Optional[float]:
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost["flops"]) if cost and cost.get("flops", 0) > 0 else None
    except Exception:  # cost analysis is best-effort; some backends do not implement it
        return None


def _timed(step, args, carry: bool, warmup: int, max_steps: int, budget_s: float) -> Dict:
    """Warm-up, one synchronised step to size the run, then ``n`` back-to-back steps timed with
    one sync at the end (asynchronous dispatch keeps the device busy, as in training)."""
    from cnn_jax.profiling import run_steps

    args = run_steps(step, args, max(warmup, 1), carry)
    t0 = time.perf_counter()
    args = run_steps(step, args, 1, carry)
    one = time.perf_counter() - t0
    n = int(min(max_steps, max(2, budget_s / max(one, 1e-6))))
    t0 = time.perf_counter()
    args = run_steps(step, args, n, carry)
    seconds = time.perf_counter() - t0
    return {"steps": n, "step_ms": 1e3 * seconds / n, "args": args}


def run_row(arch: str, per_device_batch: int, image_size: int = 224, num_classes: int = 1000,
            dtype: str = "bfloat16", model: Optional[Dict[str, Any]] = None, warmup: int = 2,
            max_steps: int = 20, kind_budget_s: float = 4.0, profile_steps: int = 0
            ) -> Dict[str, Any]:
    """One row in this process: eval first, then train (the device peak only grows). ``model``:
    the model options (``--model.FIELD=VALUE``), checked against the architecture's fields;
    ``profile_steps``: trace that many train steps after the timed ones
    (:mod:`cnn_jax.profiling`) into ``result["train"]["profile"]``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cnn_jax import parallel, train_step as step_lib
    from cnn_jax.models import check_model_options, count_params, create_model

    options = check_model_options(arch, dict(model or {}), flag_prefix="--model.")

    compute = jnp.dtype(dtype)  # a name from DTYPES
    # As the train loop runs it: pmap (shard_map where a jax lacks pmap) over several devices,
    # jit without the device axis on one (parallel.DataParallel.single).
    dp = parallel.DataParallel("pmap" if hasattr(jax, "pmap") else "shard_map")
    n_dev = dp.num_local_devices
    model = create_model(arch, num_classes=num_classes, dtype=compute, **options)
    image_shape = (image_size, image_size, 3)
    t0 = time.perf_counter()
    state = host_train_state(model, image_shape)
    params = count_params(state.params)
    state = dp.replicate(jax.tree_util.tree_map(np.asarray, state))

    def make_batch(key):
        key_x, key_y = jax.random.split(key)
        return {"image": jax.random.normal(key_x, (per_device_batch,) + image_shape, compute),
                "label": jax.random.randint(key_y, (per_device_batch,), 0, num_classes)}

    keys = dp.shard(np.asarray(jax.random.split(jax.random.PRNGKey(1), n_dev)))
    batch = jax.block_until_ready(dp.map(make_batch)(keys))  # generated on the devices
    init_s = time.perf_counter() - t0
    device = dp.local_devices[0]
    result: Dict[str, Any] = {
        "arch": arch, "dtype": dtype, "image_size": image_size, "num_classes": num_classes,
        "per_device_batch": per_device_batch, "devices": n_dev, "global_batch": n_dev *
        per_device_batch, "platform": device.platform, "device_kind": device.device_kind,
        "jax": jax.__version__, "parallel": "jit (one device)" if dp.single else dp.mode,
        "params": params, "init_s": init_s,
        "device_memory_limit_mib": _device_memory_mib(dp.local_devices, "bytes_limit")}

    steps = {
        "eval": (dp.map(functools.partial(step_lib.eval_step, axis_name=dp.axis_name)), False),
        "train": (dp.map(functools.partial(step_lib.train_step, axis_name=dp.axis_name,
                                           label_smoothing=0.0), donate_argnums=(0,)), True),
    }
    for kind, (fn, carry) in steps.items():
        t0 = time.perf_counter()
        compiled = fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        timed = _timed(compiled, (state, batch), carry, warmup, max_steps, kind_budget_s)
        state = timed.pop("args")[0]
        if kind == "train" and profile_steps:
            from cnn_jax import profiling

            timed["profile"], (state, _) = profiling.profile_steps(
                compiled, (state, batch), profile_steps, carry=True)
        per_device = per_device_batch / (timed["step_ms"] / 1e3)
        flops = _xla_flops(compiled)
        result[kind] = {"compile_s": compile_s, **timed,
                        "images_per_sec_per_device": per_device,
                        "images_per_sec": per_device * n_dev,
                        "xla_flops_per_device_step": flops,
                        "tflops_per_device": (flops / timed["step_ms"] * 1e3 / 1e12
                                              if flops else None),
                        "peak_mib": _device_memory_mib(dp.local_devices),
                        "xla_estimate_mib": _xla_estimate_mib(compiled)}
        result[kind]["peak_source"] = ("device memory_stats" if result[kind]["peak_mib"]
                                       is not None else "none (see xla_estimate_mib)")
    result["forward_flops_per_image"] = forward_flops(arch, image_size, num_classes, options)
    result["forbidden_modules"] = forbidden_modules()
    return result


def rows_for(archs: Sequence[str] = (), dtypes: Sequence[str] = DTYPES,
             batch_size: Optional[int] = None) -> List[tuple]:
    """``(arch, dtype, per-device batch)`` in run order: every bf16 row (the goal's) first."""
    archs = list(archs) or list(FAMILY_BATCH)
    return [(a, d, batch_size or FAMILY_BATCH.get(a, 128)) for d in dtypes for a in archs]


def _child_env() -> Dict[str, str]:
    """This environment, with this source tree first on the path (the suite runs from it)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def launch_row(spec: Dict[str, Any], timeout_s: float) -> Dict[str, Any]:
    """Run one row in a fresh Python process; its JSON, or the spec with an ``error``."""
    try:
        proc = subprocess.run([sys.executable, "-m", "cnn_jax.benchmark_gpu", json.dumps(spec)],
                              env=_child_env(), capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {**spec, "error": _last_line(proc.stderr) or f"exit {proc.returncode}"}
    return json.loads(_last_line(proc.stdout))


def run_suite(output: str, archs: Sequence[str] = (), dtypes: Sequence[str] = DTYPES,
              batch_size: Optional[int] = None, image_size: int = 224, num_classes: int = 1000,
              model: Optional[Dict[str, Any]] = None, max_steps: int = 20, warmup: int = 2,
              kind_budget_s: float = 4.0, time_budget_s: float = 450.0, profile_steps: int = 0,
              row_timeout_s: float = 180.0, compilation_cache_dir: Optional[str] = None,
              progress: Callable[[str], None] = print,
              launch: Callable[[Dict[str, Any], float], Dict[str, Any]] = launch_row,
              clock: Callable[[], float] = time.perf_counter) -> Dict[str, Any]:
    """Every row in its own process within ``time_budget_s``; writes the JSON and the table.

    A row starts only while ``ROW_MIN_S`` are left after ``RESERVE_S`` for the end, and is
    killed when it would overrun; rows that do not fit are recorded as skipped.
    """
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if time_budget_s < RESERVE_S + ROW_MIN_S:
        raise ValueError(f"--time_budget_s={time_budget_s:g} leaves no time for a row; "
                         f"give at least {RESERVE_S + ROW_MIN_S:g}")
    os.makedirs(output, exist_ok=True)
    start = clock()
    rows = []
    for arch, dtype, batch in rows_for(archs, dtypes, batch_size):
        spec = {"arch": arch, "dtype": dtype, "per_device_batch": batch,
                "image_size": image_size, "num_classes": num_classes,
                "model": dict(model or {}), "max_steps": max_steps, "warmup": warmup,
                "kind_budget_s": kind_budget_s, "profile_steps": profile_steps,
                "compilation_cache_dir": compilation_cache_dir}
        left = time_budget_s - RESERVE_S - (clock() - start)
        if left < ROW_MIN_S:
            row = {**spec, "skipped": f"time budget ({time_budget_s:g} s) spent"}
        else:
            t0 = clock()
            row = launch(spec, min(left, row_timeout_s))
            row["wall_s"] = clock() - t0
        rows.append(row)
        progress(_progress_line(row))

    reference = None
    if any("forward_flops_per_image" in row for row in rows):
        import jax

        try:  # the parent only traces: leave the accelerators to the rows' processes
            jax.config.update("jax_platforms", "cpu")
        except Exception:  # a backend already initialised in this process keeps its platform
            pass
        reference = forward_flops(TARGET_ARCH, TARGET_IMAGE_SIZE)
    for row in rows:
        if "forward_flops_per_image" in row:
            share = TARGET_IMAGES_PER_SEC * reference / row["forward_flops_per_image"]
            row["flop_share_images_per_sec"] = share
            row["train_vs_share"] = row["train"]["images_per_sec_per_device"] / share
    result = {"target": {"arch": TARGET_ARCH, "image_size": TARGET_IMAGE_SIZE,
                         "images_per_sec_per_device": TARGET_IMAGES_PER_SEC,
                         "forward_flops_per_image": reference},
              "time_budget_s": time_budget_s, "wall_s": clock() - start,
              "forbidden_modules": forbidden_modules(), "rows": rows}
    with open(os.path.join(output, "gpu_suite.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(output, "gpu_suite.md"), "w") as f:
        f.write(markdown(result) + "\n")
    return result


def _progress_line(row: Dict[str, Any]) -> str:
    head = f"{row['arch']} {row['dtype']} b{row['per_device_batch']}/device"
    if "train" not in row:
        return f"{head}: {row.get('error') or row.get('skipped')}"
    train, ev = row["train"], row["eval"]
    return (f"{head} x {row['devices']} {row['device_kind']}: train "
            f"{train['images_per_sec_per_device']:.0f} img/s/device (compile "
            f"{train['compile_s']:.0f} s), eval {ev['images_per_sec_per_device']:.0f} "
            f"img/s/device ({row['wall_s']:.0f} s)")


def _num(x, fmt="{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(result: Dict[str, Any]) -> str:
    """The README table: per-device img/s, compile times, peak memory and the FLOP share."""
    rows = result["rows"]
    done = [r for r in rows if "train" in r]
    where = (f"{done[0]['devices']} x {done[0]['device_kind']} ({done[0]['platform']}, jax "
             f"{done[0]['jax']})" if done else "no row finished")
    t = result["target"]
    lines = [f"{where}; pmap over all local devices, per-device batch, device-resident random "
             f"data; img/s per device. share = {t['images_per_sec_per_device']:,.0f} x "
             f"{t['arch']}'s forward FLOPs / the row's (img/s per device a FLOP-proportional "
             f"{t['arch']} target would give; the goal is bf16 train / share >= 0.5, "
             f"{t['arch']} >= 1). train TFLOP/s = 3 x forward FLOPs x img/s per device (XLA's "
             f"own count, in the JSON, leaves out convolutions run by library calls such as "
             f"cuDNN's). Suite wall time {result['wall_s']:.0f} s.", "",
             "| model | dtype | batch/device | train img/s | eval img/s | train compile | "
             "eval compile | train peak | eval peak | fwd GFLOP/img | train TFLOP/s | share | "
             "train / share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "train" not in r:
            lines.append(f"| {r['arch']} | {r['dtype']} | {r['per_device_batch']} | "
                         f"{r.get('error') or r.get('skipped')} |" + " |" * 9)
            continue
        tr, ev = r["train"], r["eval"]

        def peak(k):
            if k["peak_mib"] is not None:
                return f"{k['peak_mib'] / 1024:,.1f} GiB"
            return _num(k["xla_estimate_mib"], "{:,.0f} MiB (XLA est.)")
        lines.append(
            f"| {r['arch']} | {r['dtype']} | {r['per_device_batch']} | "
            f"{tr['images_per_sec_per_device']:,.0f} | {ev['images_per_sec_per_device']:,.0f} | "
            f"{tr['compile_s']:.1f} s | {ev['compile_s']:.1f} s | {peak(tr)} | {peak(ev)} | "
            f"{r['forward_flops_per_image'] / 1e9:.2f} | "
            f"{3 * r['forward_flops_per_image'] * tr['images_per_sec_per_device'] / 1e12:.1f} | "
            f"{r['flop_share_images_per_sec']:,.0f} | {r['train_vs_share']:.2f} |")
    profiled = [r for r in done if r["train"].get("profile")]
    if profiled:
        lines += ["", "Where each train step's time goes (`--profile_steps`, XLA ops on the "
                  "device; the five op kinds with the most time, share of the ops' time):", ""]
        for r in profiled:
            p = r["train"]["profile"]
            kinds = ", ".join(f"{k['kind']} {100 * k['share']:.0f}%" for k in p["kinds"][:5])
            lines.append(f"- {r['arch']} {r['dtype']}: {p['op_ms_per_step']:.1f} ms of ops per "
                         f"step ({r['train']['step_ms']:.1f} ms step; {p.get('source')}): {kinds}")
    return "\n".join(lines)


def _child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("compilation_cache_dir"):
        # The rows' processes share the parent's persistent cache (and with it XLA's autotuning
        # results): the host init of both dtypes' rows is one program, compiled once.
        from cnn_jax import cli

        cli.enable_compilation_cache(spec["compilation_cache_dir"])
    print(json.dumps(run_row(spec["arch"], spec["per_device_batch"], spec["image_size"],
                             spec["num_classes"], spec["dtype"], spec["model"],
                             spec["warmup"], spec["max_steps"], spec["kind_budget_s"],
                             spec.get("profile_steps", 0))),
          flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1])
