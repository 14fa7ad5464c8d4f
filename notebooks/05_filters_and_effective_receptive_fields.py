# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Learned filters and effective receptive fields
#
# Two pictures the papers' ideas call for, from real models: the first-layer filters of an AlexNet
# trained here (Krizhevsky et al. 2012, Fig. 3), and *effective* receptive fields (Luo et al.
# 2016): the gradient of one central output unit with respect to the input, which shows how much
# each input pixel actually moves that unit, inside the theoretical field that
# `cnn_jax.analysis` computes. Regenerate with `python notebooks/execute.py
# 05_filters_and_effective_receptive_fields` (trains the AlexNet once into
# `workdir/notebooks/alexnet_filters`, a few CPU minutes; a re-run reads the checkpoint).

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from cnn_jax.notebook import repo_root, setup

# The test suite runs every notebook with CNN_JAX_NOTEBOOK_SMOKE=1: the same cells, tiny sizes.
SMOKE = setup()

# %% [markdown]
# ## AlexNet's first-layer filters
#
# The registered `alexnet_original` (the paper's layout) with 48 conv1 filters of 11x11x3 (half the
# paper's 96) and narrower later layers, trained through the training command's loop
# (`train_lib.train_and_evaluate`) on the built-in `shapes` at 64 px, 10 epochs. The paper's
# Fig. 3 shows oriented edges, gratings and colour blobs; here the data are flat-coloured figures
# on smooth gradients, so expect edge and colour-contrast detectors. (On the hard level, with its
# gratings, this net and learning rate stayed at chance for 6 epochs.) A trained kernel is its
# initialization plus what training added, and the initialization (white noise, std 0.03 under
# torch's default init, three times the paper's 0.01) can hide what was learned; the third panel
# shows the learned part alone, W - W0.

# %%
import tempfile
import warnings

from absl import logging

from cnn_jax import configs, input_pipeline, loading, train_lib

logging.set_verbosity(logging.ERROR)
warnings.filterwarnings("ignore", message=".*Using custom data configuration.*")
if SMOKE:
    workdir = tempfile.mkdtemp(prefix="alexnet_filters_")
    widths, fc, dataset, epochs, batch = (8, 8, 8, 8, 8), 16, "shapes/64px_n96_v32", 1.0, 16
else:
    workdir = os.path.join(repo_root(), "workdir", "notebooks", "alexnet_filters")
    widths, fc, dataset, epochs, batch = ((48, 64, 96, 96, 64), 512,
                                          "shapes/64px_n5000_v1000", 10.0, 32)
config = configs.load(configs.DEFAULT_CONFIG, "alexnet_original")
configs.apply_overrides(config, {
    "arch": "alexnet_original", "dataset": dataset, "image_size": 64, "num_epochs": epochs,
    "batch_size": batch, "learning_rate": 5e-4, "progress_bar": False, "keep_checkpoints": 1,
    "async_checkpointing": False, "log_every_steps": 50})
config.model = configs.model_config({"widths": widths, "fc_features": fc})
result = train_lib.train_and_evaluate(config, workdir)  # resumes / reads a finished run
print(f"alexnet_original: {result['step']} steps, validation top-1 {100 * result['top1']:.1f}%")

# %%
loaded = loading.load(workdir)
kernel = np.asarray(loaded.variables["params"]["conv1"]["kernel"])  # [11, 11, 3, filters]
print("conv1 kernel", kernel.shape)


