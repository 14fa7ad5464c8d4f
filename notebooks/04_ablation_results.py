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
# # The ablation experiments
#
# `experiments/` holds one script per idea; each writes `summary.csv`, `curves.csv`, a plot and a
# `README.md` (with the exact command) to `experiments/results/<name>/`. This notebook reads those
# files: it runs nothing but a few table and plot calls, so it shows whatever the last runs of the
# scripts produced (the committed results come from the default commands, sized for a CPU; see
# `experiments/README.md` for the commands that scale them up).

# %%
import os

from IPython.display import Markdown, display
from matplotlib.figure import Figure

from cnn_jax.notebook import repo_root, setup, table

# The test suite runs every notebook with CNN_JAX_NOTEBOOK_SMOKE=1: the same cells, tiny sizes.
SMOKE = setup()

# %%
import csv

from IPython.display import Image

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
    print("not run yet (python -m experiments.<name>):", ", ".join(missing))


# %%
def pct(v):
    return f"{100 * float(v):.1f}%" if v not in ("", None) else "-"


def show(name):
    """The experiment's command, summary table and plot."""
    folder = os.path.join(RESULTS, name)
    with open(os.path.join(folder, "README.md")) as f:
        readme = f.read()
    title = readme.splitlines()[0].lstrip("# ")
    command = readme.split("```bash\n", 1)[1].split("\n```", 1)[0]
    display(Markdown(f"### {title}\n\n`{command}`"))
    rows = read_csv(os.path.join(folder, "summary.csv"))
    display(table(("variant", "params", "steps", "train loss (last epoch)", "val top-1",
                   "best val top-1", "status"),
                  [(r["variant"], f"{int(r['params']):,}", r["steps"],
                    r["train_loss_last_epoch"] or "-", pct(r["val_top1"]),
                    pct(r["best_val_top1"]), r["status"]) for r in rows]))
    display(Image(filename=os.path.join(folder, f"{name}.png"), width=900))
    findings = readme.split("## What these numbers show", 1)[-1].split("##", 1)[0].strip()
    display(Markdown("**What the run shows** (from its README):\n\n" + findings))


# %% [markdown]
# ## 1. Degradation: plain vs residual networks

# %%
show("degradation") if "degradation" in available else None

# %% [markdown]
# ## 2. Batch-norm placement

# %%
show("bn_placement") if "bn_placement" in available else None

# %% [markdown]
# ## 3. Shortcut options A, B, C

# %%
show("shortcuts") if "shortcuts" in available else None

# %% [markdown]
# ## 4. Activations and vanishing gradients
#
# Besides the curves, this experiment stores the gradient norm of every layer (`grad_norms.csv`).
# The ratio between the first and the last conv at initialization is the vanishing-gradient
# factor:

# %%
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
    display(table(("variant", "||g|| first conv", "||g|| last conv", "first / last"), rows))

# %% [markdown]
# ## 5. AlexNet: LRN, dropout, overlapping pooling

# %%
show("alexnet_ablation") if "alexnet_ablation" in available else None

# %% [markdown]
# ## 6. ResNet addition vs DenseNet concatenation

# %%
show("resnet_vs_densenet") if "resnet_vs_densenet" in available else None

# %% [markdown]
# ## All variants at a glance
#
# Final validation top-1 of every variant, per experiment (one seed each; see each README for the noise level):

# %%
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
fig
