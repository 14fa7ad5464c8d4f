"""Activation and depth: ReLU vs tanh vs sigmoid, the gradient norm of every layer.

A plain CIFAR network (He et al. 2016, Sec. 4.2: a 3x3 conv stem, three stages of 2n 3x3 convs,
global pooling, one dense layer; 6n + 2 weight layers) with a configurable activation, registered
here as ``plain_act`` so that it trains through the training command's loop. The per-layer
gradient norms ``||dL/dW||`` on a fixed batch are a hook the loop calls at step 0 and at every
evaluation (:class:`GradNormHook`); at initialization they are also measured for every depth and
activation without training. ``python -m experiments.run activations``.
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.models import layers, list_models, register_model
from experiments import common

NAME = "activations"
ACTIVATIONS = ("relu", "tanh", "sigmoid")
# torch.nn.init.calculate_gain: the weight scale that keeps activations' variance per layer.
GAINS = {"relu": 2 ** 0.5, "tanh": 5.0 / 3.0, "sigmoid": 1.0, "identity": 1.0}
INIT_DEPTHS = (8, 20, 32)
SMOKE_INIT_DEPTHS = (8, 14)
TRAINED_DEPTH = 8  # cheap: the CPU budget goes to the depth comparisons at init
VANISHED = 1e-2  # first/last-conv gradient ratio below this: vanished
HEALTHY = 0.1


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


if "plain_act" not in list_models():
    @register_model(family="plain_act", has_batch_norm=True, min_input_size=8,
                    default_input_size=32, classifier=("fc",),
                    paper="He et al. 2016, Sec. 4.2 (plain net), any activation")
    def plain_act(**kw):
        return PlainCifarNet(**kw)


def layer_names(depth: int) -> List[str]:
    return [f"conv{i}" for i in range(1, depth)] + ["fc"]


def kernel_grad_norms(state, images, labels) -> Dict[str, jax.Array]:
    """||dL/dW|| per layer kernel (train mode: batch statistics; cross-entropy)."""
    return _kernel_grad_norms(state.apply_fn, state.params, state.batch_stats, images, labels)


# Jitted on the model's apply alone, not the whole train state: a state's optimizer is a new
# object in every state, so each seed's state at initialization compiled the same program again.
@partial(jax.jit, static_argnums=0)
def _kernel_grad_norms(apply_fn, params, batch_stats, images, labels) -> Dict[str, jax.Array]:
    import optax

    from cnn_jax.train_step import global_norm

    def loss_fn(params):
        logits, _ = apply_fn({"params": params, "batch_stats": batch_stats},
                             images, train=True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    grads = jax.grad(loss_fn)(params)
    norms = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[-1] == "kernel":
            norms[keys[0]] = global_norm(g)
    return norms


class GradNormHook:
    """Per-layer ||dL/dW|| on a fixed batch, at step 0 and every evaluation: split
    ``grad_norms`` of metrics.jsonl (one key per layer)."""

    def __init__(self, images, labels, max_images: int = 256):
        self.images, self.labels = images[:max_images], labels[:max_images]

    def norms(self, state) -> Dict[str, float]:
        return {k: float(v) for k, v in kernel_grad_norms(state, self.images, self.labels).items()}

    def __call__(self, event) -> None:
        event.write("grad_norms", self.norms(event.state))


def ratio(norms: Dict[str, float], depth: int) -> float:
    """||dL/dW|| of the first conv over that of the last conv: << 1 means vanishing."""
    return float(norms["conv1"]) / max(float(norms[f"conv{depth - 1}"]), 1e-30)


def model_overrides(activation: str, depth: int, widths, norm: bool) -> Dict[str, Any]:
    return {"arch": "plain_act", "model": {"depth": depth, "widths": tuple(widths),
                                           "activation": activation, "use_norm": norm,
                                           "init_gain": GAINS[activation]}}


def init_norms(results: common.Results, activation: str, depth: int, norm: bool, seed: int,
               images, labels) -> Dict[str, float]:
    """The per-layer gradient norms of a freshly initialized network (no training): the
    initialization of the training loop (``train_step.create_train_state``, same seed)."""
    import optax

    from cnn_jax import configs, train_step
    from cnn_jax.models import create_model

    config = results.config()
    common.apply(config, model_overrides(activation, depth, results.exp.extra["widths"], norm))
    options = (config.arch, results.extra["num_classes"],
               tuple(sorted(configs.model_options(config).items())))
    if options not in _INIT_MODELS:  # one model object per network: its seeds share a program
        _INIT_MODELS[options] = create_model(options[0], num_classes=options[1],
                                             **dict(options[2]))
    state = train_step.create_train_state(_INIT_MODELS[options], optax.identity(),
                                          jax.random.PRNGKey(seed),
                                          (config.image_size, config.image_size, 3))
    return GradNormHook(images, labels).norms(state)


_INIT_MODELS: Dict[tuple, nn.Module] = {}


_INIT_CACHE: Dict[tuple, Dict[str, float]] = {}


def analyse(results: common.Results, out: str) -> List[Tuple[str, str]]:
    """Gradient norms at initialization (every depth x activation, without and with BN, every
    seed) and of the trained runs; grad_norms.csv, grad_norms.png and the ratio table."""
    from cnn_jax import input_pipeline

    exp = results.exp
    config = results.config()
    results.extra["num_classes"] = input_pipeline.get_dataset_info(
        config.dataset, config.data_dir or None, image_size=config.image_size).num_classes
    images, labels = common.probe_batch(config, 256)  # the hook's batch in the trained runs
    rows, init = [], {}
    seeds = sorted({r.seed for r in results.runs}) or list(exp.seeds)
    for norm in exp.extra["init_norms"]:
        for depth in exp.extra["init_depths"]:
            for act in exp.extra["activations"]:
                for seed in seeds:
                    key = (act, depth, norm, seed, config.dataset, config.data_dir)
                    if key not in _INIT_CACHE:  # partial writes come back here after each seed
                        _INIT_CACHE[key] = init_norms(results, act, depth, norm, seed, images,
                                                      labels)
                    norms = _INIT_CACHE[key]
                    init[(act, depth, norm, seed)] = norms
                    rows += [{"source": "init", "activation": act, "depth": depth,
                              "batch_norm": norm, "seed": seed, "step": 0, "layer_index": i,
                              "layer": n, "grad_norm": norms[n]}
                             for i, n in enumerate(layer_names(depth), 1)]
    for r in results.runs:
        depth, act = exp.extra["trained_depth"], r.variant
        for rec in r.split("grad_norms"):
            rows += [{"source": "trained", "activation": act, "depth": depth, "batch_norm": True,
                      "seed": r.seed, "step": rec["step"], "layer_index": i, "layer": n,
                      "grad_norm": rec[n]} for i, n in enumerate(layer_names(depth), 1)]
    common.write_csv(os.path.join(out, "grad_norms.csv"), rows)
    results.extra["init"] = init

    table = []
    for depth in exp.extra["init_depths"]:
        for act in exp.extra["activations"]:
            cells = [f"{act}", f"{depth}"]
            for norm in exp.extra["init_norms"]:
                vals = [ratio(init[(act, depth, norm, s)], depth) for s in seeds]
                cells.append(_geo(vals))
            table.append(cells)
    header = ["activation", "depth"] + [("with BN" if n else "no BN")
                                         for n in exp.extra["init_norms"]]
    plot_grad_norms(os.path.join(out, "grad_norms.png"), exp, init, seeds)
    return [("First-conv / last-conv gradient norm at initialization (geometric mean [min, max] "
             "over seeds; per-layer values in grad_norms.csv)",
             common.markdown_table(header, table))]


def _geo(values: Sequence[float]) -> str:
    v = [x for x in values if x > 0]
    if not v:
        return "0 (float32 underflow)" if values else "-"
    g = math.exp(sum(math.log(x) for x in v) / len(v))
    return f"{g:.2g} [{min(v):.2g}, {max(v):.2g}]"


def plot_grad_norms(path: str, exp: common.Experiment, init, seeds) -> None:
    depths = exp.extra["init_depths"]
    fig, axes = common.new_figure(len(depths), 1, width=4.6, height=3.6)
    for ax, depth in zip(axes, depths):
        names = layer_names(depth)
        for i, act in enumerate(exp.extra["activations"]):
            for norm in exp.extra["init_norms"]:
                ls = ":" if norm else "-"
                per_seed = np.array([[init[(act, depth, norm, s)][n] for n in names]
                                     for s in seeds])
                logs = np.log10(np.maximum(per_seed, 1e-30))
                m, sd = logs.mean(0), logs.std(0)
                x = np.arange(1, len(names) + 1)
                ax.plot(x, 10 ** m, color=f"C{i}", ls=ls, lw=1.3,
                        label=f"{act}{', BN' if norm else ''}")
                ax.fill_between(x, 10 ** (m - sd), 10 ** (m + sd), color=f"C{i}", alpha=0.12)
        ax.set_yscale("log")
        ax.set_title(f"depth {depth}: ||dL/dW|| per layer at init", fontsize=9.5)
        ax.set_xlabel("layer (1 = first conv, last = fc)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=6.5)
    common.save(fig, path)


def _vanishing(results: common.Results) -> common.Outcome:
    init, exp = results.extra["init"], results.exp
    seeds = sorted({k[3] for k in init})
    shallow, deep = exp.extra["init_depths"][0], exp.extra["init_depths"][-1]

    def geo(act, depth):  # a first-layer gradient that underflows to 0 counts as 1e-30
        v = [ratio(init[(act, depth, False, s)], depth) for s in seeds]
        return math.exp(sum(math.log(max(x, 1e-30)) for x in v) / len(v))

    parts = [f"{a}: {geo(a, shallow):.2g} at depth {shallow} -> {geo(a, deep):.2g} at depth "
             f"{deep}" for a in exp.extra["activations"]]
    text = "first/last-conv gradient ratio without BN (geometric mean over seeds), " + \
        "; ".join(parts) + f". Vanished: below {VANISHED:g}; healthy: above {HEALTHY:g}."
    acts = exp.extra["activations"]
    relu_ok = "relu" not in acts or geo("relu", deep) > HEALTHY
    sig = "sigmoid" not in acts or (geo("sigmoid", deep) < VANISHED and
                                    geo("sigmoid", deep) < geo("sigmoid", shallow))
    tanh = "tanh" not in acts or geo("tanh", deep) < VANISHED
    if relu_ok and sig and tanh:
        return common.Outcome("confirmed", text)
    if relu_ok and sig:
        return common.Outcome("not confirmed", text + " Sigmoid's gradients vanish "
                              "exponentially with depth and ReLU's do not, but tanh with its "
                              "gain-5/3 initialization keeps its gradients: the claim holds "
                              "for the sigmoid, not for a well-initialized tanh.")
    return common.Outcome("not confirmed", text)


def get_experiment(smoke: bool = False) -> common.Experiment:
    widths = (4, 8, 8) if smoke else (8, 16, 32)
    acts = ("relu", "sigmoid") if smoke else ACTIVATIONS
    depth = 8 if smoke else TRAINED_DEPTH
    variants = {a: model_overrides(a, depth, widths, norm=True) for a in acts}
    exp = common.Experiment(
        name=NAME, title="Activation and depth: ReLU vs tanh vs sigmoid, per-layer gradient "
        "norms",
        intro="""\
