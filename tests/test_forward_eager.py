"""Real, un-jitted forward passes of every registered model at small sizes (eval and train mode):
the models run op by op outside jit too.

Un-jitted, every op compiles on its own for each distinct shape, and e.g. each DenseNet layer has
its own channel count (densenet201 would take minutes here). So the repeat counts (ResNet's blocks
per stage, DenseNet's layers per block) are cut to at most two: every module of each entry still
runs, every block kind both as the first block of its stage and after it; the full-depth networks
run jitted in test_forward_jit.py with the same checks. Shortened, several entries are the same
network (resnet50/101/152, resnet20-110, plain20-110, densenet121/169/201): ``check_forward``
runs each distinct network once per process (``PASSED``); a later entry equal to it passes with
it, and one that failed runs again.
"""

import chex
from absl.testing import parameterized

from cnn_jax.models import list_models

from _forward import check_forward, shortened


PASSED = set()


class TestForwardEager(chex.TestCase):

    @chex.variants(without_jit=True)
    @parameterized.parameters(*list_models())
    def test_eval_and_train(self, name):
        check_forward(self.variant, name, PASSED, **shortened(name))
