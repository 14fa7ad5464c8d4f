"""A/B of layer implementations in one process (``python -m cnn_jax.benchmark --ab=xla,auto``).

Each arm is the same network, batch and initial state, its train and eval steps compiled under one
``layers.implementation`` ('xla': XLA's own ops; 'auto', 'fast': the fast formulations;
'fast:max_pool', 'fast:conv1x1+max_pool', ...: only those) or
torchvision's network ('torch'). The arms' steps are timed in rounds: every round runs each arm
once, in an order rotated by one arm per round, after a short pause. Three things make a naive
in-process A/B wrong on this project's CPU host, and each is handled here:

- The layers' inner ``jax.jit`` functions cache their traces by shape, not by implementation: a
  second arm built in the same process would reuse the first arm's traces and be the same program.
  Each arm is built after ``jax.clear_caches()``, and the result records a fingerprint of each
  traced train step, so that identical programs show (``distinct_programs``).
- The step that runs right after torch's is slowed while torch's OpenMP threads spin-wait: a fixed
  order charges that to one arm every round. The order rotates and each step starts after
  ``pause_s``.
- The first program built can run slower than later ones (up to ~15% on the 2-core host): build
  order is the command line's, so run both orders (``--ab=xla,auto`` and ``--ab=auto,xla``).
"""

from __future__ import annotations

import hashlib
import os
import statistics
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from cnn_jax import benchmark_torch

ARMS = ("auto", "xla", "fast", "torch")


def parse_arms(spec: str) -> List[str]:
    """``"xla,auto"`` -> ``["xla", "auto"]``: at least two distinct known arms."""
    from cnn_jax.models import layers

    arms = [a.strip() for a in spec.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS and not _one_formulation(a)]
    if unknown:
        raise ValueError(f"--ab: unknown arm {unknown[0]!r}; arms are layer implementations "
                         f"(auto, xla, fast, or fast:OP+OP with OPs of "
                         f"{', '.join(layers.FAST_OPS)}) or torch, e.g. --ab=xla,auto or "
                         f"--ab=xla,fast:max_pool")
    if len(arms) < 2 or len(set(arms)) != len(arms):
        raise ValueError(f"--ab takes two or more different arms, e.g. --ab=xla,auto; got {spec!r}")
    return arms


def _one_formulation(arm: str) -> bool:
    """Whether ``arm`` is a valid 'fast:OP+OP' layer implementation."""
    from cnn_jax.models import layers

    try:
        return layers._fast_ops(arm) is not None
    except ValueError:
        return False


def rotated(names: Sequence[str], round_index: int) -> List[str]:
    """The order of round ``round_index``: ``names`` rotated left by that many places."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def time_rounds(fns: Mapping[str, Callable[[], Any]], rounds: int, warmup: int,
                pause_s: float = benchmark_torch.PAUSE_S) -> Dict[str, List[float]]:
    """Seconds of each fn per round; each round calls every fn once in rotated order, each call
    after ``pause_s`` of sleep; ``warmup`` untimed rounds first. Each fn must return only when
    its work is done."""
    names = list(fns)
    times = benchmark_torch.alternate([fns[n] for n in names], warmup, rounds, pause_s,
                                      order=lambda r: rotated(range(len(names)), r))
    return dict(zip(names, times))


def fingerprint(program_text: str) -> str:
    """A short hash of a traced program's text (its StableHLO without debug information)."""
    return hashlib.sha256(program_text.encode()).hexdigest()[:12]


def _build_arm(impl: str, model, host_state, images, labels):
    """The train and eval steps of ``model`` from a fresh copy of ``host_state`` (the train step
    donates it), traced under layer implementation ``impl``, with the traced train step's
    fingerprint."""
    import jax

    from cnn_jax.models import layers

    jax.clear_caches()  # else the layers' jitted helpers replay another arm's traces
    state, batch = jax.device_put((host_state.replace(apply_fn=model.apply),
                                   {"image": images, "label": labels}), jax.devices()[0])
    with layers.implementation(impl):
        steps = benchmark_torch.CompiledSteps(state, batch)
    # Of the traced program (what the arms differ in), not the compiled one: in one test run two
    # builds of the same traced program printed different compiled HLO (cause not found).
    steps.fingerprint = fingerprint(steps.train_lowered.as_text(debug_info=False))
    return steps


