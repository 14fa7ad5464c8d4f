"""Activation and depth: ReLU vs tanh vs sigmoid, gradient norm per layer (vanishing gradients).

A plain CIFAR network (He et al. 2016, Sec. 4.2: a 3x3 conv stem, three stages of 2n 3x3 convs,
global pooling, one dense layer; 6n + 2 weight layers) built here from ``layers.ConvBNAct`` with a
configurable activation. For every activation and depth it records the norm of the loss gradient
with respect to each layer's kernel on a fixed batch: at initialization both without and with
batch norm, and, for the networks it trains (with batch norm unless ``--nonorm``), at every
evaluation during training, plus the usual training curves.

    python -m experiments.activations                    # depths 8 and 20 on shapes, CPU minutes
    python -m experiments.activations --nonorm          # train the networks without batch norm
    python -m experiments.activations --depths=20,56 --widths=16,32,64 --dataset=cifar10 \\
        --epochs=30 --batch_size=128 --augment=''        # deeper, on CIFAR-10
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cnn_jax.models import layers  # noqa: E402

NAME = "activations"
TITLE = "Activation and depth: ReLU vs tanh vs sigmoid, per-layer gradient norms"
INTRO = """\
Saturating nonlinearities shrink gradients on their way back through a deep network: the
sigmoid's derivative is at most 1/4 and its outputs are not centred, tanh saturates for large
inputs, while the ReLU passes the gradient unchanged wherever it is active (Glorot & Bengio 2010;
Krizhevsky et al. 2012, Sec. 3.1, Fig. 1: a ReLU network reaches 25% CIFAR-10 training error six
times faster than a tanh one). Batch normalization (Ioffe & Szegedy 2015) rescales every layer's
input and, with it, the gradients. The networks are plain (no shortcuts) CIFAR nets of 6n+2
layers built from `cnn_jax.models.layers.ConvBNAct`; each activation gets the initialization
suited to it (`--init=gain`: N(0, gain^2 / fan_in) with torch's gains sqrt(2) for ReLU, 5/3 for
tanh and 1 for sigmoid), so that what differs is the nonlinearity, not a badly scaled init. The
gradient norms are ||dL/dW|| of each layer's kernel for one fixed batch of 256 validation images
(train mode): at initialization for every network without and with batch norm, and during
training for the trained networks. Without batch norm none of these plain networks leaves chance
level within the default few hundred steps on `shapes` (tried: AdamW 1e-3 and 3e-3, Nesterov SGD
0.01 and 0.05), so by default the trained networks have batch norm (`--nonorm` trains them
without)."""

ACTIVATIONS = ("relu", "tanh", "sigmoid")
# torch.nn.init.calculate_gain: the weight scale that keeps activations' variance per layer.
GAINS = {"relu": 2 ** 0.5, "tanh": 5.0 / 3.0, "sigmoid": 1.0, "identity": 1.0}
PROBE_BATCH = 256

CAVEATS = [
    "Gradient norms are of one fixed batch and one initialization (seed); the first/last ratio "
    "compares layers within one network (their sizes differ, so a ratio of exactly 1 is not "
    "the expectation even without any vanishing).",
    "The trained networks are short runs (a few epochs on a `shapes` subset, one learning rate "
    "for all activations); a network that does not learn here might with a tuned learning rate "
    "or a longer schedule. The gradient norms at initialization do not depend on the budget.",
]


class PlainCifarNet(nn.Module):
    """Plain CIFAR network of 6n+2 layers (He et al. 2016, Sec. 4.2) with any activation."""

    num_classes: int = 10
    dtype: Any = jnp.float32
    depth: int = 20
    widths: Tuple[int, ...] = (16, 32, 64)
    activation: str = "relu"
    use_norm: bool = False
    init_gain: float = 2 ** 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, ...), "
                             f"got {self.depth}")
        if len(self.widths) != 3:
            raise ValueError(f"widths needs three stages, got {self.widths}")
        n = (self.depth - 2) // 6
        init = nn.initializers.variance_scaling(self.init_gain ** 2, "fan_in", "normal")
        conv = partial(layers.ConvBNAct, kernel_size=3, padding=1, use_norm=self.use_norm,
                       activation=self.activation, dtype=self.dtype, kernel_init=init)
        x = conv(self.widths[0], name="conv1")(x, train)
        index = 1
        for stage, width in enumerate(self.widths):
            for j in range(2 * n):
                index += 1
                x = conv(width, strides=2 if stage > 0 and j == 0 else 1,
                         name=f"conv{index}")(x, train)
        x = layers.global_avg_pool(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init, name="fc")(x)


def layer_names(depth: int) -> List[str]:
    return [f"conv{i}" for i in range(1, depth)] + ["fc"]


def kernel_grad_norms(state, batch) -> Dict[str, jax.Array]:
    """||dL/dW|| per layer kernel (train mode, cross-entropy of ``batch``)."""
    from cnn_jax import train_step as step_lib

    def loss_fn(params):
        logits, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                   batch["image"], train=True, mutable=["batch_stats"])
        return jnp.mean(step_lib.cross_entropy(logits, batch["label"]))

    grads = jax.grad(loss_fn)(state.params)
    norms = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[-1] == "kernel":
            norms[keys[0]] = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
    return norms


def _squeeze(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """[1, b, ...] (one local device) -> [b, ...]."""
    return {k: v.reshape(v.shape[1:]) if v.shape[0] == 1 else v.reshape((-1,) + v.shape[2:])
            for k, v in batch.items()}


def evaluate(eval_step, state, args) -> Dict[str, float]:
    from cnn_jax import input_pipeline, train_step as step_lib

    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    for batch in input_pipeline.create_eval_iterator(
            args.dataset, args.data_dir, max(args.batch_size, 100), args.image_size,
            num_local_devices=1, process_index=0, process_count=1):
        sums = eval_step(state, _squeeze(batch))
        for k in totals:
            totals[k] += float(sums[k])
    return step_lib.summarize_eval(totals)


def probe_batch(args) -> Dict[str, np.ndarray]:
    """The first validation images, always the same (no augmentation, no padding)."""
    from cnn_jax import input_pipeline

    n = min(PROBE_BATCH, common.dataset_info(args).num_eval_examples)
    batch = _squeeze(next(iter(input_pipeline.create_eval_iterator(
        args.dataset, args.data_dir, n, args.image_size, num_local_devices=1, process_index=0,
        process_count=1))))
    keep = batch["mask"].astype(bool)
    return {"image": batch["image"][keep], "label": batch["label"][keep]}


def train_one(label: str, model: PlainCifarNet, args, info, probe) -> common.Run:
    """Train with the stack's train_step/eval_step under jit; record curves and gradient norms."""
    from cnn_jax import input_pipeline, optim
    from cnn_jax import train_step as step_lib

    steps_per_epoch = optim.steps_per_epoch(info.num_train_examples, args.batch_size)
    total = max(1, int(round(args.epochs * steps_per_epoch)))
    eval_every = max(1, steps_per_epoch // max(1, args.evals_per_epoch))
    log_every = max(1, steps_per_epoch // max(1, args.logs_per_epoch))
    warmup = int(round(min(args.warmup_epochs, args.epochs / 4) * steps_per_epoch))
    schedule = optim.create_schedule("cosine", args.learning_rate, total, warmup)
    tx = optim.create_optimizer(args.optimizer, schedule, weight_decay=args.weight_decay,
                                skip_bn_and_bias=True, grad_clip_norm=args.grad_clip_norm)
    params, macs = common.module_cost(model, args.image_size)
    print(f"--- {label}: {params:,} parameters, {macs / 1e6:.1f}M MACs/image",
          file=sys.stderr, flush=True)
    start = time.time()
    state = step_lib.create_train_state(model, tx, jax.random.PRNGKey(args.seed),
                                        (args.image_size, args.image_size, 3))
    train_step = jax.jit(partial(step_lib.train_step, learning_rate_fn=schedule),
                         donate_argnums=(0,))
    eval_step = jax.jit(step_lib.eval_step)
    grad_norms = jax.jit(kernel_grad_norms)
    batches = input_pipeline.create_train_iterator(
        args.dataset, args.data_dir, args.batch_size, args.image_size, seed=args.seed,
        augment=args.augment or None, num_local_devices=1, process_index=0, process_count=1)

    records: List[Dict[str, Any]] = []
    norms = [(0, jax.device_get(grad_norms(state, probe)))]
    pending: List[Dict[str, Any]] = []
    error = ""
    for step in range(1, total + 1):
        state, metrics = train_step(state, _squeeze(next(batches)))
        pending.append(metrics)
        if step % log_every and step % eval_every and step != total:
            continue
        host = jax.device_get(pending)
        pending = []
        mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        if not all(np.isfinite([m["loss"] for m in host])):
            error = f"diverged: loss became non-finite by step {step}"
            print(f"{label}: {error}", file=sys.stderr, flush=True)
            break
        records.append({"step": step, "split": "train", "epoch": step / steps_per_epoch, **mean})
        if step % eval_every == 0 or step == total:
            records.append({"step": step, "split": "eval", **evaluate(eval_step, state, args)})
            norms.append((step, jax.device_get(grad_norms(state, probe))))
            print(f"{label} step {step}: val top-1 {100 * records[-1]['top1']:.1f}%",
                  file=sys.stderr, flush=True)
    variant = common.Variant(label, "PlainCifarNet", {
        "depth": model.depth, "widths": tuple(model.widths), "activation": model.activation,
        "use_norm": model.use_norm})
    return common.Run(variant, params, macs, records, steps_per_epoch, time.time() - start,
                      error, extra={"grad_norms": norms, "depth": model.depth,
                                    "activation": model.activation})


def grad_rows(runs: Sequence[common.Run], reference: Sequence[Dict[str, Any]]
              ) -> List[Dict[str, Any]]:
    """Every recorded ||dL/dW||: the trained runs at each evaluation, the reference at init."""
    rows = []
    entries = [(run.label, run.extra["activation"], run.extra["depth"], run.extra["norm"],
                run.extra["grad_norms"]) for run in runs]
    entries += [(ref["label"], ref["activation"], ref["depth"], ref["norm"], [(0, ref["norms"])])
                for ref in reference]
    for label, act, depth, norm, history in entries:
        for step, norms in history:
            for i, name in enumerate(layer_names(depth), start=1):
                rows.append({"variant": label, "activation": act, "depth": depth,
                             "batch_norm": norm, "step": step, "layer_index": i, "layer": name,
                             "grad_norm": float(norms[name])})
    return rows


def ratio(norms: Dict[str, Any], depth: int) -> float:
    """||dL/dW|| of the first conv over that of the last conv: << 1 means vanishing."""
    return float(norms["conv1"]) / max(float(norms[f"conv{depth - 1}"]), 1e-30)


def gradient_table(runs: Sequence[common.Run], reference: Sequence[Dict[str, Any]]) -> str:
    """First/last-conv gradient ratios at init without and with BN, and after training."""
    rows = []
    for run in runs:
        depth, act = run.extra["depth"], run.extra["activation"]
        ref = next((r for r in reference if (r["depth"], r["activation"]) == (depth, act)), None)
        init, end = run.extra["grad_norms"][0][1], run.extra["grad_norms"][-1][1]
        by_norm = {run.extra["norm"]: ratio(init, depth)}
        if ref:
            by_norm[ref["norm"]] = ratio(ref["norms"], depth)
        rows.append({"net": f"{act}, depth {depth}",
                     "no_bn": by_norm.get(False), "bn": by_norm.get(True),
                     "end": ratio(end, depth), "end_step": run.extra["grad_norms"][-1][0]})
    trained = "with BN" if runs and runs[0].extra["norm"] else "without BN"
    cols = (("net", "network"), ("no_bn", "init, no BN"), ("bn", "init, with BN"),
            ("end", f"trained ({trained}), last eval"), ("end_step", "step"))
    return common.markdown_table([{k: (f"{v:.2g}" if isinstance(v, float) else v)
                                   for k, v in row.items()} for row in rows], cols)


def _plot_norms(ax, depth: int, series, title: str) -> None:
    names = layer_names(depth)
    for label, norms, props in series:
        ax.plot(range(1, len(names) + 1), [max(float(norms[n]), 1e-30) for n in names],
                marker="o", ms=2.5, lw=1.2, label=label, **props)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9.5)
    ax.set_xlabel("layer (1 = first conv, last = fc)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)


def plot(path: str, runs: Sequence[common.Run], reference: Sequence[Dict[str, Any]],
         depths: Sequence[int]) -> None:
    """Row 1: ||dL/dW|| at init without/with BN; row 2: the trained nets' at init and end;
    row 3: training curves."""
    ncols = max(3, len(depths))
    fig, axes = common.new_figure(ncols, 3, width=5.0, height=3.7)
    colors = {a: f"C{i}" for i, a in enumerate(ACTIVATIONS)}

    def color(activation: str) -> str:
        return colors.get(activation, "k")

    def init_series(activation: str, norm: bool, norms):
        return (f"{activation}, {'BN' if norm else 'no BN'}", norms,
                {"color": color(activation), "ls": ":" if norm else "-"})

    for col, depth in enumerate(depths):
        init = [init_series(r["activation"], r["norm"], r["norms"])
                for r in reference if r["depth"] == depth]
        init += [init_series(r.extra["activation"], r.extra["norm"], r.extra["grad_norms"][0][1])
                 for r in runs if r.extra["depth"] == depth]
        init.sort(key=lambda s: s[0])
        _plot_norms(axes[col], depth, init,
                    f"depth {depth}, at init: ||dL/dW|| per layer (solid: no BN, dotted: BN)")
        during = []
        for r in (r for r in runs if r.extra["depth"] == depth):
            (s0, n0), (s1, n1) = r.extra["grad_norms"][0], r.extra["grad_norms"][-1]
            during += [(f"{r.extra['activation']} step {s0}", n0,
                        {"color": color(r.extra["activation"]), "ls": ":"}),
                       (f"{r.extra['activation']} step {s1}", n1,
                        {"color": color(r.extra["activation"]), "ls": "-"})]
        trained = "BN" if runs and runs[0].extra["norm"] else "no BN"
        _plot_norms(axes[ncols + col], depth, during,
                    f"depth {depth}, trained ({trained}): at init (dotted) and at the end")
    for row in (0, 1):
        for ax in axes[row * ncols + len(depths):(row + 1) * ncols]:
            ax.axis("off")
    deepest = max(depths)
    common.plot_curve_axes(axes[2 * ncols:2 * ncols + 3], runs, style=lambda i, run: {
        "color": color(run.extra["activation"]),
        "ls": "-" if run.extra["depth"] == deepest else "--"})
    for ax in axes[2 * ncols + 3:]:
        ax.axis("off")
    fig.suptitle(TITLE, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")


def observe(runs: Sequence[common.Run], reference: Sequence[Dict[str, Any]], args,
            info) -> List[str]:
    notes = []
    depths = sorted({r.extra["depth"] for r in runs} | {r["depth"] for r in reference})
    for norm in (False, True):
        for depth in depths:
            parts = [f"{r['activation']} {ratio(r['norms'], depth):.2g}" for r in reference
                     if r["depth"] == depth and r["norm"] == norm]
            parts += [f"{r.extra['activation']} {ratio(r.extra['grad_norms'][0][1], depth):.2g}"
                      for r in runs if r.extra["depth"] == depth and r.extra["norm"] == norm]
            if parts:
                notes.append(f"At initialization, {'with' if norm else 'without'} batch norm, "
                             f"depth {depth}: ||dL/dW|| of the first conv / that of the last "
                             f"conv = " + ", ".join(parts) + ".")
    notes.append("Ratios far below 1 are vanishing gradients: the first layers would learn "
                 "orders of magnitude more slowly than the last ones.")
    for depth in depths:
        sel = [r for r in runs if r.extra["depth"] == depth]
        if sel:
            notes.append(f"Trained, depth {depth}: first/last ratio at the last evaluation " +
                         ", ".join(f"{r.extra['activation']} "
                                   f"{ratio(r.extra['grad_norms'][-1][1], depth):.2g}"
                                   for r in sel) +
                         "; last-epoch training loss / final val top-1 " +
                         ", ".join(f"{r.extra['activation']} {r.last_epoch_train('loss'):.3f} / "
                                   f"{common.pct(common.top1(r))}" for r in sel) + ".")
    chance = 1.0 / max(info.num_classes, 1)
    stuck = [r.label for r in runs if common.top1(r) <= chance + 0.03 or r.error]
    if stuck:
        notes.append(f"At chance level (<= {100 * (chance + 0.03):.0f}% top-1) or diverged after "
                     f"training: {', '.join(stuck)}.")
    notes.append(common.significance_note(runs, info.num_eval_examples))
    return [n for n in notes if n]


def add_flags(p) -> None:
    common.define_tuple(p, "depths", None, "plain-net depths 6n+2 (default 8,20)", item=int)
    common.define_tuple(p, "activations", ACTIVATIONS, "activations of "
                        "cnn_jax.models.layers.ACTIVATIONS")
    common.add_widths_flag(p)
    flags.DEFINE_bool("norm", True, "train the networks with batch norm after every conv "
                      "(--nonorm: without); gradient norms at init are recorded both ways",
                      flag_values=p)
    flags.DEFINE_enum("init", "gain", ["gain", "lecun"], "gain: N(0, gain^2/fan_in) with the "
                      "activation's gain; lecun: gain 1 for every activation", flag_values=p)


def build_model(args, num_classes: int, depth: int, activation: str, norm: bool,
                widths: Tuple[int, ...]) -> PlainCifarNet:
    gain = GAINS.get(activation, 1.0) if args.init == "gain" else 1.0
    return PlainCifarNet(num_classes=num_classes, depth=depth, widths=widths,
                         activation=activation, use_norm=norm, init_gain=gain)


def init_gradient_norms(model: PlainCifarNet, args, probe) -> Dict[str, float]:
    """||dL/dW|| per layer of a freshly initialized ``model`` (no training)."""
    import optax

    from cnn_jax import train_step as step_lib

    state = step_lib.create_train_state(model, optax.identity(), jax.random.PRNGKey(args.seed),
                                        (args.image_size, args.image_size, 3))
    return {k: float(v) for k, v in jax.jit(kernel_grad_norms)(state, probe).items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    common.quiet_logs()
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    add_flags(parser)
    args = common.parse(parser, argv)
    depths = args.depths or ((8, 14) if args.smoke else (8, 20))
    widths = common.cifar_kwargs(args)["widths"]
    for act in args.activations:
        layers.get_activation(act)  # a clear error for unknown names
    labels = [f"{act}-{depth}" for depth in depths for act in args.activations]
    wanted = set(args.selected) if args.selected else set(labels)
    unknown = wanted - set(labels)
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(labels)}")
    start = time.time()
    info = common.dataset_info(args)
    probe = probe_batch(args)  # also generates `shapes` on first use
    runs, reference = [], []
    for depth in depths:
        for act in args.activations:
            # The other normalization, at initialization only: cheap, so for every network.
            other = not args.norm
            reference.append({
                "label": f"{act}-{depth} ({'BN' if other else 'no BN'}, init only)",
                "activation": act, "depth": depth, "norm": other,
                "norms": init_gradient_norms(build_model(args, info.num_classes, depth, act,
                                                         other, widths), args, probe)})
            label = f"{act}-{depth}"
            if label not in wanted:
                continue
            model = build_model(args, info.num_classes, depth, act, args.norm, widths)
            run = train_one(label, model, args, info, probe)
            run.extra["norm"] = args.norm
            runs.append(run)

    out = args.out or os.path.join(common.RESULTS_ROOT, NAME)
    os.makedirs(out, exist_ok=True)
    common.write_csv(os.path.join(out, "grad_norms.csv"), grad_rows(runs, reference),
                     ("variant", "activation", "depth", "batch_norm", "step", "layer_index",
                      "layer", "grad_norm"))
    setup_extra = [f"- networks: plain, depths {', '.join(map(str, depths))}, widths "
                   f"{','.join(map(str, widths))}, trained {'with' if args.norm else 'without'} "
                   f"batch norm, init `{args.init}`; probe batch of {len(probe['label'])} "
                   f"validation images"]
    plotted = list(depths)
    common.write_standard_results(
        NAME, args, runs, title=TITLE, intro=INTRO,
        observations=observe(runs, reference, args, info), caveats=CAVEATS,
        seconds=time.time() - start,
        extra_tables=[("First-conv / last-conv gradient norm (per-layer values in "
                       "grad_norms.csv)", gradient_table(runs, reference))],
        plot=lambda path: plot(path, runs, reference, plotted), setup_extra=setup_extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
