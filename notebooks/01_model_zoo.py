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
# # A tour of the model zoo
#
# Every network of the project (AlexNet, VGG, GoogLeNet, ResNet, DenseNet and the CIFAR ResNets of
# He et al. 2016) is a Flax Linen module in NHWC, registered by name. This notebook lists them,
# counts their parameters, runs a forward pass in evaluation and in training mode, and shows that
# the ideas of the papers are *options* of the modules: shortcuts, batch-norm placement, local
# response normalization, auxiliary heads, growth rates.

# %%
import jax
import jax.numpy as jnp
from IPython.display import display

from cnn_jax.notebook import setup, table

# The test suite runs every notebook with CNN_JAX_NOTEBOOK_SMOKE=1: the same cells, tiny sizes.
SMOKE = setup()

# %% [markdown]
# ## The registry
#
# `list_models(pattern)` gives the names, `create_model(name, num_classes=None, **overrides)` builds
# one, and `model_info(name)` is what the project knows about it: family, batch norm, minimum and
# default input size, classifier path and torchvision's published top-1/top-5 and GFLOPs.

# %%
from cnn_jax.models import (abstract_variables, count_params, create_model, list_models,
                            model_info, model_options)

names = list_models()
print(len(names), "registered models:")
print(", ".join(names))
print("ResNets:", list_models("resnet*"))


# %% [markdown]
# Parameter counts come from an *abstract* initialization (`abstract_variables`): `jax.eval_shape`
# traces `model.init` without allocating or computing anything, so even VGG-19's 144M parameters
# cost only a trace. The ImageNet networks have exactly torchvision's parameter counts (1000
# classes, 224x224); the CIFAR networks of the papers default to 10 classes and 32x32 inputs.

# %%
shown = ["alexnet", "vgg16", "googlenet", "resnet50", "densenet121", "resnet20"] if SMOKE \
    else names
rows = []
for name in shown:
    model, info = create_model(name), model_info(name)
    size = info.default_input_size
    params = count_params(abstract_variables(model, size)["params"])
    top1 = f"{info.torchvision.top1:g}" if info.torchvision else "-"
    rows.append((name, info.family, "yes" if info.has_batch_norm else "no", model.num_classes,
                 f"{size}x{size}", f"{params:,}", top1))
table(("model", "family", "batch norm", "classes", "input", "parameters",
       "torchvision top-1 %"), rows)

# %% [markdown]
# ## A forward pass
#
# `model.apply(variables, x, train=False)` is deterministic and reads the batch-norm running
# statistics; `train=True` normalizes with the batch's own statistics and returns the updated
# running averages when `batch_stats` is mutable (dropout, where a model has it, then needs a
# `'dropout'` rng).

# %%
size = 32 if SMOKE else 64
model = create_model("resnet18", num_classes=10)
x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
print("variable collections:", list(variables))
print("top-level parameter groups:", list(variables["params"])[:8], "...")

# Jitted: un-jitted, every op would be compiled on its own (hundreds of small compilations).
evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
logits = evaluate(variables, x)
print("eval logits:", logits.shape, logits.dtype)
assert jnp.array_equal(logits, evaluate(variables, x))  # deterministic

logits_train, updates = jax.jit(
    lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
before = variables["batch_stats"]["bn1"]["mean"]
after = updates["batch_stats"]["bn1"]["mean"]
print("bn1 running mean moved by", float(jnp.abs(after - before).max()),
      "(momentum 0.9: 10% of the way to the batch mean)")

# %% [markdown]
# `dtype=jnp.bfloat16` computes in bfloat16 while the parameters stay float32 (mixed precision):

# %%
bf16 = create_model("resnet18", num_classes=10, dtype=jnp.bfloat16)
out = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, x.astype(jnp.bfloat16))
print("logits:", out.dtype, "| parameters:",
      {str(p.dtype) for p in jax.tree_util.tree_leaves(variables["params"])})
difference = jnp.abs(out.astype(jnp.float32) - logits).max()
print("max |bf16 - fp32| logit difference:", float(difference))

# %% [markdown]
# ## The papers' ideas are fields
#
# `model_options` lists what a model can be configured with. For the ResNets: the shortcut options
# A/B/C of He et al. (2016a, Sec. 3.3), the batch-norm placement (`'pre'` is ResNet v2, He et al.
# 2016b), zero-initialized residual branches (Goyal et al. 2017) and `skip=False` for the plain
# networks.

# %%
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
table(("norm_placement", "parameters", "modules outside the blocks", "batch_stats"), rows)

# %% [markdown]
# AlexNet comes in torchvision's single-tower layout (`alexnet`) and the paper's (`alexnet_original`:
# 96-256-384-384-256 filters, two-GPU towers as grouped convolutions, local response normalization).
# LRN has no parameters; the towers halve the weights of the convs that do not see both halves.

# %%
rows = []
for name, overrides in (("alexnet", {}), ("alexnet_original", {}),
                        ("alexnet_original", {"groups": 1}),
                        ("alexnet_original", {"use_lrn": False, "overlapping_pool": False})):
    m = create_model(name, **overrides)
    p = abstract_variables(m, 224)["params"]
    rows.append((name, overrides or "", f"{count_params(p):,}",
                 f"{count_params(p['conv2']):,}", m.use_lrn, m.overlapping_pool))
table(("model", "overrides", "parameters", "conv2 parameters", "LRN", "overlapping pool"),
      rows)

# %% [markdown]
# GoogLeNet's auxiliary classifiers (Szegedy et al. 2015, Sec. 5) exist only in training mode; with
# them the model returns a `GoogLeNetOutputs` tuple that the train step splits with
# `layers.split_logits`. Shapes again come from an abstract call (`jax.eval_shape`).

# %%
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
                     jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)).shape)

# %% [markdown]
# DenseNet's growth rate *k* and block configuration are fields too (`densenet_bc_100` is the CIFAR DenseNet-BC with k=12):

# %%
rows = []
for k in (12, 24) if SMOKE else (12, 24, 32):
    m = create_model("densenet_bc_100")
    m = m.clone(growth_rate=k, num_init_features=2 * k)
    rows.append((f"DenseNet-BC-100, k={k}",
                 f"{count_params(abstract_variables(m, 32)['params']):,}"))
table(("model", "parameters"), rows)

# %% [markdown]
# Mistakes are one-line errors that say what to do:

# %%
for bad in (lambda: create_model("resnet19"), lambda: create_model("resnet20", shortcutt="A"),
            lambda: create_model("resnet20", shortcut="D")):
    try:
        bad()
    except ValueError as e:
        print("ValueError:", str(e)[:160] + ("..." if len(str(e)) > 160 else ""))
