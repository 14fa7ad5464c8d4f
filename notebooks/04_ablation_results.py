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
# `python -m experiments.run NAME` trains each experiment's variants over several seeds and writes
# `runs.csv`, `summary.csv` (mean and standard deviation over seeds), `curves.csv`, plots and a
# `README.md` (hypotheses, command, numbers, outcomes) to `experiments/results/<name>/`. This
# notebook reads those files: it runs nothing but a few table and plot calls, so it shows whatever
# the last runs produced (see `experiments/README.md` for which experiments have committed results).

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
EXPERIMENTS = ["activations", "shortcuts", "bn_placement", "degradation", "alexnet_ablation",
               "resnet_vs_densenet"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def has_results(name):
    return os.path.exists(os.path.join(RESULTS, name, "runs.csv"))


available = [n for n in EXPERIMENTS if has_results(n)]
missing = [n for n in EXPERIMENTS if n not in available]
print("results found for:", ", ".join(available) or "none")
if missing:
    print("not run yet (python -m experiments.run NAME):", ", ".join(missing))


# %%
def pm(row, key, percent=True):
    m, s = row.get(f"{key}_mean", ""), row.get(f"{key}_std", "")
    if m in ("", None):
        return "-"
    m, s = float(m), float(s or 0)
    return f"{100 * m:.1f} ± {100 * s:.1f}%" if percent else f"{m:.3f} ± {s:.3f}"


def outcomes_section(readme):
    """The text of a results README's Outcomes section."""
    return readme.split("## Outcomes", 1)[-1].split("\n## ", 1)[0].strip()


def show(name, results=RESULTS):
    """The experiment's command, summary over seeds, plots and outcomes (from ``results``)."""
    folder = os.path.join(results, name)
    with open(os.path.join(folder, "README.md")) as f:
        readme = f.read()
    title = readme.splitlines()[0].lstrip("# ")
    command = readme.split("```bash\n", 1)[1].split("\n```", 1)[0]
    display(Markdown(f"### {title}\n\n`{command}`"))
    rows = read_csv(os.path.join(folder, "summary.csv"))
    display(table(("variant", "params", "seeds", "plateaued", "train loss", "best val top-1",
                   "train - val top-1"),
                  [(r["variant"], f"{int(r['params']):,}", r["seeds"], r["plateaued"],
                    pm(r, "train_loss", percent=False), pm(r, "best_val_top1"), pm(r, "gap"))
                   for r in rows]))
    for png in sorted(f for f in os.listdir(folder) if f.endswith(".png")):
        display(Image(filename=os.path.join(folder, png), width=900))
    display(Markdown("**Outcomes** (from its README):\n\n" + outcomes_section(readme)))


# %%
for name in available:
    show(name)

# %% [markdown]
# ## Beyond the default set's budget
#
# The same command with more seeds than the default set can afford on this 2-core CPU (100
# minutes, at most 30 per experiment): four experiments with six seeds (`--seeds=0,1,2,3,4,5`):
# three whose outcomes were inconclusive with three, degradation (plain32 is bimodal), activations
# and alexnet_ablation, and resnet_vs_densenet, whose outcome with three moved from inconclusive to
# not confirmed when a change of float32 rounding gave its DenseNets other trajectories.

# %%
BEYOND = (("seeds6", "degradation"), ("seeds6", "activations"), ("seeds6", "alexnet_ablation"),
          ("seeds6", "resnet_vs_densenet"))
for folder, name in BEYOND:
    if os.path.exists(os.path.join(RESULTS, folder, name, "runs.csv")):
        show(name, os.path.join(RESULTS, folder))
    else:
        print(f"not run yet: experiments/results/{folder}/{name}")

# %% [markdown]
# ## The same set on a second CPU
#
# The default set again, from one fresh invocation on an AMD EPYC with AVX-512
# (`experiments/results/amd_epyc_avx512/`). XLA:CPU compiles for the CPU it runs on, so every
# run there is another draw of float32 rounding: the seeds' luck drawn again, not a copy of the
# runs above. Best validation top-1 of each variant on both CPUs, and each hypothesis' outcome:

# %%
HOST2 = os.path.join(RESULTS, "amd_epyc_avx512")


def outcomes(folder):
    """{hypothesis: outcome} from the bold headlines of a README's Outcomes section."""
    with open(os.path.join(folder, "README.md")) as f:
        text = outcomes_section(f.read())
    found = {}
    for line in text.splitlines():
        if line.startswith("- **") and ": " in line:
            head = line[4:].split("**", 1)[0].rstrip(".")
            found[head.rsplit(": ", 1)[0]] = head.rsplit(": ", 1)[1]
    return found


top1_rows, outcome_rows = [], []
for name in [n for n in available if os.path.exists(os.path.join(HOST2, n, "summary.csv"))]:
    here = {r["variant"]: r for r in read_csv(os.path.join(RESULTS, name, "summary.csv"))}
    for r in read_csv(os.path.join(HOST2, name, "summary.csv")):
        top1_rows.append((name, r["variant"], pm(here.get(r["variant"], {}), "best_val_top1"),
                          pm(r, "best_val_top1")))
    first, second = outcomes(os.path.join(RESULTS, name)), outcomes(os.path.join(HOST2, name))
    for h, outcome in first.items():
        outcome_rows.append((name, h, outcome, second.get(h, "-"),
                             "same" if second.get(h) == outcome else "**moved**"))
if top1_rows:
    display(table(("experiment", "variant", "best val top-1 (above)", "best val top-1 (AMD EPYC)"),
                  top1_rows))
    display(table(("experiment", "hypothesis", "above", "AMD EPYC", ""), outcome_rows))
else:
    print("no second-CPU set: experiments/results/amd_epyc_avx512/")

# %% [markdown]
# ## All variants at a glance
#
# Best validation top-1 of every variant, mean ± standard deviation over its seeds:

# %%
fig = Figure(figsize=(11, 0.9 + 2.1 * max(1, len(available))))
if not available:
    fig.text(0.5, 0.5, "no results yet: python -m experiments.run all", ha="center")
for i, name in enumerate(available):
    rows = read_csv(os.path.join(RESULTS, name, "summary.csv"))
    ax = fig.add_subplot(max(1, len(available)), 1, i + 1)
    values = [100 * float(r["best_val_top1_mean"] or "nan") for r in rows]
    errors = [100 * float(r["best_val_top1_std"] or 0) for r in rows]
    ax.barh([r["variant"] for r in rows], values, xerr=errors, capsize=3,
            color=[f"C{j}" for j in range(len(rows))])
    for y, v in enumerate(values):
        ax.text(v, y, f"  {v:.1f}%", va="center", fontsize=8)
    ax.set_title(name, fontsize=10, loc="left")
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.tick_params(labelsize=8)
    if i == len(available) - 1:
        ax.set_xlabel("best validation top-1 (%), mean ± std over seeds")
fig.tight_layout()
fig

# %% [markdown]
# ## Degradation at the paper's scale, on a GPU
#
# `experiments/degradation_gpu.py` trains the CIFAR plain nets and ResNets at the paper's widths
# (16-32-64) on 50,000 hard-level `shapes` images with the paper's SGD recipe, the data on the
# device (`bash scripts/gpu_check.sh OUT` on a lent accelerator, its step count fitted to the
# device time). Its committed run, beside the CPU experiment above:

# %%
GPU = os.path.join(RESULTS, "degradation_gpu")
if os.path.exists(os.path.join(GPU, "README.md")):
    with open(os.path.join(GPU, "README.md")) as f:
        gpu_readme = f.read()
    summary = gpu_readme[gpu_readme.index("| variant | seeds |"):].split("\n\n", 1)[0]
    claims = gpu_readme.split("## The paper's claims on these runs", 1)[1].strip()
    display(Markdown(gpu_readme.splitlines()[0].lstrip("# ") + "\n\n"
                     + gpu_readme.split("\n\n")[2] + "\n\n" + summary))
    display(Image(filename=os.path.join(GPU, "curves.png"), width=900))
    display(Markdown("**Outcomes** (from its README):\n\n" + claims))
else:
    print("no GPU run yet: bash scripts/gpu_check.sh OUT on a machine with a GPU")
