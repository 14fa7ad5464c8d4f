"""Degradation at the paper's scale, on an accelerator (He et al. 2016, Sec. 4.2, Fig. 6).

    PYTHONPATH=. python -m experiments.degradation_gpu --out=experiments/results/degradation_gpu

The CIFAR plain nets and ResNets of Sec. 4.2 (``plainN`` / ``resnetN``, widths 16-32-64, option A
shortcuts) with the paper's recipe: SGD momentum 0.9, lr 0.1, weight decay 1e-4, batch 128, lr
divided by 10 at 50% and 75% of the steps (32k and 48k of 64k in the paper), 4-px zero-padded
random crops and flips. Data: the hard `shapes` level drawn by
``cnn_jax.datasets.shapes_generator`` (NumPy and Pillow, in parallel processes) and kept on the
device: no TensorFlow, TFDS or ml_collections, which the accelerator machine lacks. Batches are
drawn with replacement on the device, ``--chunk`` steps per ``lax.scan`` call. Every
``--eval_every`` steps: training loss and top-1 in eval mode on a fixed 10,000-image training
subset, validation top-1. Writes ``results.json`` and ``README.md`` (curves table, the paper's
two claims as outcomes) to ``--out``; the CPU-sized experiment is ``python -m experiments.run
degradation``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `cnn_jax` and `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

LEVEL, IMAGE_SIZE, NUM_CLASSES = "hard", 32, 20
PROBE_SIZE = 10_000
EVAL_BATCH = 500  # evaluation scans batches of this size: one compiled shape
EVALS = 8  # evaluations per network when --time_budget_s fits the steps


def _define(fv: flags.FlagValues, argv: List[str]) -> None:
    del argv
    flags.DEFINE_list("depths", ["20", "32", "44", "56"], "network depths (6n + 2)",
                      flag_values=fv)
    flags.DEFINE_list("families", ["plain", "resnet"], "plain and/or resnet", flag_values=fv)
    flags.DEFINE_list("widths", ["16", "32", "64"], "channels of the three stages",
                      flag_values=fv)
    flags.DEFINE_integer("train_images", 50_000, "training images (CIFAR's 50k)", flag_values=fv)
    flags.DEFINE_integer("val_images", 10_000, "validation images", flag_values=fv)
    flags.DEFINE_integer("steps", 64_000, "SGD steps per network (the paper: 64k)",
                         flag_values=fv)
    flags.DEFINE_integer("batch_size", 128, "batch size", flag_values=fv)
    flags.DEFINE_float("learning_rate", 0.1, "peak learning rate", flag_values=fv)
    flags.DEFINE_integer("eval_every", 4000, "steps between evaluations", flag_values=fv)
    flags.DEFINE_integer("chunk", 500, "steps per compiled lax.scan call", flag_values=fv)
    flags.DEFINE_list("seeds", ["0"], "seeds (initialization and batch order)", flag_values=fv)
    flags.DEFINE_string("out", "experiments/results/degradation_gpu", "results folder",
                        flag_values=fv)
    flags.DEFINE_integer("workers", 0, "processes drawing the images (0: one per CPU core)",
                         flag_values=fv)
    flags.DEFINE_bool("report", False, "train nothing: rewrite --out's README.md from its "
                      "results.json (with the flags of the command recorded there)",
                      flag_values=fv)
    flags.DEFINE_float("time_budget_s", 0.0, "fit the step count (at most --steps) to this "
                       "wall time, drawing and compiling included, from the deepest network's "
                       "timed compile and chunk; 0: run --steps", flag_values=fv)


def draw(num: int, split: str, workers: int):
    """``num`` hard-level images of ``split`` (uint8) and labels, drawn in ``workers`` processes."""
    import numpy as np

    from cnn_jax.datasets.shapes_generator import make_arrays

    workers = max(1, min(workers or os.cpu_count() or 1, num // 1000 or 1))
    bounds = np.linspace(0, num, workers + 1).astype(int)
    make = functools.partial(make_arrays, image_size=IMAGE_SIZE, split=split, level=LEVEL)
    if workers == 1:
        return make(num)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(make, int(b - a), start=int(a)) for a, b in zip(bounds, bounds[1:])]
        parts = [f.result() for f in futures]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def make_trainer(model, steps: int, batch_size: int, lr: float, chunk: int, mean, std):
    """(optimizer, jitted scan of ``chunk`` steps, jitted eval sums) for the paper's recipe."""
    import jax
    import jax.numpy as jnp
    import optax

    from cnn_jax import optim
    from cnn_jax import train_step as ts

    schedule = optax.piecewise_constant_schedule(lr, {steps // 2: 0.1, (3 * steps) // 4: 0.1})
    tx = optim.create_optimizer("sgd", schedule, momentum=0.9, weight_decay=1e-4)
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def prepare(images):
        return (images.astype(jnp.float32) / 255.0 - mean) / std

    def augment(key, images):  # the paper's 4-px zero padding, random 32x32 crops and flips
        k_crop, k_flip = jax.random.split(key)
        padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
        offsets = jax.random.randint(k_crop, (images.shape[0], 2), 0, 9)
        crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(
            im, (o[0], o[1], 0), (IMAGE_SIZE, IMAGE_SIZE, images.shape[-1])))
        out = crop(padded, offsets)
        flip = jax.random.bernoulli(k_flip, 0.5, (images.shape[0], 1, 1, 1))
        return jnp.where(flip, out[:, :, ::-1], out)

    def one_step(state, key, images, labels):
        k_idx, k_aug = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
        batch = {"image": augment(k_aug, prepare(images[idx])), "label": labels[idx]}
        state, metrics = ts.train_step(state, batch)
        return state, metrics["loss"]

    @functools.partial(jax.jit, donate_argnums=0)
    def run_chunk(state, key, images, labels):
        keys = jax.random.split(key, chunk)
        return jax.lax.scan(lambda c, k: one_step(c, k, images, labels), state, keys)

    @jax.jit
    def eval_sums(state, images, labels):
        def body(_, xy):
            return None, ts.eval_step(state, {"image": prepare(xy[0]), "label": xy[1]})
        n = images.shape[0] // EVAL_BATCH * EVAL_BATCH  # _run checks that n > 0
        xs = (images[:n].reshape(-1, EVAL_BATCH, *images.shape[1:]),
              labels[:n].reshape(-1, EVAL_BATCH))
        _, sums = jax.lax.scan(body, None, xs)
        return jax.tree_util.tree_map(jnp.sum, sums)

    return tx, run_chunk, eval_sums


def evaluate(eval_sums, state, data):
    """The summed eval metrics (floats) on the first ``PROBE_SIZE`` training images and on the
    validation images."""
    (x_train, y_train), (x_val, y_val), _ = data
    return [{k: float(v) for k, v in eval_sums(state, x, y).items()}
            for x, y in ((x_train[:PROBE_SIZE], y_train[:PROBE_SIZE]), (x_val, y_val))]


def _model(family: str, depth: int, widths):
    from cnn_jax.models import create_model

    n = (depth - 2) // 6
    return create_model(f"{family}20", num_classes=NUM_CLASSES, widths=tuple(widths),
                        stage_sizes=(n, n, n))


def fit_steps(family: str, depth: int, widths, data, fv, runs: Sequence[tuple],
              deadline: float) -> Dict[str, Any]:
    """The step count (a multiple of ``--chunk``, at most ``--steps``) at which the networks of
    ``runs`` (``(family, depth)`` in run order, repeats being later seeds) end by ``deadline``
    (a ``time.time()``; this calibration's own time counts against it).

    Compiles and times the ``depth``-layer network (the deepest): one chunk and one evaluation,
    each twice (the first includes compilation). Step, evaluation and compile times are taken
    proportional to depth (the layers dominate: the batch draw and augmentation are a few
    elementwise ops); a repeated network compiles from the persistent cache at a fifth of the
    time, and ``--eval_every`` the multiple of ``--chunk`` that gives at most ``EVALS``
    evaluations."""
    import jax
    import numpy as np

    from cnn_jax import train_step as ts

    mean, std = data[2]
    model = _model(family, depth, widths)
    tx, run_chunk, eval_sums = make_trainer(model, fv.steps, fv.batch_size, fv.learning_rate,
                                            fv.chunk, mean, std)
    key = jax.random.key(12345)
    state = ts.create_train_state(model, tx, key, (IMAGE_SIZE, IMAGE_SIZE, 3))
    times = []
    for i in range(2):
        t = time.time()
        state, losses = run_chunk(state, jax.random.fold_in(key, i), *data[0])
        np.asarray(losses)
        t_eval = time.time()
        evaluate(eval_sums, state, data)
        times.append((t_eval - t, time.time() - t_eval))
    (chunk_first, eval_first), (chunk_s, eval_s) = times
    step_s = chunk_s / fv.chunk
    compile_s = max(0.0, chunk_first - chunk_s) + max(0.0, eval_first - eval_s)
    budget_s = deadline - time.time()
    return {**steps_for_budget(step_s, eval_s, compile_s, depth, runs, budget_s, fv.chunk,
                               fv.steps),
            "budget_s": round(budget_s, 1), "calibrated_on": f"{family}{depth}",
            "step_ms": round(1e3 * step_s, 3), "eval_s": round(eval_s, 3),
            "compile_s": round(compile_s, 1)}


def steps_for_budget(step_s: float, eval_s: float, compile_s: float, depth: int,
                     runs: Sequence[tuple], budget_s: float, chunk: int, max_steps: int
                     ) -> Dict[str, Any]:
    """``fit_steps``' arithmetic: the times measured on the ``depth``-layer network scaled by
    each run's depth; ``steps`` (a multiple of ``chunk``, at most ``max_steps``), ``eval_every``
    and the estimated seconds. ValueError when not even one chunk fits."""
    seen, fixed, per_step = set(), 0.0, 0.0
    for net in runs:
        scale = net[1] / depth
        # compiling (a fifth of it from the cache) and at most EVALS evaluations
        fixed += scale * (compile_s * (0.2 if net in seen else 1.0) + EVALS * eval_s)
        seen.add(net)
        per_step += step_s * scale
    steps = min(max_steps, int(max(0.0, budget_s - fixed) / per_step) // chunk * chunk)
    if steps < chunk:
        raise ValueError(f"--time_budget_s leaves {budget_s:.0f} s for the runs, which need "
                         f"{fixed:.0f} s for compiling and evaluating and "
                         f"{1e3 * step_s:.1f} ms per step of the {depth}-layer net: not one "
                         f"chunk of {chunk} steps each; give more time, fewer --seeds or "
                         "--depths, or a smaller --chunk")
    every = -(-steps // EVALS // chunk) * chunk  # a multiple of chunk, at most EVALS evaluations
    return {"steps": steps, "eval_every": every, "estimated_s": round(fixed + per_step * steps, 1)}


def train_one(family: str, depth: int, widths, seed: int, data, fv, log=print) -> Dict[str, Any]:
    import jax
    import numpy as np

    from cnn_jax import train_step as ts
    from cnn_jax.models import count_params

    model = _model(family, depth, widths)
    mean, std = data[2]
    tx, run_chunk, eval_sums = make_trainer(model, fv.steps, fv.batch_size, fv.learning_rate,
                                            fv.chunk, mean, std)
    key = jax.random.key(seed)
    state = ts.create_train_state(model, tx, jax.random.fold_in(key, 0),
                                  (IMAGE_SIZE, IMAGE_SIZE, 3))
    label = f"{family}{depth}"
    curve, start, compile_s = [], time.time(), None
    step = 0
    while step < fv.steps:
        t = time.time()
        state, losses = run_chunk(state, jax.random.fold_in(key, step + 1), *data[0])
        losses = np.asarray(losses)
        if compile_s is None:
            compile_s = time.time() - t
        step += fv.chunk
        if step % fv.eval_every == 0 or step >= fv.steps:
            tr, va = evaluate(eval_sums, state, data)
            row = {"step": step, "train_loss": tr["loss"] / tr["count"],
                   "train_top1": tr["top1"] / tr["count"], "val_loss": va["loss"] / va["count"],
                   "val_top1": va["top1"] / va["count"],
                   "last_batch_loss": float(losses[-1])}
            curve.append(row)
            log(f"{label} seed {seed} step {step}: train loss {row['train_loss']:.4f} "
                f"top-1 {100 * row['train_top1']:.1f}%, val top-1 {100 * row['val_top1']:.1f}% "
                f"({time.time() - start:.0f} s)")
    wall = time.time() - start
    return {"variant": label, "family": family, "depth": depth, "seed": seed,
            "params": count_params(state.params), "steps": step, "wall_s": round(wall, 1),
            "first_chunk_s": round(compile_s or 0.0, 1),
            "steps_per_s": round(step / max(wall - (compile_s or 0.0), 1e-9), 1), "curve": curve,
            "final": curve[-1] if curve else {}}


H2_MARGIN = 0.05  # nats: "at least as well" allows the deeper ResNet this much more loss


def outcomes(runs: Sequence[Dict[str, Any]], depths: Sequence[int]) -> List[str]:
    """The CPU experiment's hypotheses (``experiments/results/degradation``) on these runs,
    deepest against shallowest, with Welch's 95% interval over seeds: H1 the deeper plain net
    has the higher final training loss (eval mode; interval above 0); H2 the deeper ResNet's is
    not higher by more than ``H2_MARGIN`` (interval below it); H3 at the deepest depth the ResNet
    has the higher best validation top-1 (interval above 0). Not confirmed when the interval lies
    wholly on the other side; inconclusive otherwise, or with too few seeds for an interval."""
    import math

    from experiments import stats

    def values(family, depth, key):
        return [max(c["val_top1"] for c in r["curve"]) if key == "best_val" else
                r["final"][key] for r in runs
                if (r["family"], r["depth"]) == (family, depth) and r["final"]]

    shallow, deep = min(depths), max(depths)
    tests = [  # (label, (family, depth), (family, depth), key, bound, unit scale, unit)
        ("H1 the deeper plain net has the higher training loss", ("plain", deep),
         ("plain", shallow), "train_loss", 0.0, 1.0, " nats"),
        (f"H2 the deeper residual net's training loss is not higher by more than "
         f"{H2_MARGIN} nats", ("resnet", deep), ("resnet", shallow), "train_loss", -H2_MARGIN,
         -1.0, " nats"),
        (f"H3 shortcuts help the deep net (best val top-1, resnet{deep} - plain{deep})",
         ("resnet", deep), ("plain", deep), "best_val", 0.0, 100.0, " points"),
    ]
    lines = []
    for label, a_key, b_key, key, bound, scale, unit in tests:
        a, b = values(*a_key, key), values(*b_key, key)
        if not a or not b or a_key == b_key:
            continue
        d = stats.welch(a, b)
        sign = 1.0 if scale > 0 else -1.0  # H2 holds below its bound, the others above
        num = (lambda v: f"{abs(scale) * v:+.{3 if unit == ' nats' else 1}f}")  # noqa: E731
        shown = f"{num(d.diff)}{unit}"
        if not math.isfinite(d.low):
            verdict = "inconclusive (too few seeds for an interval)"
        else:
            shown += (f", 95% CI [{num(d.low)}, {num(d.high)}] "
                      f"(Welch, p = {d.p:.2g}, n = {d.n_a} vs {d.n_b})")
            low, high = sorted((sign * (d.low + bound), sign * (d.high + bound)))
            verdict = ("confirmed" if low > 0 else "not confirmed" if high < 0 else
                       "inconclusive (the interval reaches across the bound)")
        lines.append(f"- {label}: {shown}: **{verdict}**")
    return lines


def summary(runs: Sequence[Dict[str, Any]]) -> List[str]:
    """Mean and standard deviation over seeds of each variant's final metrics."""
    import numpy as np

    rows = ["| variant | seeds | train loss (eval mode) | train top-1 | val top-1 |",
            "|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in runs if r["final"]):
        finals = [r["final"] for r in runs if r["variant"] == variant and r["final"]]

        def ms(key, scale=1.0, fmt="{:.4f}"):
            v = scale * np.asarray([f[key] for f in finals])
            sd = fmt.format(v.std(ddof=1)) if len(v) > 1 else "-"
            return f"{fmt.format(v.mean())} ± {sd}"

        rows.append(f"| {variant} | {len(finals)} | {ms('train_loss')} | "
                    f"{ms('train_top1', 100, '{:.1f}')}% | {ms('val_top1', 100, '{:.1f}')}% |")
    return rows


def plot(path: str, runs: Sequence[Dict[str, Any]]) -> bool:
    """Training loss (eval mode) and validation top-1 against steps, each variant's mean over
    seeds with a band of one standard deviation (Fig. 6's view); False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    import numpy as np

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for variant in dict.fromkeys(r["variant"] for r in runs):
        curves = [r["curve"] for r in runs if r["variant"] == variant and r["curve"]]
        n = min(len(c) for c in curves)
        steps = [c["step"] for c in curves[0][:n]]
        style = "--" if variant.startswith("plain") else "-"
        for ax, key, scale in ((axes[0], "train_loss", 1.0), (axes[1], "val_top1", 100.0)):
            v = scale * np.asarray([[c[key] for c in curve[:n]] for curve in curves])
            mean, sd = v.mean(0), v.std(0)
            (line,) = ax.plot(steps, mean, style, label=f"{variant} (n = {len(curves)})")
            ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
    axes[0].set(xlabel="step", ylabel="training loss (eval mode)", yscale="log")
    axes[1].set(xlabel="step", ylabel="validation top-1 (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def write(out: str, runs: Sequence[Dict[str, Any]], fv, depths, command: str,
          draw_s: float, fit: Optional[Dict[str, Any]] = None,
          meta: Optional[Dict[str, Any]] = None) -> None:
    """results.json (unless ``meta`` is given: a report of a finished run) and README.md."""
    os.makedirs(out, exist_ok=True)
    # As results.json records it, so that --report writes the same README (2.54 s is "3 s" but
    # its record 2.5 "2 s")
    draw_s = round(draw_s, 1)
    if meta is None:
        import jax

        meta = {"command": command, "device": str(jax.devices()[0].device_kind),
                "jax": jax.__version__, "train_images": fv.train_images,
                "val_images": fv.val_images, "steps": fv.steps, "batch_size": fv.batch_size,
                "draw_images_s": draw_s, "fitted_steps": fit}
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"meta": meta, "runs": list(runs)}, f, indent=1)
    rows = ["| variant | seed | params | steps | train loss (eval mode) | train top-1 | "
            "val top-1 | steps/s | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f_ = r["final"]
        rows.append(f"| {r['variant']} | {r['seed']} | {r['params']:,} | {r['steps']} | "
                    f"{f_['train_loss']:.4f} | {100 * f_['train_top1']:.1f}% | "
                    f"{100 * f_['val_top1']:.1f}% | {r['steps_per_s']} | {r['wall_s']} |")
    text = [f"# Degradation at the paper's scale ({meta['device']})", "",
            f"Command: `{command}`", "",
            f"`shapes` hard level, {fv.train_images:,} training / {fv.val_images:,} validation "
            f"images at 32 px (drawn in {draw_s:.0f} s), {fv.steps:,} SGD steps of "
            f"{fv.batch_size} per network (lr {fv.learning_rate}, /10 at 50% and 75%), JAX "
            f"{meta['jax']}.", "", *([] if not fit else [
                f"The step count was fitted to a budget of {fv.time_budget_s:g} s on this device "
                f"(the paper: 64,000 steps): {fit['calibrated_on']} took {fit['step_ms']} ms per "
                f"step and {fit['compile_s']} s to compile; estimated {fit['estimated_s']:.0f} s "
                f"of {fit['budget_s']:.0f} s for the runs.", ""]),
            *rows, "", *summary(runs), "",
            *(["![curves](curves.png)", "", "Mean over seeds, band: one standard deviation; "
               "dashed: plain nets.", ""] if plot(os.path.join(out, "curves.png"), runs)
              else []),
            "## The paper's claims on these runs", "",
            *outcomes(runs, depths), ""]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(text))


def report(out: str) -> None:
    """``out``/README.md again from ``out``/results.json: the recorded command's flags, the
    fitted step count and the runs, through today's tables and outcomes."""
    if not os.path.isfile(os.path.join(out, "results.json")):
        raise ValueError(f"--report: no results.json in {out}; pass the --out of a finished run")
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)
    meta, runs = result["meta"], result["runs"]
    command = meta["command"]
    fv = flags.FlagValues()
    _define(fv, [])
    fv(["degradation_gpu", *command.split(" -m experiments.degradation_gpu", 1)[1].split()])
    fit = meta.get("fitted_steps")
    if fit:
        fv.steps, fv.eval_every = fit["steps"], fit["eval_every"]
    depths = sorted({r["depth"] for r in runs})
    write(out, runs, fv, depths, command, meta["draw_images_s"], fit, meta=meta)


def _run(fv: flags.FlagValues) -> int:
    import numpy as np

    if fv.report:
        report(fv.out)
        print(f"wrote {os.path.join(fv.out, 'README.md')}")
        return 0

    depths = [int(d) for d in fv.depths]
    bad = [d for d in depths if d < 8 or (d - 2) % 6]
    if bad:
        raise ValueError(f"--depths must be 6n + 2 (20, 32, 44, 56, 110), got {bad}")
    unknown = [f for f in fv.families if f not in ("plain", "resnet")]
    if unknown:
        raise ValueError(f"--families: choose from plain, resnet (got {', '.join(unknown)})")
    if fv.eval_every % fv.chunk or fv.steps % fv.chunk:
        raise ValueError(f"--steps and --eval_every must be multiples of --chunk ({fv.chunk})")
    if fv.val_images < EVAL_BATCH or fv.val_images % EVAL_BATCH or fv.train_images < EVAL_BATCH:
        raise ValueError(f"--val_images must be a multiple of {EVAL_BATCH} and --train_images at "
                         f"least {EVAL_BATCH} (evaluation runs in batches of {EVAL_BATCH}; the "
                         f"training loss is measured on the first {PROBE_SIZE:,} training images, "
                         f"rounded down to a multiple of {EVAL_BATCH}); got {fv.val_images} and "
                         f"{fv.train_images}")
    if fv.time_budget_s < 0:
        raise ValueError(f"--time_budget_s must be >= 0 (0: run --steps), got {fv.time_budget_s:g}")
    widths = [int(w) for w in fv.widths]
    start = t = time.time()
    x_train, y_train = draw(fv.train_images, "train", fv.workers)
    x_val, y_val = draw(fv.val_images, "validation", fv.workers)
    draw_s = time.time() - t
    pixels = x_train.reshape(-1, 3).astype(np.float64) / 255.0
    data = ((x_train, y_train), (x_val, y_val), (pixels.mean(0), pixels.std(0)))
    print(f"drew {len(x_train):,} + {len(x_val):,} images in {draw_s:.0f} s", flush=True)
    import jax

    from cnn_jax import cli

    # A later seed's networks compile from disk: the same programs as the first seed's.
    cli.enable_compilation_cache(os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                cli.DEFAULT_COMPILATION_CACHE_DIR))
    data = jax.device_put(data)
    command = "PYTHONPATH=. python -m experiments.degradation_gpu " + " ".join(sys.argv[1:])
    order = [(int(s), f, d) for s in fv.seeds for f in fv.families for d in depths]
    fit = None
    if fv.time_budget_s:
        reserve = 10.0  # writing the results, the last evaluation's rounding
        fit = fit_steps(fv.families[0], max(depths), widths, data, fv,
                        [(f, d) for _, f, d in order], start + fv.time_budget_s - reserve)
        fv.steps, fv.eval_every = fit["steps"], fit["eval_every"]
        print(f"fitted to {fv.time_budget_s:g} s: {fv.steps:,} steps per network, evaluated "
              f"every {fv.eval_every:,} ({fit['calibrated_on']}: {fit['step_ms']} ms per step, "
              f"{fit['compile_s']} s to compile; {time.time() - start:.0f} s spent)", flush=True)
    runs = []
    for seed, family, depth in order:
        runs.append(train_one(family, depth, widths, seed, data, fv))
        write(fv.out, runs, fv, depths, command, draw_s, fit)  # kept if a later run times out
    print(f"wrote {os.path.join(fv.out, 'README.md')}")
    return 0


def main(argv=None) -> int:
    from cnn_jax import cli

    return cli.run_command("experiments.degradation_gpu", _define, _run, argv,
                           description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