Saturating nonlinearities shrink gradients on their way back through a deep network: the
sigmoid's derivative is at most 1/4 and its outputs are not centred, tanh saturates for large
inputs, while the ReLU passes the gradient unchanged wherever it is active (Glorot & Bengio 2010;
Krizhevsky et al. 2012, Sec. 3.1, Fig. 1: a ReLU network reaches 25% CIFAR-10 training error six
times faster than a tanh one). The networks are plain CIFAR nets of 6n+2 layers (`plain_act`,
registered by experiments/activations.py); each activation gets the initialization suited to it
(N(0, gain^2 / fan_in) with torch's gains sqrt(2) for ReLU, 5/3 for tanh and 1 for sigmoid), so
that what differs is the nonlinearity, not a badly scaled init. ||dL/dW|| of each layer's kernel
is measured on a fixed batch of 256 training images (centre crops; the loss in train mode): at
initialization for every depth and activation, without and with batch norm, over the seeds; and during training by a hook
of the training loop for the trained networks (with batch norm).""",
        config=common.recipe(smoke, arch="plain_act"), variants=variants,
        seeds=(0,) if smoke else (0, 1, 2), default_variants=("sigmoid",) if smoke else None,
        hooks=lambda config, images, labels: [GradNormHook(images, labels)],
        analyse=analyse,
        extra={"widths": widths, "activations": acts, "trained_depth": depth,
               "init_norms": (False,) if smoke else (False, True),
               "init_depths": SMOKE_INIT_DEPTHS if smoke else INIT_DEPTHS},
        hypotheses=[
            common.Hypothesis(
                "H1 saturating gradients vanish with depth",
                "Without normalization, sigmoid and tanh gradients shrink layer by layer on the "
                "way back, so the first layers of deep nets get vanishing gradients, while "
                "ReLU's do not (Glorot & Bengio 2010).",
                f"at initialization without BN, the first/last-conv gradient ratio at depth "
                f"{(SMOKE_INIT_DEPTHS if smoke else INIT_DEPTHS)[-1]} is below {VANISHED:g} "
                f"for sigmoid and tanh and falls with depth, and stays above {HEALTHY:g} for "
                "ReLU.", _vanishing),
            common.Hypothesis(
                "H2 ReLU trains faster",
                "ReLU networks train several times faster than tanh networks (Krizhevsky et al. "
                "2012, Fig. 1).",
                f"with batch norm at depth {depth}, the training loss of 'relu' at the end is "
                "below that of 'tanh' (CI of relu - tanh below 0).",
                lambda r: common.greater(r, "relu", "tanh" if "tanh" in r.labels else "sigmoid",
                                         "train_loss", percent=False, confirmed_if="less"),
                "python -m experiments.run activations --config.dataset=cifar10 "
                "--config.num_epochs=30 --config.batch_size=128 --config.augment=''"),
        ],
        caveats=[
            "Gradient norms are of one fixed batch per initialization; the first/last ratio "
            "compares layers within one network (their sizes differ, so a ratio of exactly 1 "
            "is not the expectation even without vanishing).",
            "The trained networks have batch norm (without it none of these plain nets left "
            "chance level within a CPU budget when the recipe was chosen), which removes most "
            "of the vanishing; H2 then measures the nonlinearity's effect on speed only.",
        ])
    return exp
