"""Each convolution of a network alone, cnn_jax's ``layers.conv2d`` against torch's ``Conv2d`` on
the same CPU (``python -m cnn_jax.benchmark --compare=torch --layers --arch=resnet50``).

Where a whole train step is slower than torch's, this says which layers make the difference. The
network's convolution shapes come from tracing its forward pass with XLA's convolutions
(``layers.implementation("xla")``: each is one ``conv_general_dilated`` with its input and kernel
shapes, strides, padding and groups); each distinct shape is timed once and weighted by how
often the network has it. Per shape, alternating (cnn_jax, torch, cnn_jax, ...; medians): the
forward pass, and the forward pass with both gradients (the input gradient left out for the
first convolution, whose input is the image), torch channels-last; float32, or bfloat16 (cnn_jax's
operands in bf16 as its ``--dtype=bfloat16`` networks have them, torch's fp32 layer under
``torch.autocast``, as ``--compare=torch`` runs both). Batch norm, ReLU, pooling and the
classifier are not in it.
"""

from __future__ import annotations

import collections
import statistics
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from cnn_jax import benchmark_torch


class Conv(NamedTuple):
    """One convolution's shape, as the forward pass traced it (NHWC input, HWIO kernel)."""

    input_shape: Tuple[int, ...]
    kernel_shape: Tuple[int, ...]
    strides: Tuple[int, int]
    padding: Tuple[Tuple[int, int], Tuple[int, int]]
    groups: int

    def label(self) -> str:
        kh, kw, c, o = self.kernel_shape
        c *= self.groups
        stride = "" if self.strides == (1, 1) else f"/{self.strides[0]}"
        group = "" if self.groups == 1 else f", {self.groups} groups"
        return (f"{kh}x{kw}{stride} {c}->{o} at {self.input_shape[1]}x{self.input_shape[2]}"
                f"{group}")


def _sub_jaxprs(params) -> List[Any]:
    out = []
    for value in params.values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(v, "eqns"):
                out.append(v)
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                out.append(v.jaxpr)
    return out