def run_ab(arch: str, arms: Sequence[str], batch_size: int, image_size: int, num_classes: int,
           dtype: str = "float32", rounds: int = 7, warmup: int = 2,
           model_options: Optional[Mapping[str, Any]] = None,
           pause_s: float = benchmark_torch.PAUSE_S,
           progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train and eval step times of ``arch`` under each arm; medians and ratios to the first arm
    (``ratio`` > 1: that arm is faster than the first)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cnn_jax.models import check_model_options, create_model

    if rounds < 1 or warmup < 0:
        raise ValueError(f"need --steps >= 1 and --warmup >= 0, got {rounds} and {warmup}")
    options = check_model_options(arch, dict(model_options or {}), flag_prefix="--model.")
    if "torch" in arms and options:
        raise ValueError("--model.* options change the network; the torch arm runs the stock "
                         "network that torchvision builds")
    compute = jnp.dtype(dtype)  # a name from --dtype's choices
    rng = np.random.default_rng(1)  # the same batch for every arm
    images = rng.standard_normal((batch_size, image_size, image_size, 3), np.float32)
    labels = rng.integers(0, num_classes, batch_size).astype(np.int32)

    model = create_model(arch, num_classes=num_classes, dtype=compute, **options)
    # One initial state for every arm (torch's weights where torch is an arm), kept on the host.
    torch_side = None
    if "torch" in arms:
        torch, torchvision = benchmark_torch.import_torch()
        row = benchmark_torch.Row(arch, image_size, batch_size, num_classes)
        torch_side = benchmark_torch._TorchSide(torch, torchvision, row, dtype, images, labels)
        state, _ = benchmark_torch.state_from_torch(row, dtype, torch_side.model.state_dict())
    else:
        from cnn_jax.benchmark_gpu import host_train_state

        state = host_train_state(model, (image_size, image_size, 3))  # on the CPU: see there
    host_state = jax.device_get(state.replace(apply_fn=None))
    images = images.astype(compute)

    sides: Dict[str, Any] = {}
    for arm in arms:
        if arm == "torch":
            sides[arm] = torch_side
            continue
        sides[arm] = _build_arm(arm, model, host_state, images, labels)
        if progress:
            progress(f"{arch}: built arm {arm} (train step compiled in "
                     f"{sides[arm].train_compile_s:.1f} s)")
    fingerprints = {a: s.fingerprint for a, s in sides.items() if a != "torch"}
    result: Dict[str, Any] = {
        "arch": arch, "arms": list(arms), "batch_size": batch_size, "image_size": image_size,
        "num_classes": num_classes, "dtype": dtype, "model_options": dict(options),
        "rounds": rounds, "warmup": warmup, "pause_s": pause_s,
        "fingerprints": fingerprints,
        "distinct_programs": len(set(fingerprints.values())) == len(fingerprints),
        "load_average_1min": os.getloadavg()[0]}
    for kind in ("train", "eval"):
        times = time_rounds({a: getattr(s, kind) for a, s in sides.items()}, rounds, warmup,
                            pause_s)
        base = statistics.median(times[arms[0]])
        result[kind] = {a: {"ms": 1e3 * statistics.median(t),
                            "images_per_sec": batch_size / statistics.median(t),
                            "ratio": base / statistics.median(t),
                            "step_ms": [1e3 * x for x in t]} for a, t in times.items()}
        for a, s in sides.items():
            if a != "torch":
                result[kind][a]["compile_s"] = getattr(s, f"{kind}_compile_s")
    result["load_average_1min"] = max(result["load_average_1min"], os.getloadavg()[0])
    return result


def markdown(results: Sequence[Dict[str, Any]]) -> str:
    """One table: a row per (network, arm), ratio = first arm's step time / this arm's."""
    lines = []
    for r in results:
        first = r["arms"][0]
        lines.append(f"{r['arch']}, batch {r['batch_size']} at {r['image_size']} px, "
                     f"{r['dtype']}: median of {r['rounds']} rounds after {r['warmup']} "
                     f"(order rotated each round), 1-min load average up to "
                     f"{r['load_average_1min']:.1f}; ratio = {first}'s step time / the arm's "
                     f"(> 1: faster than {first})."
                     + ("" if r["distinct_programs"] else
                        " **Warning: two arms traced the same program.**"))
    lines += ["", "| model | arm | train ms | train img/s | **train ratio** | eval ms | "
              "eval img/s | eval ratio | program |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for a in r["arms"]:
            t, e = r["train"][a], r["eval"][a]
            lines.append(f"| {r['arch']} | {a} | {t['ms']:.1f} | {t['images_per_sec']:.2f} | "
                         f"**{t['ratio']:.2f}** | {e['ms']:.1f} | {e['images_per_sec']:.2f} | "
                         f"{e['ratio']:.2f} | {r['fingerprints'].get(a, 'torch')} |")
    return "\n".join(lines)
