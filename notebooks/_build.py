"""Build the notebooks from the plain-Python cell lists below: ``python notebooks/_build.py``.

Each notebook is a list of ``(kind, source)`` cells, ``kind`` "md" or "code". Editing them here and
rebuilding keeps the .ipynb files reviewable as code. ``--execute`` also runs every notebook top
to bottom with nbclient (kernel ``python3``) and stores the outputs, which is how the committed
outputs were produced; without it the notebooks are written without outputs.

Every notebook reads ``CNN_JAX_NOTEBOOK_SMOKE=1`` in its first cell and then uses tiny sizes:
that is how tests/test_notebooks.py executes them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}

Cells = List[Tuple[str, str]]

SETUP = '''\
import os

# The test suite runs every notebook with CNN_JAX_NOTEBOOK_SMOKE=1: the same cells, tiny sizes.
SMOKE = os.environ.get("CNN_JAX_NOTEBOOK_SMOKE") == "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import io

import jax
import jax.numpy as jnp
import numpy as np
from IPython.display import Markdown, display
from matplotlib.figure import Figure


def figure_png(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


# Figures here are built without pyplot (no global state): show them as PNG images.
get_ipython().display_formatter.formatters["image/png"].for_type(Figure, figure_png)
print(f"JAX {jax.__version__} on {jax.default_backend()}; smoke mode: {SMOKE}")'''

TABLE_HELPER = '''\
def table(header, rows):
    """A list of rows as a markdown table (no pandas needed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return Markdown("\\n".join(lines))'''

# ----------------------------------------------------------------------------------------------
# 1. A tour of the model zoo.

ZOO: Cells = [
    ("md", """\
# A tour of the model zoo

Every network of the project (AlexNet, VGG, GoogLeNet, ResNet, DenseNet and the CIFAR ResNets of
He et al. 2016) is a Flax Linen module in NHWC, registered by name. This notebook lists them,
counts their parameters, runs a forward pass in evaluation and in training mode, and shows that
the ideas of the papers are *options* of the modules: shortcuts, batch-norm placement, local
response normalization, auxiliary heads, growth rates."""),
    ("code", SETUP),
    ("code", TABLE_HELPER),
    ("md", "## The registry\n\n`list_models(pattern)` gives the names, "
           "`create_model(name, num_classes=None, **overrides)` builds one."),
    ("code", '''\
from cnn_jax.models import count_params, create_model, list_models, model_options

names = list_models()
print(len(names), "registered models:")
print(", ".join(names))
print("ResNets:", list_models("resnet*"))'''),
    ("md", """\
Parameter counts come from an *abstract* initialization: `jax.eval_shape` traces `model.init`
without allocating or computing anything, so even VGG-19's 144M parameters cost only a trace. The
ImageNet networks have exactly torchvision's parameter counts (1000 classes, 224x224); the CIFAR
networks of the papers default to 10 classes and 32x32 inputs."""),
    ("code", '''\
def abstract_variables(model, size):
    """Shapes and dtypes of every variable, without computing anything."""
    x = jnp.zeros((1, size, size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


shown = ["alexnet", "vgg16", "googlenet", "resnet50", "densenet121", "resnet20"] if SMOKE \\
    else names
rows = []
for name in shown:
    model = create_model(name)
    size = 32 if model.num_classes == 10 else 224
    params = count_params(abstract_variables(model, size)["params"])
    rows.append((name, type(model).__name__, model.num_classes, f"{size}x{size}", f"{params:,}"))
table(("model", "module", "classes", "input", "parameters"), rows)'''),
    ("md", """\
## A forward pass

`model.apply(variables, x, train=False)` is deterministic and reads the batch-norm running
statistics; `train=True` normalizes with the batch's own statistics and returns the updated
running averages when `batch_stats` is mutable (dropout, where a model has it, then needs a
`'dropout'` rng)."""),
    ("code", '''\
size = 32 if SMOKE else 64
model = create_model("resnet18", num_classes=10)
x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
print("variable collections:", list(variables))
print("top-level parameter groups:", list(variables["params"])[:8], "...")

logits = model.apply(variables, x, train=False)
print("eval logits:", logits.shape, logits.dtype)
assert jnp.array_equal(logits, model.apply(variables, x, train=False))  # deterministic

logits_train, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
before = variables["batch_stats"]["bn1"]["mean"]
after = updates["batch_stats"]["bn1"]["mean"]
print("bn1 running mean moved by", float(jnp.abs(after - before).max()),
      "(momentum 0.9: 10% of the way to the batch mean)")'''),
    ("md", """\
`dtype=jnp.bfloat16` computes in bfloat16 while the parameters stay float32 (mixed precision):"""),
    ("code", '''\
bf16 = create_model("resnet18", num_classes=10, dtype=jnp.bfloat16)
out = bf16.apply(variables, x.astype(jnp.bfloat16), train=False)
print("logits:", out.dtype, "| parameters:",
      {str(p.dtype) for p in jax.tree_util.tree_leaves(variables["params"])})
difference = jnp.abs(out.astype(jnp.float32) - logits).max()
print("max |bf16 - fp32| logit difference:", float(difference))'''),
    ("md", """\
## The papers' ideas are fields

`model_options` lists what a model can be configured with. For the ResNets: the shortcut options
A/B/C of He et al. (2016a, Sec. 3.3), the batch-norm placement (`'pre'` is ResNet v2, He et al.
2016b), zero-initialized residual branches (Goyal et al. 2017) and `skip=False` for the plain
networks."""),
    ("code", '''\
print(model_options(create_model("resnet20")))

rows = []
for overrides in ({"shortcut": "A"}, {"shortcut": "B"}, {"shortcut": "C"}, {"skip": False}):
    v = abstract_variables(create_model("resnet20", **overrides), 32)
    rows.append((overrides, f"{count_params(v['params']):,}",
                 "downsample_conv" in str(jax.tree_util.tree_structure(v["params"]))))
display(table(("resnet20 with", "parameters", "has 1x1 projections"), rows))

rows = []
for place in ("post", "pre", "conv_relu_bn", "none"):
    v = abstract_variables(create_model("resnet20", norm_placement=place), 32)
    rows.append((place, f"{count_params(v['params']):,}",
                 ", ".join(k for k in v["params"] if not k.startswith("layer")),
                 "yes" if v.get("batch_stats") else "no"))
table(("norm_placement", "parameters", "modules outside the blocks", "batch_stats"), rows)'''),
    ("md", """\
AlexNet comes in torchvision's single-tower layout (`alexnet`) and the paper's (`alexnet_original`:
96-256-384-384-256 filters, two-GPU towers as grouped convolutions, local response normalization).
LRN has no parameters; the towers halve the weights of the convs that do not see both halves."""),
    ("code", '''\
rows = []
for name, overrides in (("alexnet", {}), ("alexnet_original", {}),
                        ("alexnet_original", {"groups": 1}),
                        ("alexnet_original", {"use_lrn": False, "overlapping_pool": False})):
    m = create_model(name, **overrides)
    p = abstract_variables(m, 224)["params"]
    rows.append((name, overrides or "", f"{count_params(p):,}",
                 f"{count_params(p['conv2']):,}", m.use_lrn, m.overlapping_pool))
table(("model", "overrides", "parameters", "conv2 parameters", "LRN", "overlapping pool"),
      rows)'''),
    ("md", """\
GoogLeNet's auxiliary classifiers (Szegedy et al. 2015, Sec. 5) exist only in training mode; with
them the model returns a `GoogLeNetOutputs` tuple that the train step splits with
`layers.split_logits`. Shapes again come from an abstract call (`jax.eval_shape`)."""),
    ("code", '''\
from cnn_jax.models.layers import split_logits

g = create_model("googlenet", num_classes=10, aux_logits=True)
size = 224
v = jax.eval_shape(lambda: g.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=True))
out, _ = jax.eval_shape(
    lambda v, x: g.apply(v, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.key(2)}),
    v, jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
print(type(out).__name__, {k: tuple(o.shape) for k, o in out._asdict().items()})
main_logits, aux = split_logits(out)
print("main:", main_logits.shape, "| auxiliary heads:", len(aux))
print("eval mode returns plain logits:",
      jax.eval_shape(lambda v, x: g.apply(v, x, train=False), v,
                     jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)).shape)'''),
    ("md", "DenseNet's growth rate *k* and block configuration are fields too "
           "(`densenet_bc_100` is the CIFAR DenseNet-BC with k=12):"),
    ("code", '''\
rows = []
for k in (12, 24) if SMOKE else (12, 24, 32):
    m = create_model("densenet_bc_100")
    m = m.clone(growth_rate=k, num_init_features=2 * k)
    rows.append((f"DenseNet-BC-100, k={k}",
                 f"{count_params(abstract_variables(m, 32)['params']):,}"))
table(("model", "parameters"), rows)'''),
    ("md", "Mistakes are one-line errors that say what to do:"),
    ("code", '''\
for bad in (lambda: create_model("resnet19"), lambda: create_model("resnet20", shortcutt="A"),
            lambda: create_model("resnet20", shortcut="D")):
    try:
        bad()
    except ValueError as e:
        print("ValueError:", str(e)[:160] + ("..." if len(str(e)) > 160 else ""))'''),
]

# ----------------------------------------------------------------------------------------------
# 2. Receptive fields and parameter counts.

RF: Cells = [
    ("md", """\
# Receptive fields and parameter counts

`cnn_jax.analysis.analyze(model, input_shape)` traces any Flax module (nothing is computed) and
returns, per layer, the output shape, parameters, multiply-accumulates and the receptive field
(size, jump, start; Araujo et al. 2019). `python -m cnn_jax.summary --arch=vgg16` prints the same
for a registered model. This notebook uses it to check, as numbers, the design arguments of the
papers: stacked 3x3 convolutions (VGG), 1x1 bottlenecks (Network in Network, GoogLeNet, ResNet),
DenseNet's channel growth; and it compares every registered model."""),
    ("code", SETUP),
    ("code", TABLE_HELPER),
    ("code", '''\
import flax.linen as nn

from cnn_jax import analysis, summary
from cnn_jax.models import create_model, layers


class Stack(nn.Module):
    """Convolutions applied in sequence, each (kernel, stride, out channels), no bias, ReLU."""

    convs: tuple

    @nn.compact
    def __call__(self, x):
        for i, (k, s, c) in enumerate(self.convs):
            x = nn.relu(layers.Conv(c, k, strides=s, padding=k // 2, use_bias=False,
                                    name=f"conv{i + 1}")(x))
        return x


def describe(label, model, shape):
    a = analysis.analyze(model, shape)
    last = [r for r in a if r.kind == "conv"][-1]
    return (label, f"{a.totals.params:,}", f"{a.totals.macs:,}", last.rf_size[0],
            last.rf_jump[0], "x".join(map(str, last.output_shape[1:])))


HEADER = ("layers", "weights", "MACs", "receptive field", "jump", "output")'''),
    ("md", """\
## Stacks of 3x3 convolutions (Simonyan & Zisserman 2015, Sec. 2.3)

Two stacked 3x3 convolutions see a 5x5 window and three see 7x7, with 2 x 9C² = 18C² and
27C² weights instead of 25C² and 49C², and one or two extra nonlinearities. With C = 64 channels
on a 56x56 map:"""),
    ("code", '''\
C, shape = 64, (1, 56, 56, 64)
rows = [
    describe("one 5x5", Stack(((5, 1, C),)), shape),
    describe("two 3x3", Stack(((3, 1, C),) * 2), shape),
    describe("one 7x7", Stack(((7, 1, C),)), shape),
    describe("three 3x3", Stack(((3, 1, C),) * 3), shape),
]
assert rows[0][3] == rows[1][3] == 5 and rows[2][3] == rows[3][3] == 7
assert analysis.analyze(Stack(((3, 1, C),) * 2), shape).totals.params == 18 * C * C
assert analysis.analyze(Stack(((5, 1, C),)), shape).totals.params == 25 * C * C
table(HEADER, rows)'''),
    ("md", """\
## AlexNet's 11x11 stride-4 stem against 3x3 layers

AlexNet's first layer (Krizhevsky et al. 2012) sees 11x11 windows at stride 4. Three 3x3 layers
with strides 2, 1 and 2 cover the same 11x11 field with the same jump of 4 pixels, with three
nonlinearities instead of one."""),
    ("code", '''\
shape = (1, 224, 224, 3)
rows = [describe("11x11 / 4 (AlexNet conv1)", Stack(((11, 4, 96),)), shape),
        describe("3x3 / 2, 3x3 / 1, 3x3 / 2", Stack(((3, 2, 96), (3, 1, 96), (3, 2, 96))), shape)]
assert rows[0][3] == rows[1][3] == 11 and rows[0][4] == rows[1][4] == 4
table(HEADER, rows)'''),
    ("md", """\
Here the stack is *not* cheaper: the 11x11 layer reads only the 3 input channels, so its 121 taps
per output cost little, while the 3x3 layers read 96 channels, the first of them on a 112x112
map. The 18C² < 25C² argument holds where a layer has as many input as output channels, deep in
the network; in the stem, a stack of small filters buys depth (more nonlinearities) for the same
field and stride, at a higher cost."""),
    ("md", """\
## 1x1 bottlenecks (Lin et al. 2014; Szegedy et al. 2015, Sec. 4)

A 3x3 convolution from 128 to 128 channels holds 3x3x128x128 = 147,456 weights. Reducing to 32
channels with a 1x1 convolution first costs 128x32 + 3x3x32x128 = 40,960 weights, with the same
input, output and receptive field."""),
    ("code", '''\
shape = (1, 28, 28, 128)
rows = [describe("3x3, 128 -> 128", Stack(((3, 1, 128),)), shape),
        describe("1x1 128 -> 32, 3x3 32 -> 128", Stack(((1, 1, 32), (3, 1, 128))), shape)]
assert analysis.analyze(Stack(((3, 1, 128),)), shape).totals.params == 147_456
assert analysis.analyze(Stack(((1, 1, 32), (3, 1, 128))), shape).totals.params == 40_960
assert rows[0][3] == rows[1][3] == 3
table(HEADER, rows)'''),
    ("md", """\
GoogLeNet's Inception modules put such reductions before every 3x3 and 5x5 branch. The rows of
module `inception3a` of the registered `googlenet` (torchvision's layout, whose "5x5" branch is a
3x3; `googlenet_paper` has the true 5x5):"""),
    ("code", '''\
g = analysis.analyze(create_model("googlenet"), (1, 224, 224, 3))
rows = [(r.name, r.kind, "x".join(map(str, r.output_shape[1:])), f"{r.params:,}", f"{r.macs:,}",
         r.rf_size[0] if r.rf_size else "-")
        for r in g.select("inception3a/", kinds=("conv", "max_pool"))]
table(("layer", "kind", "output", "params", "MACs", "RF"), rows)'''),
    ("md", """\
ResNet's bottleneck block (He et al. 2016a, Fig. 5) does the same inside a residual block: on 256
channels, 1x1 (256 -> 64), 3x3 (64 -> 64), 1x1 (64 -> 256) instead of two 3x3 convs of 256
channels. The blocks are the library's own `Bottleneck` and `BasicBlock` modules:"""),
    ("code", '''\
from cnn_jax.models.resnet import BasicBlock, Bottleneck

shape = (1, 56, 56, 256)
rows = []
for label, block in (("two 3x3 (BasicBlock, 256)", BasicBlock(256)),
                     ("1x1-3x3-1x1 (Bottleneck, 64 x 4)", Bottleneck(64))):
    a = analysis.analyze(block, shape)
    convs = [r for r in a if r.kind == "conv"]
    rows.append((label, f"{sum(r.params for r in convs):,}", f"{a.totals.params:,}",
                 f"{a.totals.macs:,}", max(r.rf_size[0] for r in convs)))
table(("block", "conv weights", "all parameters (with BN)", "MACs", "receptive field"), rows)'''),
    ("md", """\
## DenseNet: channel growth and compression (Huang et al. 2017, Sec. 3)

Inside a dense block every layer adds k = 32 feature maps to the concatenation it reads, so the
channels entering the *l*-th layer grow as k0 + (l - 1) k; each transition's 1x1 convolution halves
them (compression 0.5) and its 2x2 average pool halves the resolution."""),
    ("code", '''\
d = analysis.analyze(create_model("densenet121"), (1, 224, 224, 3))
inputs = [r.in_features for r in d if r.kind == "conv" and r.name.endswith("conv1")
          and "denseblock" in r.name]
transitions = [(r.name.split("/")[0], r.in_features, r.out_features) for r in d
               if r.kind == "conv" and "transition" in r.name]
print("channels into the first five 1x1 convs of block 1:", inputs[:5])
assert inputs[:6] == [64 + 32 * i for i in range(6)]
for name, cin, cout in transitions:
    print(f"{name}: {cin} -> {cout} channels")
    assert cout == cin // 2

fig = Figure(figsize=(9, 3.2))
ax = fig.add_subplot(1, 1, 1)
ax.plot(range(1, len(inputs) + 1), inputs, "o-", ms=3)
ax.set_xlabel("dense layer (blocks of 6, 12, 24, 16)")
ax.set_ylabel("input channels")
ax.set_title("DenseNet-121: channels read by each dense layer (drops = transitions)")
ax.grid(alpha=0.3)
fig'''),
    ("md", """\
## How receptive fields grow with depth

The receptive field of each convolution's output in VGG-16 (3x3 stacks, pooling every few layers)
and ResNet-50 (7x7 stride-2 stem and pooling, then bottlenecks). Each 3x3 layer adds two jumps,
each stride doubles the jump: VGG-16's last conv sees 196x196 pixels, ResNet-50's deepest
layers more than the whole 224x224 image (427: fields count the padding, Araujo et al. 2019)."""),
    ("code", '''\
fig = Figure(figsize=(9, 3.6))
ax = fig.add_subplot(1, 1, 1)
for name in ("vgg16", "resnet50"):
    a = summary.analyze_registered(name)
    convs = [r for r in a if r.kind == "conv" and "downsample" not in r.name]
    ax.plot(range(1, len(convs) + 1), [r.rf_size[0] for r in convs], "o-", ms=2.5, label=name)
    print(f"{name}: {len(convs)} convs, the last ({convs[-1].name}) sees "
          f"{convs[-1].rf_size[0]:g}x{convs[-1].rf_size[1]:g} pixels")
ax.axhline(224, color="k", lw=0.8, ls="--", label="input (224)")
ax.set_xlabel("convolution (in program order)")
ax.set_ylabel("receptive field (pixels)")
ax.set_yscale("log")
ax.legend()
ax.grid(alpha=0.3, which="both")
fig'''),
    ("md", """\
## All registered models

`summary.compare_models` analyses every registered model at its default input size (224x224,
CIFAR networks 32x32): depth (longest chain of weight layers), parameters, MACs, and torchvision's
published ImageNet top-1 where torchvision has weights for exactly that layout. In smoke mode only
a few models are analysed."""),
    ("code", '''\
names = ["alexnet", "vgg11", "resnet18", "resnet20", "densenet121"] if SMOKE else None
rows = summary.compare_models(names)
display(Markdown(summary.format_comparison(rows, "markdown")))
summary.plot_comparison(rows)'''),
]

# ----------------------------------------------------------------------------------------------
# 3. Training with checkpoints.

TRAIN: Cells = [
    ("md", """\
# Training on the built-in dataset, with checkpoint save and restore

`shapes` ships with the project: ten classes of filled geometric figures on random backgrounds,
generated offline on first use into `$TFDS_DATA_DIR` (default `~/tensorflow_datasets`). This
notebook trains a small CIFAR ResNet on a 2,000-image subset through
`cnn_jax.train_lib.train_and_evaluate` (the code behind `python -m cnn_jax.train`), stops it half
way, resumes it from its checkpoint, plots the curves from `metrics.jsonl`, and restores the final
checkpoint by hand to classify a few validation images."""),
    ("code", SETUP),
    ("code", '''\
import tempfile
import warnings

from absl import logging

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

from cnn_jax import input_pipeline, train_lib
from cnn_jax.configs import default
from cnn_jax.datasets.shapes import CLASSES

logging.set_verbosity(logging.ERROR)  # TFDS's notes about custom `shapes` configs

config = default.get_config("resnet20")
config.arch = "resnet20"
# A subset of `shapes` at 32x32 (the name sets the split sizes): seconds to generate.
config.dataset = "shapes/32px_n96_v32" if SMOKE else "shapes/32px_n2000_v500"
config.image_size = 32
config.model_kwargs = "widths=(4, 8, 8), stage_sizes=(1, 1, 1)" if SMOKE else "widths=(8, 16, 32)"
config.num_epochs = 1.0 if SMOKE else 4.0
config.batch_size = 16 if SMOKE else 32
# The experiments' short-run recipe (experiments/README.md): AdamW gets further than SGD in a few
# hundred steps.
config.optimizer = "adamw"
config.learning_rate = 3e-3
config.weight_decay = 1e-4
config.warmup_epochs = 0.25
config.augment = "none"  # random crops only slow a run this short down
config.eval_every_steps = 3 if SMOKE else 31  # twice per epoch
config.log_every_steps = 1 if SMOKE else 6
config.progress_bar = False
config.async_checkpointing = False

info = input_pipeline.get_dataset_info(config.dataset, None, image_size=config.image_size)
print(info)
workdir = tempfile.mkdtemp(prefix="cnn_jax_notebook_")
print("workdir:", workdir)'''),
    ("md", """\
`max_steps_per_run` stops a run after that many steps, with a checkpoint, as a preemption would
(SIGTERM does the same). Calling `train_and_evaluate` again with the same workdir resumes from the
latest checkpoint: the same step, optimizer state, rngs and position in the data stream."""),
    ("code", '''\
from cnn_jax import optim

steps_per_epoch = optim.steps_per_epoch(info.num_train_examples, config.batch_size)
total_steps = optim.total_train_steps(config, info.num_train_examples, config.batch_size)
config.max_steps_per_run = total_steps // 2
first = train_lib.train_and_evaluate(config, workdir)
print({k: first[k] for k in ("step", "stopped", "total_steps")})
assert first["stopped"] and first["step"] == total_steps // 2'''),
    ("code", '''\
config.max_steps_per_run = 0
result = train_lib.train_and_evaluate(config, workdir)  # resumes at the saved step
print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
assert not result["stopped"] and result["step"] == total_steps'''),
    ("md", "The curves, from the `metrics.jsonl` the run wrote (one JSON object per line):"),
    ("code", '''\
from cnn_jax import metrics as metrics_lib

train = metrics_lib.read_metrics(workdir, "train")
evals = metrics_lib.read_metrics(workdir, "eval")
print(len(train), "training records,", len(evals), "evaluations; first record:", train[0])

fig = Figure(figsize=(10, 3.4))
ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (per interval)")
ax1.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation")
ax1.set_title("cross-entropy")
ax2.plot([r["step"] for r in train], [100 * r["accuracy"] for r in train], label="train")
ax2.plot([r["step"] for r in evals], [100 * r["top1"] for r in evals], "o-", label="validation")
ax2.set_title("top-1 (%)")
for ax in (ax1, ax2):
    ax.axvline(total_steps // 2, color="k", lw=0.8, ls=":", label="stop / resume")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig'''),
    ("md", """\
## Restoring a checkpoint by hand

`Checkpointer` keeps the last checkpoints plus the best by validation top-1 in
`<workdir>/checkpoints`; each holds the whole `TrainState` (parameters, batch statistics,
optimizer state, step, rng) and a JSON record of the run's config. Restoring needs a *target*
with the right structure: a freshly initialized state of the same model, which
`train_lib.create_setup` builds from the config."""),
    ("code", '''\
from cnn_jax import checkpoint as ckpt_lib

checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
print("checkpoints at steps", checkpointer.all_steps(), "| best:", checkpointer.best_step())
setup = train_lib.create_setup(config, info)
state, meta, step = checkpointer.restore(setup.host_state)
checkpointer.close()
print("restored step", step, "| arch", meta["arch"], "| dataset", meta["dataset"])
assert int(state.step) == total_steps
fresh = jax.tree_util.tree_leaves(setup.host_state.params)[0]
trained = jax.tree_util.tree_leaves(state.params)[0]
print("first kernel changed by training:", not np.allclose(fresh, trained))'''),
    ("md", "The restored model gives the same validation accuracy as the run's last evaluation "
           "(`cnn_jax.evaluate` does this from the command line):"),
    ("code", '''\
images, labels = [], []
for batch in input_pipeline.create_eval_iterator(config.dataset, None, 100, config.image_size,
                                                 num_local_devices=1, process_index=0,
                                                 process_count=1):
    keep = batch["mask"][0].astype(bool)
    images.append(batch["image"][0][keep])
    labels.append(batch["label"][0][keep])
images, labels = np.concatenate(images), np.concatenate(labels)

model = setup.model
variables = {"params": state.params, "batch_stats": state.batch_stats}
logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
top1 = float(np.mean(np.argmax(logits, -1) == labels))
print(f"restored checkpoint: top-1 {100 * top1:.2f}% on {len(labels)} validation images; "
      f"the run reported {100 * evals[-1]['top1']:.2f}%")
# Other batch shapes may round differently: allow one image to flip on a near tie.
assert abs(top1 - evals[-1]["top1"]) <= 1 / len(labels) + 1e-9'''),
    ("code", '''\
from cnn_jax import preprocessing

n = 8
fig = Figure(figsize=(2 * n, 2.4))
mean, std = np.array(preprocessing.IMAGENET_MEAN), np.array(preprocessing.IMAGENET_STD)
probs = jax.nn.softmax(logits[:n])
for i in range(n):
    ax = fig.add_subplot(1, n, i + 1)
    ax.imshow(np.clip(images[i] * std + mean, 0, 1))  # undo the input normalization
    guess = int(np.argmax(probs[i]))
    title = f"{CLASSES[guess]} {100 * float(probs[i, guess]):.0f}%\\n(true: {CLASSES[labels[i]]})"
    ax.set_title(title, fontsize=8, color="green" if guess == labels[i] else "red")
    ax.axis("off")
fig'''),
    ("code", '''\
import shutil

shutil.rmtree(workdir)  # the temporary run; skip this cell to keep its checkpoints'''),
]

