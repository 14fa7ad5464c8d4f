"""Real, jitted forward passes of every registered model at small sizes (eval and train mode).

Every entry runs ``check_forward`` compiled. The deepest entries (``SHORTENED_IN_JIT``) run it at
shortened depth (``_forward.shortened``: each repeat count cut to two, so every module of the
entry still runs, each block kind as the first block of its stage and after it): their modules
are those of a shallower entry of the family that runs compiled at full depth here (its key in
the table; ``test_shortened_entries_are_deeper_copies`` checks they differ only in depth, width
and where noted), and a full-depth compile cost 7-23 s each on a 2-core CPU. Shortened,
resnet101 and resnet152 are one network, as are densenet169 and densenet201: ``check_forward``
runs it once per process (``PASSED``), the other entry passes with it (one that failed runs
again).

What covers them at full depth:
- here, ``check_forward_shapes`` at full depth, abstractly (``jax.eval_shape``): eval and train
  mode's output and auxiliary heads' shapes and dtypes, batch_stats of the init's tree and shapes;
- test_models.py: output shape at 224x224, bf16 compute with fp32 variables, and (at 1000
  classes) torchvision's exact parameter counts for resnet101/152 and densenet161/169/201;
- test_convert.py: resnet152's logits equal torchvision's at full depth (32x32, eval mode), and
  resnet101 and densenet161/169/201 convert torchvision state dicts onto the init's exact tree;
- test_forward_eager.py: the same real checks as here, un-jitted, at shortened depth.
Not covered at full depth: finite real outputs in train mode and updated batch statistics of
resnet101, resnet110, plain110 and densenet161/169/201 (their modules' are).
"""

import dataclasses

import chex
import pytest
from absl.testing import parameterized

from cnn_jax.models import create_model, list_models

from _forward import REPEAT_OPTIONS, check_forward, check_forward_shapes, shortened

# deep entry -> (shallower entry of its family that runs at full depth here, the fields other
# than depth and width in which they may differ). densenet_bc_100 (48 dense layers, 11 s) has no
# shallower DenseNet-BC with its CIFAR stem and runs at full depth.
SHORTENED_IN_JIT = {
    "resnet101": ("resnet50", ()),
    "resnet152": ("resnet50", ()),
    "resnet110": ("resnet56", ()),
    "plain110": ("plain56", ()),
    "densenet161": ("densenet121", ()),
    "densenet169": ("densenet121", ()),
    "densenet201": ("densenet121", ()),
}
WIDTH_OPTIONS = ("num_classes", "widths", "growth_rate", "num_init_features")


PASSED = set()


class TestForward(chex.TestCase):

    @chex.variants(with_jit=True)
    @parameterized.parameters(*list_models())
    def test_eval_and_train(self, name):
        if name in SHORTENED_IN_JIT:
            check_forward(self.variant, name, PASSED, **shortened(name))
            check_forward_shapes(name)
        else:
            check_forward(self.variant, name)


@pytest.mark.parametrize("name", list(SHORTENED_IN_JIT))
def test_shortened_entries_are_deeper_copies(name):
    """Each shortened entry is its full-depth reference with more repeats, and other widths or
    the listed fields at most: the same class and block kinds, shortcuts, norm placement."""
    reference, allowed = SHORTENED_IN_JIT[name]
    assert reference in list_models() and reference not in SHORTENED_IN_JIT
    deep, shallow = create_model(name), create_model(reference)
    assert type(deep) is type(shallow)
    fields = [f.name for f in dataclasses.fields(deep) if f.name not in ("parent", "name")]
    differ = {f for f in fields if getattr(deep, f) != getattr(shallow, f)}
    assert differ <= {*REPEAT_OPTIONS, *WIDTH_OPTIONS, *allowed}, differ
    depth = [o for o in REPEAT_OPTIONS if hasattr(deep, o)]
    assert sum(sum(getattr(deep, o)) for o in depth) > sum(sum(getattr(shallow, o)) for o in depth)
