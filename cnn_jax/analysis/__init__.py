"""Layer-by-layer analysis of any Flax Linen model: shapes, parameters, MACs, receptive fields.

``analyze(model, (1, 224, 224, 3))`` returns one row per convolution, dense layer and pooling
window (plus one per parameterised or normalising leaf module such as batch norm), each with its
output shape, parameter count, multiply-accumulates and the receptive field of its output with
respect to the input (Araujo et al. 2019, "Computing Receptive Fields of Convolutional Neural
Networks"), per spatial axis:

    size_out  = size_in + (k - 1) * jump_in
    jump_out  = jump_in * stride
    start_out = start_in + ((k - 1) / 2 - pad_low) * jump_in

``k`` is the effective (dilated) window, ``start`` the centre of the first output unit's field in
input pixel coordinates (pixel centres at 0, 1, ...; negative = inside the padding).

How: the forward pass is traced with ``jax.make_jaxpr`` on abstract inputs (nothing is computed,
so a 224x224 ResNet-152 costs a trace, not a forward pass) and the equations are walked in order,
propagating a field (size, jump, start per input spatial axis, plus which tensor axis carries it)
through every primitive. Working on the jaxpr rather than on modules is what makes it generic:
pooling in this codebase is a plain function (``layers.max_pool`` -> ``lax.reduce_window``), skip
connections and concatenations are plain ``add``/``concatenate`` and user code may call ``lax``
directly; all of these are visible only as primitives. Module names come from
``nn.intercept_methods``: each module method runs under ``jax.named_scope`` with a unique per-call
marker, so every equation's ``source_info.name_stack`` says which module call emitted it
(sub-jaxprs of ``jit``, ``remat`` and ``custom_jvp``, which hold relative name stacks, inherit the
marker of their calling equation). Module interception alone would miss the pooling functions;
the jaxpr alone would lose the names. Parameters are attributed by data flow (the leaf that feeds
a conv/dot weight operand) and then by module path (biases, norm scales), so row parameters
always sum to the number of trainable parameters. This module depends on JAX and Flax only.

Conventions:
- Merges (residual ``add``, Inception/DenseNet ``concatenate``, any elementwise op) take the
  union of their inputs' fields: when the inputs are centred on the same pixel (true of every
  network here, all paddings being symmetric "same" paddings) the size is the maximum over inputs,
  Araujo et al.'s rule for multi-path networks; misaligned inputs give the span covering all.
- Reductions over spatial axes (global pooling) and flattening reshapes act as one window over the
  whole axis, so the dense layers of a classifier see the whole (padded) input.
- Reductions over the batch axis are statistics (batch norm in train mode), not features: their
  results carry no field, so RFs are the same in train and eval mode.
- RF sizes count padding, as in the paper: they can exceed the image.
- MACs: conv = output elements * kh * kw * cin / groups; dot_general = output elements *
  contracted size (the papers' and torchvision's convention). Pooling, normalisation, activations
  and bias additions count 0 MACs. FLOPs are reported as 2 * MACs. ``valid_macs`` counts only the
  kernel taps that read the input rather than the padding, which is what XLA counts.
- Agreement with XLA (``xla_flops``: cost analysis of the compiled forward pass), measured and
  tested on the registered convnets: 1.00 <= XLA / (2 * valid_macs) <= 1.05 at any input size
  (the excess is elementwise work: bias, batch norm, ReLU, pooling windows), and XLA is within
  10% of 2 * macs at 224x224 (0.92-0.99); at CIFAR sizes padding taps are a larger share.
- Depth: ``weight_layers`` counts conv/dense rows whose kernel is a parameter (a layer applied
  twice counts twice); ``depth`` is the longest chain of such layers from input to output (the
  papers' "16 layers", "50 layers", "121 layers").
- Not analysed inside: ``scan``/``while``/``cond`` bodies (their outputs get the union of their
  inputs' fields and their MACs are not counted; a note is added to ``Analysis.notes``).
"""

from cnn_jax.analysis.api import analyze, xla_flops
from cnn_jax.analysis.render import FORMATS, format_analysis, render_table
from cnn_jax.analysis.results import Analysis, LayerInfo, Totals

__all__ = ["LayerInfo", "Totals", "Analysis", "analyze", "xla_flops", "format_analysis",
           "render_table", "FORMATS"]