def filter_grid(k, cols=12):
    """Each filter scaled to [0, 1] on its own (as the paper's figure), tiled with 1-px gaps."""
    kh, kw, _, n = k.shape
    rows = -(-n // cols)
    grid = np.ones((rows * (kh + 1) + 1, cols * (kw + 1) + 1, 3))
    for i in range(n):
        f = k[..., i]
        f = (f - f.min()) / max(f.max() - f.min(), 1e-8)
        r, c = divmod(i, cols)
        grid[1 + r * (kh + 1):1 + r * (kh + 1) + kh, 1 + c * (kw + 1):1 + c * (kw + 1) + kw] = f
    return grid


# The same initialization as the run's (create_setup with the run's seed).
info = input_pipeline.get_dataset_info(config.dataset, None, image_size=64)
init = train_lib.create_setup(config, info).host_state.params["conv1"]["kernel"]
init = np.asarray(init)
fig = Figure(figsize=(11, 10))
for i, (k, title) in enumerate(((init, "W0, at initialization"),
                                (kernel, f"W, after {loaded.step} steps"),
                                (kernel - init, "W - W0, what training added"))):
    ax = fig.add_subplot(3, 1, i + 1)
    ax.imshow(filter_grid(k, cols=16), interpolation="nearest")
    ax.set_title(f"conv1 filters (11x11x3), {title}", fontsize=10)
    ax.axis("off")
fig

# %%
# How far training moved the filters from their initialization, and how smooth they became
# (high-frequency energy share, above a quarter of the sampling rate: about 0.8 for white noise,
# lower for smooth, oriented filters).
def high_freq_share(k):
    spec = np.abs(np.fft.fft2(k, axes=(0, 1))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(k.shape[0]), np.fft.fftfreq(k.shape[1]), indexing="ij")
    high = (np.hypot(fy, fx) > 0.25)[..., None, None]
    return float((spec * high).sum() / spec.sum())


print(f"relative change ||W - W0|| / ||W0||: "
      f"{np.linalg.norm(kernel - init) / np.linalg.norm(init):.2f}")
print(f"high-frequency energy share: W0 {high_freq_share(init):.2f}, W "
      f"{high_freq_share(kernel):.2f}, W - W0 {high_freq_share(kernel - init):.2f}")

# %% [markdown]
# ## Effective receptive fields: a stack of 3x3 convolutions against one large kernel
#
# VGG (Simonyan & Zisserman 2015, Sec. 2.3) replaces a 7x7 convolution with three 3x3 ones: the
# same theoretical receptive field, fewer weights, more nonlinearities. Luo et al. (2016) show
# that the *effective* field of a stack is not uniform: the number of paths from an input pixel to
# the central output falls off from the centre (a sum of independent steps: Gaussian-like), while
# one 7x7 kernel weighs its 49 taps alike. Below: |d y_centre / d x| averaged over random inputs
# and random (He-normal) initializations, for ReLU stacks of 32 channels.

# %%
import flax.linen as nn


class Stack(nn.Module):
    """Same-padded convolutions (kernel sizes ``kernels``), 32 channels, ReLU between them."""

    kernels: tuple
    width: int = 32

    @nn.compact
    def __call__(self, x):
        for i, k in enumerate(self.kernels):
            x = nn.Conv(self.width, (k, k), padding="SAME", use_bias=False,
                        kernel_init=nn.initializers.he_normal(), name=f"conv{i + 1}")(x)
            if i + 1 < len(self.kernels):
                x = nn.relu(x)
        return x


def erf(apply, variables, x):
    """Mean |gradient| of the central output unit (summed over channels) w.r.t. the input."""
    @jax.jit
    def grad(variables, x):
        def centre(x):
            y = apply(variables, x)
            return y[:, y.shape[1] // 2, y.shape[2] // 2, :].sum()

        return jnp.abs(jax.grad(centre)(x)).mean(axis=(0, 3))

    return grad(variables, x)


SIZE = 33
inits, batch = (2, 2) if SMOKE else (8, 16)
cases = {"one 5x5": (5,), "two 3x3": (3, 3), "one 7x7": (7,), "three 3x3": (3, 3, 3)}
maps = {}
for label, kernels in cases.items():
    model = Stack(kernels)
    acc = 0.0
    for s in range(inits):
        x = jax.random.normal(jax.random.key(100 + s), (batch, SIZE, SIZE, 3))
        variables = jax.jit(model.init)(jax.random.key(s), x[:1])
        acc = acc + erf(model.apply, variables, x)
    maps[label] = np.asarray(acc / inits)

fig = Figure(figsize=(12, 5.6))
c = SIZE // 2
for i, (label, m) in enumerate(maps.items()):
    ax = fig.add_subplot(2, 4, i + 1)
    ax.imshow(m[c - 5:c + 6, c - 5:c + 6], cmap="viridis", interpolation="nearest")
    ax.set_title(f"{label} (theoretical field {sum(k - 1 for k in cases[label]) + 1})",
                 fontsize=9)
    ax.axis("off")
ax = fig.add_subplot(2, 1, 2)
for label, m in maps.items():
    profile = m[c, c - 5:c + 6] / m[c, c - 5:c + 6].max()
    ax.plot(range(-5, 6), profile, "o-", ms=3, label=label)
ax.set_xlabel("horizontal offset from the centre (pixels)")
ax.set_ylabel("|gradient|, centre row (max = 1)")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
fig


# %%
def spread(m):
    """Standard deviation (pixels) of the gradient mass around the centre, along one axis."""
    w = m / m.sum()
    off = np.arange(m.shape[0]) - m.shape[0] // 2
    return float(np.sqrt((w.sum(0) * off ** 2).sum()))


from cnn_jax.notebook import table

rows = [(label, sum(k - 1 for k in cases[label]) + 1, f"{spread(m):.2f}")
        for label, m in maps.items()]
table(("network", "theoretical field", "effective spread (std, px)"), rows)

# %% [markdown]
# With the same theoretical field the stacks concentrate their gradient nearer the centre: the
# 3x3 stack's spread is below the single 7x7 kernel's, and its profile falls off smoothly, where
# the single kernel's is flat up to its edge and then zero.
#
# ## Effective receptive fields of networks of several depths
#
# The CIFAR plain networks and ResNets (`plainN`, `resnetN` with `stage_sizes` for 8, 20 and 44
# layers) at initialization (batch norm in evaluation mode, i.e. identity at init), on 64x64 inputs:
# the gradient of the central unit of the last stage's output. The theoretical field grows by 2
# pixels per 3x3 layer times the stride so far; Luo et al. find the effective field grows like
# the square root of the depth, a shrinking fraction of the theoretical one.

# %%
from cnn_jax import analysis
from cnn_jax.models import create_model


def network_erf(arch, depth, seeds):
    n = (depth - 2) // 6
    model = create_model(arch, num_classes=10, widths=(8, 16, 32), stage_sizes=(n, n, n))
    last = f"layer3_{n - 1}"
    total = 0.0
    for s in seeds:
        x = jax.random.normal(jax.random.key(200 + s), (4, 64, 64, 3))
        variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(s), x[:1])

        def apply(v, x):
            _, state = model.apply(v, x, train=False, mutable=["intermediates"],
                                   capture_intermediates=lambda mdl, _: mdl.name == last)
            return state["intermediates"][last]["__call__"][0]

        total = total + erf(apply, variables, x)
    rf = [r for r in analysis.analyze(model, (1, 64, 64, 3)) if r.kind == "conv"
          and r.name.startswith(last)][-1].rf_size[0]
    return np.asarray(total / len(seeds)), rf


depths = (8, 14) if SMOKE else (8, 20, 44)
seeds = range(1 if SMOKE else 4)
results = {(a, d): network_erf(a, d, seeds) for a in ("plain20", "resnet20") for d in depths}
fig = Figure(figsize=(3.2 * len(depths), 6.4))
for row, arch in enumerate(("plain20", "resnet20")):
    for col, d in enumerate(depths):
        m, rf = results[(arch, d)]
        ax = fig.add_subplot(2, len(depths), row * len(depths) + col + 1)
        ax.imshow(np.log10(m + 1e-12), cmap="magma", interpolation="nearest")
        ax.set_title(f"{'plain' if arch.startswith('plain') else 'resnet'}{d}: theoretical "
                     f"field {rf:g}", fontsize=9)
        ax.axis("off")
fig.suptitle("log10 |d unit / d input| at initialization, 64x64 input", fontsize=10)
fig

# %%
rows = []
for (arch, d), (m, rf) in results.items():
    rows.append((f"{'plain' if arch.startswith('plain') else 'resnet'}{d}", f"{rf:g}",
                 f"{spread(m):.1f}", f"{spread(m) / rf:.3f}"))
table(("network", "theoretical field (px)", "effective spread (std, px)", "spread / field"), rows)