# ----------------------------------------------------------------------------------------------
# 4. Ablation results.

ABLATIONS: Cells = [
    ("md", """\
# The ablation experiments

`experiments/` holds one script per idea; each writes `summary.csv`, `curves.csv`, a plot and a
`README.md` (with the exact command) to `experiments/results/<name>/`. This notebook reads those
files: it runs nothing but a few table and plot calls, so it shows whatever the last runs of the
scripts produced (the committed results come from the default commands, sized for a CPU; see
`experiments/README.md` for the commands that scale them up)."""),
    ("code", SETUP),
    ("code", TABLE_HELPER),
    ("code", '''\
import csv
import glob

from IPython.display import Image


def repo_root(start="."):
    """The repository root: the first parent folder that holds experiments/."""
    path = os.path.abspath(start)
    while not os.path.isdir(os.path.join(path, "experiments")):
        parent = os.path.dirname(path)
        if parent == path:
            raise FileNotFoundError("run this notebook inside the cnn_jax repository")
        path = parent
    return path


RESULTS = os.path.join(repo_root(), "experiments", "results")
EXPERIMENTS = ["degradation", "bn_placement", "shortcuts", "activations", "alexnet_ablation",
               "resnet_vs_densenet"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


available = [n for n in EXPERIMENTS if os.path.exists(os.path.join(RESULTS, n, "summary.csv"))]
missing = [n for n in EXPERIMENTS if n not in available]
print("results found for:", ", ".join(available) or "none")
if missing:
    print("not run yet (python -m experiments.<name>):", ", ".join(missing))'''),
    ("code", '''\
def pct(v):
    return f"{100 * float(v):.1f}%" if v not in ("", None) else "-"


def show(name):
    """The experiment's command, summary table and plot."""
    folder = os.path.join(RESULTS, name)
    with open(os.path.join(folder, "README.md")) as f:
        readme = f.read()
    title = readme.splitlines()[0].lstrip("# ")
    command = readme.split("```bash\\n", 1)[1].split("\\n```", 1)[0]
    display(Markdown(f"### {title}\\n\\n`{command}`"))
    rows = read_csv(os.path.join(folder, "summary.csv"))
    display(table(("variant", "params", "steps", "train loss (last epoch)", "val top-1",
                   "best val top-1", "status"),
                  [(r["variant"], f"{int(r['params']):,}", r["steps"],
                    r["train_loss_last_epoch"] or "-", pct(r["val_top1"]),
                    pct(r["best_val_top1"]), r["status"]) for r in rows]))
    display(Image(filename=os.path.join(folder, f"{name}.png"), width=900))
    findings = readme.split("## What these numbers show", 1)[-1].split("##", 1)[0].strip()
    display(Markdown("**What the run shows** (from its README):\\n\\n" + findings))'''),
    ("md", "## 1. Degradation: plain vs residual networks"),
    ("code", 'show("degradation") if "degradation" in available else None'),
    ("md", "## 2. Batch-norm placement"),
    ("code", 'show("bn_placement") if "bn_placement" in available else None'),
    ("md", "## 3. Shortcut options A, B, C"),
    ("code", 'show("shortcuts") if "shortcuts" in available else None'),
    ("md", """\
## 4. Activations and vanishing gradients

Besides the curves, this experiment stores the gradient norm of every layer (`grad_norms.csv`).
The ratio between the first and the last conv at initialization is the vanishing-gradient
factor:"""),
    ("code", '''\
if "activations" in available:
    show("activations")
    g = read_csv(os.path.join(RESULTS, "activations", "grad_norms.csv"))
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in g):
        init = {int(r["layer_index"]): float(r["grad_norm"]) for r in g
                if r["variant"] == variant and r["step"] == "0"}
        last_conv = max(init) - 1  # the last index is the dense layer
        rows.append((variant, f"{init[1]:.3g}", f"{init[last_conv]:.3g}",
                     f"{init[1] / init[last_conv]:.3g}"))
    display(table(("variant", "||g|| first conv", "||g|| last conv", "first / last"), rows))'''),
    ("md", "## 5. AlexNet: LRN, dropout, overlapping pooling"),
    ("code", 'show("alexnet_ablation") if "alexnet_ablation" in available else None'),
    ("md", "## 6. ResNet addition vs DenseNet concatenation"),
    ("code", 'show("resnet_vs_densenet") if "resnet_vs_densenet" in available else None'),
    ("md", "## All variants at a glance\n\nFinal validation top-1 of every variant, per "
           "experiment (one seed each; see each README for the noise level):"),
    ("code", '''\
fig = Figure(figsize=(11, 0.9 + 2.1 * max(1, len(available))))
if not available:
    fig.text(0.5, 0.5, "no results yet: python -m experiments.run_all", ha="center")
for i, name in enumerate(available):
    rows = read_csv(os.path.join(RESULTS, name, "summary.csv"))
    ax = fig.add_subplot(max(1, len(available)), 1, i + 1)
    values = [100 * float(r["val_top1"] or "nan") for r in rows]
    ax.barh([r["variant"] for r in rows], values, color=[f"C{j}" for j in range(len(rows))])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.1f}%", va="center", fontsize=8)
    ax.set_title(name, fontsize=10, loc="left")
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.tick_params(labelsize=8)
    if i == len(available) - 1:
        ax.set_xlabel("final validation top-1 (%)")
fig.tight_layout()
fig'''),
]

