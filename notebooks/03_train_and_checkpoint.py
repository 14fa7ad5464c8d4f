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
# # Training on the built-in dataset, with checkpoint save and restore
#
# `shapes` ships with the project: ten classes of filled geometric figures on random backgrounds,
# generated offline on first use into `$TFDS_DATA_DIR` (default `~/tensorflow_datasets`). This
# notebook trains a small CIFAR ResNet on a 2,000-image subset through
# `cnn_jax.train_lib.train_and_evaluate` (the code behind `python -m cnn_jax.train`), stops it half
# way, resumes it from its checkpoint, plots the curves from `metrics.jsonl`, and restores the final
# checkpoint by hand to classify a few validation images.

# %%
import jax
import numpy as np
from matplotlib.figure import Figure

from cnn_jax.notebook import setup

# The test suite runs every notebook with CNN_JAX_NOTEBOOK_SMOKE=1: the same cells, tiny sizes.
SMOKE = setup()

# %%
import tempfile
import warnings

from absl import logging

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

from cnn_jax import configs, input_pipeline, train_lib
from cnn_jax.configs import default
from cnn_jax.datasets.shapes import CLASSES

logging.set_verbosity(logging.ERROR)  # TFDS's notes about custom `shapes` configs

config = default.get_config("resnet20")
config.arch = "resnet20"
# A subset of `shapes` at 32x32 (the name sets the split sizes): seconds to generate.
config.dataset = "shapes/32px_n96_v32" if SMOKE else "shapes/32px_n2000_v500"
config.image_size = 32
# Model options: the config's `model` field (--config.model.widths=... on the command line).
config.model = configs.model_config({"widths": (4, 8, 8), "stage_sizes": (1, 1, 1)} if SMOKE
                                    else {"widths": (8, 16, 32)})
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
print("workdir:", workdir)

# %% [markdown]
# `max_steps_per_run` stops a run after that many steps, with a checkpoint, as a preemption would
# (SIGTERM does the same). Calling `train_and_evaluate` again with the same workdir resumes from the
# latest checkpoint: the same step, optimizer state, rngs and position in the data stream.

# %%
from cnn_jax import optim

steps_per_epoch = optim.steps_per_epoch(info.num_train_examples, config.batch_size)
total_steps = optim.total_train_steps(config, info.num_train_examples, config.batch_size)
config.max_steps_per_run = total_steps // 2
first = train_lib.train_and_evaluate(config, workdir)
print({k: first[k] for k in ("step", "stopped", "total_steps")})
assert first["stopped"] and first["step"] == total_steps // 2

# %%
config.max_steps_per_run = 0
result = train_lib.train_and_evaluate(config, workdir)  # resumes at the saved step
print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
assert not result["stopped"] and result["step"] == total_steps

# %% [markdown]
# The curves, from the `metrics.jsonl` the run wrote (one JSON object per line):

# %%
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
fig

# %% [markdown]
# ## Restoring a checkpoint by hand
#
# `Checkpointer` keeps the last checkpoints plus the best by validation top-1 in
# `<workdir>/checkpoints`; each holds the whole `TrainState` (parameters, batch statistics,
# optimizer state, step, rng) and a JSON record of the run's config. Restoring needs a *target*
# with the right structure: a freshly initialized state of the same model, which
# `train_lib.create_setup` builds from the config.

# %%
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
print("first kernel changed by training:", not np.allclose(fresh, trained))

# %% [markdown]
# The restored model gives the same validation accuracy as the run's last evaluation (`cnn_jax.evaluate` does this from the command line):

# %%
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
assert abs(top1 - evals[-1]["top1"]) <= 1 / len(labels) + 1e-9

# %%
from cnn_jax import preprocessing

n = 8
fig = Figure(figsize=(2 * n, 2.4))
mean, std = np.array(preprocessing.IMAGENET_MEAN), np.array(preprocessing.IMAGENET_STD)
probs = jax.nn.softmax(logits[:n])
for i in range(n):
    ax = fig.add_subplot(1, n, i + 1)
    ax.imshow(np.clip(images[i] * std + mean, 0, 1))  # undo the input normalization
    guess = int(np.argmax(probs[i]))
    title = f"{CLASSES[guess]} {100 * float(probs[i, guess]):.0f}%\n(true: {CLASSES[labels[i]]})"
    ax.set_title(title, fontsize=8, color="green" if guess == labels[i] else "red")
    ax.axis("off")
fig

# %%
import shutil

shutil.rmtree(workdir)  # the temporary run; skip this cell to keep its checkpoints
