"""Real, jitted forward passes of every registered model at small sizes (eval and train mode)."""

import chex
from absl.testing import parameterized

from cnn_jax.models import list_models

from _forward import check_forward


class TestForward(chex.TestCase):

    @chex.variants(with_jit=True)
    @parameterized.parameters(*list_models())
    def test_eval_and_train(self, name):
        check_forward(self.variant, name)