NOTEBOOKS: Dict[str, Cells] = {
    "01_model_zoo.ipynb": ZOO,
    "02_receptive_fields.ipynb": RF,
    "03_train_and_checkpoint.ipynb": TRAIN,
    "04_ablation_results.ipynb": ABLATIONS,
}


def build(cells: Cells):
    """An nbformat v4 notebook (no outputs) from a cell list."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNEL)
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in cells:
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        elif kind == "code":
            nb.cells.append(nbformat.v4.new_code_cell(source))
        else:
            raise ValueError(f"unknown cell kind {kind!r}: use 'md' or 'code'")
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: rebuilding changes nothing when cells do not
    nbformat.validate(nb)
    return nb


def execute(nb, timeout: int = 1200):
    """Run a notebook top to bottom in ``notebooks/`` with the python3 kernel; returns it."""
    from nbclient import NotebookClient

    NotebookClient(nb, kernel_name="python3", timeout=timeout,
                   resources={"metadata": {"path": HERE}}).execute()
    return nb


def main(argv: Sequence[str] = None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true",
                        help="run each notebook and store its outputs")
    parser.add_argument("--only", default="", help="comma-separated notebook file names")
    args = parser.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    for name, cells in NOTEBOOKS.items():
        if only and name not in only:
            continue
        nb = build(cells)
        if args.execute:
            start = time.time()
            execute(nb)
            print(f"executed {name} in {time.time() - start:.0f} s", file=sys.stderr)
        nbformat.write(nb, os.path.join(HERE, name))
        print(f"wrote notebooks/{name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