def convolutions(arch: str, batch_size: int, image_size: int,
                 num_classes: int = 1000) -> List[Tuple[Conv, int]]:
    """The distinct convolutions of ``arch``'s eval forward pass, in the order the network first
    applies them, with how many times it applies each."""
    import jax
    import jax.numpy as jnp

    from cnn_jax.models import abstract_variables, create_model, layers

    model = create_model(arch, num_classes=num_classes)
    x = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    variables = abstract_variables(model, image_size)
    with layers.implementation("xla"):
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    counts: Dict[Conv, int] = collections.OrderedDict()

    def walk(j) -> None:
        for eqn in j.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                if (p["lhs_dilation"] != (1, 1) or p["rhs_dilation"] != (1, 1)
                        or p["batch_group_count"] != 1):
                    raise ValueError(f"{arch}: a dilated convolution; --layers times plain ones")
                conv = Conv(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
                            tuple(p["window_strides"]), tuple(map(tuple, p["padding"])),
                            p["feature_group_count"])
                counts[conv] = counts.get(conv, 0) + 1
            for sub in _sub_jaxprs(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return list(counts.items())


def _jax_fns(conv: Conv, grad_input: bool, rng, dtype: str) -> Tuple[Callable, Callable]:
    import jax

    from cnn_jax.models import layers

    x = jax.device_put(rng.standard_normal(conv.input_shape, "float32").astype(dtype))
    w = jax.device_put((0.05 * rng.standard_normal(conv.kernel_shape, "float32")).astype(dtype))

    def f(x, w):
        return layers.conv2d(x, w, conv.strides, conv.padding, conv.groups)

    g = jax.device_put(
        rng.standard_normal(jax.eval_shape(f, x, w).shape, "float32").astype(dtype))
    fwd = jax.jit(f)

    @jax.jit
    def train(x, w, g):
        if grad_input:
            y, vjp = jax.vjp(f, x, w)
        else:
            y, vjp = jax.vjp(lambda w_: f(x, w_), w)
        return y, vjp(g)

    return (lambda: jax.block_until_ready(fwd(x, w)),
            lambda: jax.block_until_ready(train(x, w, g)))


def _torch_fns(torch, conv: Conv, grad_input: bool, rng,
               dtype: str) -> Tuple[Callable, Callable]:
    (top, bottom), (left, right) = conv.padding
    if top != bottom or left != right:
        raise ValueError(f"{conv.label()}: asymmetric padding {conv.padding}; torch's Conv2d "
                         "pads both sides alike")
    kh, kw, c, o = conv.kernel_shape
    layer = torch.nn.Conv2d(c * conv.groups, o, (kh, kw), conv.strides, (top, left),
                            groups=conv.groups, bias=False).to(memory_format=torch.channels_last)
    x = torch.from_numpy(rng.standard_normal(conv.input_shape, "float32")).permute(
        0, 3, 1, 2).contiguous(memory_format=torch.channels_last).requires_grad_(grad_input)
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    with torch.no_grad(), autocast():
        g = torch.randn_like(layer(x))

    def fwd():
        with torch.no_grad(), autocast():
            layer(x)

    def train():
        layer.weight.grad = x.grad = None
        with autocast():
            y = layer(x)
        y.backward(g)

    return fwd, train


def compare(arch: str, batch_size: int, image_size: int, num_classes: int = 1000,
            steps: int = 5, warmup: int = 2,
            progress: Optional[Callable[[str], None]] = None,
            dtype: str = "float32") -> Dict[str, Any]:
    """Every distinct convolution of ``arch`` in ``dtype``: medians (ms) of both sides, forward
    and forward with gradients, and the network's totals (each shape times its count)."""
    import numpy as np

    torch, _ = benchmark_torch.import_torch()
    rows = []
    for i, (conv, count) in enumerate(convolutions(arch, batch_size, image_size, num_classes)):
        rng = np.random.default_rng(i)
        grad_input = i > 0  # the first convolution reads the image: no input gradient
        fns = [*_jax_fns(conv, grad_input, rng, dtype),
               *_torch_fns(torch, conv, grad_input, rng, dtype)]
        jf, jt, tf, tt = (1e3 * statistics.median(t)
                          for t in benchmark_torch.alternate(fns, warmup, steps))
        row = {"conv": conv.label(), "input_shape": list(conv.input_shape),
               "kernel_shape": list(conv.kernel_shape), "strides": list(conv.strides),
               "padding": [list(p) for p in conv.padding], "groups": conv.groups,
               "count": count, "grad_input": grad_input,
               "forward_ms": {"cnn_jax": jf, "torch": tf},
               "train_ms": {"cnn_jax": jt, "torch": tt}}
        rows.append(row)
        if progress:
            progress(f"{arch} {row['conv']} x{count}: forward {jf:.1f} vs {tf:.1f} ms, "
                     f"with gradients {jt:.1f} vs {tt:.1f} ms (ratio {tt / jt:.2f})")
    total = {kind: {side: sum(r["count"] * r[kind][side] for r in rows)
                    for side in ("cnn_jax", "torch")} for kind in ("forward_ms", "train_ms")}
    return {"arch": arch, "batch_size": batch_size, "image_size": image_size,
            "num_classes": num_classes, "dtype": dtype, "steps": steps, "warmup": warmup,
            "environment": benchmark_torch.environment(), "rows": rows, "total": total}


def markdown(result: Dict[str, Any]) -> str:
    """One table per network: per shape and in total, ms of both sides and the ratio (torch time /
    cnn_jax time, > 1: cnn_jax faster), forward and with gradients."""
    env = result["environment"]
    autocast = " (autocast)" if result.get("dtype") == "bfloat16" else ""
    lines = [f"{result['arch']}, batch {result['batch_size']} at {result['image_size']} px, "
             f"{result.get('dtype', 'float32')}: each convolution alone, cnn_jax (jax {env['jax']}) "
             f"vs torch {env['torch']} ({env['torch_threads']} threads, channels-last{autocast}), "
             f"{env['processor']}"
             f"; median of {result['steps']} after {result['warmup']} warm-up, alternating; "
             "ratio = torch time / cnn_jax time.", "",
             "| convolution | count | forward ms cnn_jax | forward ms torch | forward ratio | "
             "with gradients ms cnn_jax | with gradients ms torch | **ratio** |",
             "|---|---|---|---|---|---|---|---|"]

    def cells(f, t, bold):
        ratio = f"**{t['torch'] / t['cnn_jax']:.2f}**" if bold else \
            f"{t['torch'] / t['cnn_jax']:.2f}"
        return (f"{f['cnn_jax']:.1f} | {f['torch']:.1f} | {f['torch'] / f['cnn_jax']:.2f} | "
                f"{t['cnn_jax']:.1f} | {t['torch']:.1f} | {ratio}")

    for r in result["rows"]:
        note = "" if r["grad_input"] else " (no input gradient)"
        lines.append(f"| {r['conv']}{note} | {r['count']} | "
                     f"{cells(r['forward_ms'], r['train_ms'], True)} |")
    t = result["total"]
    lines.append(f"| **all, times count** | {sum(r['count'] for r in result['rows'])} | "
                 f"{cells(t['forward_ms'], t['train_ms'], True)} |")
    return "\n".join(lines)
