"""The fast CPU formulations (matmul convolutions, slice-mask max-pool gradients) against XLA's ops.

Every model trains through them on CPU, so values and gradients must equal
``lax.conv_general_dilated`` / ``reduce_window``'s within fp32 rounding, for every geometry the
families use: 1x1 (strided), 3x3 at large and at 1x1/2x2 spatial sizes (where taps only ever see
padding), the 7x7/2 and 11x11/4 stems, asymmetric and 'VALID' padding, grouped convs, bf16.
"""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.models import create_model, layers

from _variables import normal


def _both(fn, *args):
    """``fn(*args)`` traced with XLA's ops and with the fast formulations."""
    out = []
    for impl in ("xla", "fast"):
        with layers.implementation(impl):
            # A new function per implementation: jit caches traces by function, and the
            # implementation (a context variable) is not part of its key, so jit(fn) twice would
            # run the first trace twice.
            out.append(jax.jit(lambda *a: fn(*a))(*args))
    return out


def _assert_close(ref, got, rtol):
    for r, g in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
        assert r.dtype == g.dtype and r.shape == g.shape
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        np.testing.assert_allclose(g, r, rtol=0, atol=rtol * max(np.abs(r).max(), 1e-6))


CONV_CASES = {
    # name: (input NHWC, kernel, stride, padding)
    "1x1": ((2, 9, 9, 8), 1, 1, 0),
    "1x1_stride2": ((2, 9, 9, 8), 1, 2, 0),
    "3x3": ((2, 10, 10, 20), 3, 1, 1),
    "3x3_stride2": ((2, 15, 15, 20), 3, 2, 1),
    "3x3_at_1x1": ((2, 1, 1, 20), 3, 1, 1),
    "3x3_at_2x2": ((2, 2, 2, 20), 3, 1, 1),
    "3x3_stride2_at_2x2": ((2, 2, 2, 20), 3, 2, 1),
    "3x3_valid": ((2, 5, 6, 4), 3, 1, "VALID"),
    # <= 64 outputs (and inputs, for the input gradient) and > 16 channels: on Eigen with an
    # extra output row; VALID: the input gradient's output is already larger than its input.
    "3x3_valid_eigen": ((2, 9, 10, 32), 3, 1, "VALID", 48),
    "5x5_eigen": ((2, 12, 12, 24), 5, 1, 2, 32),
    "5x5": ((2, 12, 12, 6), 5, 1, 2),
    "stem_7x7_stride2": ((2, 20, 20, 3), 7, 2, 3),
    "stem_11x11_stride4": ((2, 31, 31, 3), 11, 4, 2),
    "asymmetric_padding": ((2, 9, 9, 20), 3, 1, ((0, 1), (2, 0))),
    # Stems as a stride-1 convolution of s x s blocks; here the blocks crop the input's last row.
    "stem_5x5_stride3_asymmetric_padding": ((2, 18, 19, 3), 5, 3, ((1, 0), (0, 2)), 24),
    # 64 x 64 channels and more: the weight gradient is one product per tap (narrower: XLA's).
    "3x3_wide": ((2, 10, 10, 64), 3, 1, 1, 64),
    "3x3_stride2_wide": ((2, 15, 15, 64), 3, 2, 1, 96),
    "3x3_wide_asymmetric_padding": ((2, 9, 9, 64), 3, 1, ((0, 1), (2, 0)), 64),
    "3x3_im2col_8_channels": ((2, 10, 10, 8), 3, 1, 1, 512),  # fewer than 16 inputs, wide out
    # At most a quarter as many outputs as inputs (densenet121's 128 -> 32): both gradients are
    # products over the output gradient's im2col patches.
    "3x3_narrow_output": ((2, 10, 10, 128), 3, 1, 1, 32),
    "3x3_narrow_output_asymmetric_padding": ((2, 11, 12, 128), 3, 1, ((0, 1), (2, 0)), 32),
    "3x3_narrow_output_valid": ((2, 10, 11, 128), 3, 1, "VALID", 32),
    # Narrower (DenseNet-BC's 32 -> 8): the weight gradient is one product of the output
    # gradient's shifted planes.
    "3x3_narrow_planes": ((2, 10, 10, 32), 3, 1, 1, 8),
    "3x3_narrow_planes_asymmetric_padding": ((2, 11, 12, 24), 3, 1, ((0, 1), (2, 0)), 6),
    "5x5_narrow_planes_valid": ((2, 12, 11, 20), 5, 1, "VALID", 5),
    # More than 64 x 64 channels, at least 32 each: forward and input gradient by Winograd's
    # F(2x2, 3x3), here with odd output sizes (the last tiles cropped) and padding of 0 and 2
    # (the VALID convolution's input gradient).
    "3x3_winograd_asymmetric_padding": ((2, 9, 11, 96), 3, 1, ((0, 1), (2, 0)), 48),
    "3x3_winograd_valid": ((2, 10, 9, 40), 3, 1, "VALID", 112),
    # The weight gradient by F(3x3, 2x2) at 64 x 64 channels from 14x14 outputs (forward and
    # input gradient stay XLA's), and by F(3x3, 4x4) from 28x28 (28 x 30 here: the last column of
    # tiles cropped).
    "3x3_winograd_weight_grad_64": ((1, 14, 15, 64), 3, 1, 1, 64),
    "3x3_winograd_weight_grad_f4": ((1, 29, 30, 48), 3, 1, ((0, 1), (2, 0)), 96),
    # Narrower, with at least 2^24 sums per tap (N*Ho*Wo*C*O): the weight gradient by
    # F(3x3, 4x4) too (the forward and input gradient XLA's); 57 x 58 outputs.
    "3x3_winograd_weight_grad_many_sums": ((2, 57, 58, 32), 3, 1, 1, 96),
    # 5x5 by F(2x2, 5x5), forward and both gradients (alexnet's 64 -> 192), at odd output sizes
    # and asymmetric padding; VALID: the input gradient's padding is 4.
    "5x5_winograd_asymmetric_padding": ((1, 9, 11, 40), 5, 1, ((1, 2), (0, 3)), 112),
    "5x5_winograd_valid": ((1, 10, 9, 112), 5, 1, "VALID", 40),
}


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv2d_values_and_gradients_equal_xla(case, dtype, rtol):
    shape, k, stride, padding, *out = CONV_CASES[case]
    x = normal(0, shape, dtype)
    w = normal(1, (k, k, shape[-1], *(out or [7])), dtype, scale=0.3)
    # One fixed output gradient for both paths, so that the gradients compare the two VJPs. (A
    # gradient that depends on the output, such as sin's, turns a one-ulp difference of a bf16
    # output of magnitude ~30 into a ~0.1 difference of that output's gradient.)
    out_shape = jax.eval_shape(lambda x, w: layers.conv2d(x, w, stride, padding), x, w).shape
    r = normal(2, out_shape)

    def loss(x, w):
        y = layers.conv2d(x, w, stride, padding)
        return jnp.sum(y.astype(jnp.float32) * r), y

    ref, got = _both(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), x, w)
    (ref_loss, ref_y), ref_grads = ref
    (got_loss, got_y), got_grads = got
    _assert_close((ref_y, ref_grads), (got_y, got_grads), rtol)
    # The loss sums many terms of both signs: its error scales with the sum of their magnitudes
    # (bf16 outputs of the same convolution, rounded from different accumulation orders).
    scale = float(np.sum(np.abs(np.asarray(ref_y, np.float32) * np.asarray(r))))
    np.testing.assert_allclose(got_loss, ref_loss, rtol=0, atol=rtol * scale)


# One case per product the fast path computes: forward and input gradient over im2col taps, the
# weight gradient per tap (wide), over the patches (stem) and over the output gradient's patches
# and planes.
@pytest.mark.parametrize("case", ["1x1_stride2", "3x3", "3x3_wide", "stem_7x7_stride2",
                                  "3x3_narrow_output", "3x3_narrow_planes"])
def test_conv2d_keeps_float64(case):
    """With ``jax_enable_x64`` (gradient checks in float64) the products accumulate in float64:
    float32 accumulation would leave errors of ~1e-7, here 1e-12."""
    shape, k, stride, padding, *out = CONV_CASES[case]
    with jax.enable_x64(True):
        x = normal(0, shape, jnp.float64)
        w = normal(1, (k, k, shape[-1], *(out or [7])), jnp.float64)
        loss = lambda x, w: jnp.sum(jnp.sin(layers.conv2d(x, w, stride, padding)))  # noqa: E731
        ref, got = _both(jax.value_and_grad(loss, argnums=(0, 1)), x, w)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(got))
        _assert_close(ref, got, 1e-12)


def test_conv2d_grouped_falls_back_to_xla():
    x = normal(0, (2, 6, 6, 8))
    w = normal(1, (3, 3, 4, 6))
    ref = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=2)
    for got in _both(lambda x, w: layers.conv2d(x, w, 1, 1, groups=2), x, w):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_auto_uses_matmuls_on_cpu_and_xla_says_convolution():
    x, w = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 1, 4, 8))

    def program(impl):  # the jaxpr's text, nested jits included
        with layers.implementation(impl):
            return str(jax.make_jaxpr(lambda x, w: layers.conv2d(x, w))(x, w))

    assert jax.default_backend() == "cpu" and layers.use_fast_formulations()
    assert "conv_general_dilated" not in program("auto")
    assert "dot_general" in program("auto")
    assert "conv_general_dilated" in program("xla")


@pytest.mark.parametrize("shape,out,op", [
    ((2, 10, 10, 20), 7, "conv_general_dilated"),  # narrow: XLA's (a convolution over the batch)
    ((2, 10, 10, 64), 64, "dot_general"),  # 64 x 64: one product per tap
    ((2, 10, 10, 3), 7, "dot_general"),  # a stem: one product over the im2col patches
    ((2, 7, 7, 20), 7, "dot_general"),  # at most 7x7 outputs: one product over the patches
])
def test_which_op_computes_the_weight_gradient(shape, out, op):
    x, kernel_shape = jnp.zeros(shape), (3, 3, shape[-1], out)
    geo = layers._geometry(x.shape, kernel_shape, (1, 1), ((1, 1), (1, 1)))
    g = jnp.zeros(shape[:3] + (out,))
    jaxpr = str(jax.make_jaxpr(lambda x, g: layers._taps_weight_grad(x, g, kernel_shape, geo))(
        x, g))
    assert op in jaxpr and ({"conv_general_dilated", "dot_general"} - {op}).pop() not in jaxpr


@pytest.mark.parametrize("shape,out,stride,rule", [
    # At most a quarter as many outputs as inputs, 64 x 64 channels and more: both gradients over
    # the output gradient's im2col patches.
    ((2, 56, 56, 128), 32, 1, "patches"),  # densenet121's conv2 (4k -> k, k = 32)
    ((2, 10, 10, 128), 32, 1, "patches"),
    # Narrower: the weight gradient over the output gradient's planes.
    ((2, 32, 32, 32), 8, 1, "planes"),  # DenseNet-BC-34 k = 8's conv2
    ((2, 32, 32, 24), 6, 1, "planes"),  # DenseNet-BC-52 k = 6
    ((2, 8, 8, 48), 12, 1, "planes"),  # DenseNet-BC-100 k = 12 in its last block
    ((2, 10, 10, 128), 33, 1, None),  # more than a quarter of the inputs
    ((2, 32, 32, 32), 9, 1, None),
    ((2, 10, 10, 128), 32, 2, None),  # strided
    ((2, 32, 32, 32), 8, 2, None),
    ((2, 7, 7, 128), 32, 1, None),  # at most 7x7 outputs: the im2col-of-input path
    ((2, 7, 7, 32), 8, 1, None),
])
def test_which_convolutions_take_the_output_gradient_patches_or_planes(shape, out, stride, rule):
    kernel_shape = (3, 3, shape[-1], out)
    geo = layers._geometry(shape, kernel_shape, (stride, stride), ((1, 1), (1, 1)))
    assert layers._use_grad_patches(kernel_shape, geo) == (rule == "patches")
    assert layers._use_grad_planes(kernel_shape, geo) == (rule == "planes")
    if rule == "planes":  # the backward pass: the input gradient's convolution, the weight's product
        x, g = jnp.zeros(shape), jnp.zeros(shape[:3] + (out,))
        jaxpr = str(jax.make_jaxpr(lambda x, g: layers._conv_fast_bwd(
            (stride, stride), ((1, 1), (1, 1)), (x, jnp.zeros(kernel_shape)), g))(x, g))
        assert jaxpr.count("dot_general") == jaxpr.count("conv_general_dilated") == 1


@pytest.mark.parametrize("shape,out,stride,dtype,eigen", [
    ((2, 56, 56, 64), 64, 1, jnp.float32, True),  # resnet50's layer1 3x3
    ((2, 56, 56, 128), 32, 1, jnp.float32, True),  # densenet121's 4k -> k
    ((2, 28, 28, 128), 128, 1, jnp.float32, False),  # wider: YNNPACK splits it over threads
    ((2, 56, 56, 64), 64, 2, jnp.float32, False),  # strided: the output is never the larger
    ((2, 32, 32, 16), 16, 1, jnp.float32, False),  # <= 16 channels: YNNPACK declines it itself
    ((2, 56, 56, 64), 64, 1, jnp.bfloat16, False),  # YNNPACK takes float32 convolutions only
])
def test_which_convolutions_run_on_eigen(shape, out, stride, dtype, eigen, monkeypatch):
    kernel_shape = (3, 3, shape[-1], out)
    monkeypatch.setattr(layers, "_one_thread", lambda: False)
    assert layers._use_eigen(kernel_shape, (stride, stride), dtype) == eigen
    monkeypatch.setattr(layers, "_one_thread", lambda: True)  # YNNPACK is faster on one thread
    assert not layers._use_eigen(kernel_shape, (stride, stride), dtype)


def _ynnpack_convolutions(hlo: str) -> int:
    """How many convolutions of a compiled HLO module XLA:CPU hands to YNNPACK (inside the fused
    computations of its ``__ynn_fusion`` calls)."""
    called = {m for line in hlo.splitlines() if "__ynn_fusion" in line
              for m in re.findall(r"calls=%?([\w.-]+)", line)}
    count, inside = 0, False
    for line in hlo.splitlines():
        header = re.match(r"\s*%?([\w.-]+) .*\{\s*$", line)
        if header and not line.startswith("  "):
            inside = header.group(1) in called
        count += inside and " convolution(" in line
    return count


def _host_flag(monkeypatch, name: str):
    """A setter ``set_flag(flag)`` that makes ``layers.<name>()`` (a fact about this host)
    return ``flag``, whatever this host is."""
    def set_flag(flag: bool):
        monkeypatch.setattr(layers, name, lambda: flag)
        jax.clear_caches()  # conv2d's inner jit keeps each geometry's trace, rule and all

    return set_flag


@pytest.fixture
def one_thread(monkeypatch):
    """``one_thread(flag)`` makes the layers see a process on one CPU core (or on several)."""
    yield _host_flag(monkeypatch, "_one_thread")
    jax.clear_caches()


# The convolutions of the experiments' narrow networks: the CIFAR stem (3 -> 8), 8 -> 8 and
# 16 -> 16 (which YNNPACK declines unpadded), DenseNet-BC's growth 32 -> 8, and a 32 -> 32 that
# would take the Eigen detour on several threads.
ONE_THREAD_CASES = {"stem_3_to_8": ((2, 10, 10, 3), 8), "8_to_8": ((2, 10, 10, 8), 8),
                    "16_to_16_asymmetric": ((2, 9, 9, 16), 16), "growth_32_to_8": ((2, 10, 10, 32), 8),
                    "32_to_32": ((2, 9, 10, 32), 32)}


@pytest.mark.parametrize("case", sorted(ONE_THREAD_CASES))
def test_one_thread_convolutions_equal_xla(case, one_thread):
    """On one thread (an experiments worker) narrow convolutions run on YNNPACK, padded to
    24 input channels where it would decline them: values and both gradients as XLA's."""
    shape, out = ONE_THREAD_CASES[case]
    padding = ((0, 1), (2, 0)) if "asymmetric" in case else 1
    x, w = normal(0, shape), normal(1, (3, 3, shape[-1], out), scale=0.3)
    one_thread(True)

    def loss(x, w):
        y = layers.conv2d(x, w, 1, padding)
        return jnp.sum(jnp.sin(y)), y

    ref, got = _both(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), x, w)
    _assert_close(ref, got, 2e-5)


def test_one_thread_hands_narrow_convolutions_to_ynnpack(one_thread):
    """8 -> 8: on several threads XLA keeps the forward and the input gradient (YNNPACK declines
    them); on one, both are padded and go to YNNPACK. If a newer XLA takes them unpadded, the
    padding is waste: re-measure ``_ONE_THREAD_PAD_CHANNELS``."""
    def ynn(flag):
        one_thread(flag)
        x, w = jnp.ones((1, 10, 10, 8)), jnp.ones((3, 3, 8, 8))
        grads = jax.jit(jax.grad(lambda x, w: jnp.sum(layers.conv2d(x, w, 1, 1) ** 2), (0, 1)))
        return _ynnpack_convolutions(grads.lower(x, w).compile().as_text())

    assert ynn(False) == 0 and ynn(True) == 2


def test_eigen_convolutions_are_not_handed_to_ynnpack(one_thread):
    """The one-extra-row convolutions (forward and input gradient) stay XLA's own: if a newer XLA
    hands them to YNNPACK anyway, re-measure ``_EIGEN_MAX_OUTPUT_CHANNELS``. At 24 -> 128 the
    forward and XLA's weight gradient go to YNNPACK (the check sees them) and the input gradient
    (128 -> 24) to Eigen; at 128 x 128 Winograd's products leave no convolution at all."""
    one_thread(False)
    def compiled(c, o):
        x, w = jnp.ones((1, 10, 10, c)), jnp.ones((3, 3, c, o))
        grads = jax.jit(jax.grad(lambda x, w: jnp.sum(layers.conv2d(x, w, 1, 1) ** 2), (0, 1)))
        return grads.lower(x, w).compile().as_text()

    hlo = compiled(24, 128)
    assert hlo.count(" convolution(") == 3 and _ynnpack_convolutions(hlo) == 2
    hlo = compiled(64, 64)
    assert hlo.count(" convolution(") == 2 and _ynnpack_convolutions(hlo) == 0
    assert compiled(128, 128).count(" convolution(") == 0


@pytest.mark.parametrize("kernel_shape,dtype,winograd", [
    ((3, 3, 256, 256), jnp.float32, True),  # resnet50's layer3 3x3
    ((3, 3, 192, 384), jnp.float32, True),  # alexnet's conv3
    ((3, 3, 128, 64), jnp.float32, True),
    ((3, 3, 64, 64), jnp.float32, False),  # 64 x 64 and fewer: the Eigen path is faster
    ((3, 3, 128, 32), jnp.float32, False),  # densenet121's 4k -> k
    ((3, 3, 16, 512), jnp.float32, False),  # fewer than 32 inputs
    ((3, 3, 3, 64), jnp.float32, False),  # VGG's first convolution
    ((5, 5, 64, 192), jnp.float32, True),  # alexnet's conv2: F(2x2, 5x5)
    ((5, 5, 32, 128), jnp.float32, False),  # googlenet's (paper layout) 5x5s are narrower
    ((7, 7, 256, 256), jnp.float32, False),
    ((3, 3, 256, 256), jnp.bfloat16, False),  # float32's rule (bf16's: _use_winograd_bf16)
    ((3, 3, 256, 256), jnp.float64, False),
])
def test_which_convolutions_take_winograd(kernel_shape, dtype, winograd):
    assert layers._use_winograd(kernel_shape, dtype) == winograd


@pytest.fixture
def cpu_avx512_bf16(monkeypatch):
    """``cpu_avx512_bf16(flag)``: the layers see a CPU with (or without) AVX-512 BF16."""
    yield _host_flag(monkeypatch, "_cpu_has_avx512_bf16")
    jax.clear_caches()


@pytest.mark.parametrize("kernel_shape,avx512_bf16,winograd", [
    ((3, 3, 256, 256), True, True),
    ((3, 3, 96, 48), True, True),
    ((3, 3, 256, 256), False, False),  # bf16 products no faster than float32's
    ((3, 3, 64, 64), True, True),  # from 64 x 64 channels (float32: more than that)
    ((3, 3, 128, 32), True, True),  # (densenet121's 4k -> k: kn2row's, checked first)
    ((3, 3, 64, 32), True, False),
    ((3, 3, 16, 512), True, False),
    ((5, 5, 256, 256), True, False),
])
def test_which_bf16_convolutions_take_winograd(cpu_avx512_bf16, kernel_shape, avx512_bf16,
                                               winograd):
    cpu_avx512_bf16(avx512_bf16)
    assert layers._use_winograd_bf16(kernel_shape, jnp.bfloat16) == winograd
    assert not layers._use_winograd_bf16(kernel_shape, jnp.float32)
    assert layers._use_winograd_forward(kernel_shape, jnp.bfloat16) == winograd


@pytest.mark.parametrize("case", ["3x3_winograd_asymmetric_padding", "3x3_winograd_valid",
                                  "3x3_narrow_output", "3x3_narrow_output_asymmetric_padding",
                                  "3x3_narrow_output_valid"])
def test_bf16_winograd_and_kn2row_values_and_gradients_equal_xla(cpu_avx512_bf16, case):
    """The bf16 Winograd and kn2row paths on any host (this one may lack AVX-512 BF16)."""
    cpu_avx512_bf16(True)
    test_conv2d_values_and_gradients_equal_xla(case, jnp.bfloat16, 2e-2)


@pytest.mark.parametrize("kernel_shape,hw,dtype,avx512_bf16,kn2row", [
    ((3, 3, 128, 32), 56, jnp.bfloat16, True, True),  # densenet121's growth convolutions
    ((3, 3, 128, 32), 14, jnp.bfloat16, True, True),
    ((3, 3, 128, 32), 7, jnp.bfloat16, True, False),  # one im2col product at 7x7 and below
    ((3, 3, 128, 32), 56, jnp.bfloat16, False, False),
    ((3, 3, 128, 32), 56, jnp.float32, True, False),
    ((3, 3, 128, 64), 56, jnp.bfloat16, True, False),  # more than a quarter of the inputs
    ((3, 3, 32, 8), 32, jnp.bfloat16, True, False),  # DenseNet-BC's narrow ones (< 64 x 64)
])
def test_which_convolutions_take_kn2row(cpu_avx512_bf16, kernel_shape, hw, dtype, avx512_bf16,
                                        kn2row):
    cpu_avx512_bf16(avx512_bf16)
    x_shape = (2, hw, hw, kernel_shape[2])
    geo = layers._geometry(x_shape, kernel_shape, (1, 1), ((1, 1), (1, 1)))
    assert layers._use_kn2row_bf16(kernel_shape, dtype, geo) == kn2row
    x, w = jnp.zeros(x_shape, dtype), jnp.zeros(kernel_shape, dtype)
    program = str(jax.make_jaxpr(lambda x, w: layers.conv2d(x, w, 1, 1))(x, w))
    if kn2row:  # one product, no convolution
        assert "conv_general_dilated" not in program and program.count("dot_general") == 1


@pytest.mark.parametrize("shape,out", [((2, 10, 9, 40), 112), ((4, 14, 14, 256), 256)])
def test_bf16_winograd_errors_against_float32(cpu_avx512_bf16, shape, out):
    """Winograd's bf16 products round the transformed tiles to bf16 once more than XLA's bf16
    convolution rounds: against the float32 convolution of the same bf16 operands its mean error
    is ~3x XLA's (here at most 4x) and its largest ~2x (at most 3x)."""
    cpu_avx512_bf16(True)
    x = normal(0, shape, jnp.bfloat16)
    w = normal(1, (3, 3, shape[-1], out), jnp.bfloat16, scale=0.05)
    pad = ((1, 1), (1, 1))
    ref = np.asarray(layers._xla_conv(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), pad))
    errors = {}
    for name, y in (("xla", layers._xla_conv(x, w, (1, 1), pad)),
                    ("winograd", layers._conv_stride1(x, w, pad))):
        assert y.dtype == jnp.bfloat16
        e = np.abs(np.asarray(y, np.float32) - ref)
        errors[name] = (e.mean(), e.max())
    assert errors["winograd"][0] <= 4 * errors["xla"][0], errors
    assert errors["winograd"][1] <= 3 * errors["xla"][1], errors
    assert errors["winograd"][0] > errors["xla"][0]  # the Winograd path did run


@pytest.mark.parametrize("kernel_shape,hw,dtype,taps", [
    ((3, 3, 256, 256), 14, jnp.bfloat16, True),  # resnet50's layer3, googlenet's 4a-4e
    ((3, 3, 384, 256), 13, jnp.bfloat16, True),  # alexnet's conv4
    ((3, 3, 128, 64), 14, jnp.bfloat16, True),
    ((3, 3, 64, 64), 14, jnp.bfloat16, False),  # 64 x 64 channels and fewer keep XLA's
    ((3, 3, 128, 128), 28, jnp.bfloat16, False),  # from 15x15 outputs XLA's convolution wins
    ((3, 3, 256, 256), 14, jnp.float32, False),  # bfloat16 only
])
def test_which_bf16_convolutions_take_per_tap_products(kernel_shape, hw, dtype, taps):
    geo = layers._geometry((2, hw, hw, kernel_shape[2]), kernel_shape, (1, 1), ((1, 1), (1, 1)))
    assert layers._use_taps_bf16(kernel_shape, dtype, geo) == taps
    x, w = jnp.zeros((2, hw, hw, kernel_shape[2]), dtype), jnp.zeros(kernel_shape, dtype)
    program = str(jax.make_jaxpr(lambda x, w: layers.conv2d(x, w, 1, 1))(x, w))
    if taps:  # no convolution left in the forward pass
        assert "conv_general_dilated" not in program


_STABLEHLO_OP = re.compile(r"stablehlo\.(convolution|dot_general)\b.*?:\s*\((.*?)\)\s*->\s*(\S+)")


def _operand_dtypes(program: str):
    """(op, operand element types, result element type) of each convolution and product."""
    def elem(t):
        return t.rsplit("x", 1)[-1].rstrip(">")
    return [(op, tuple(elem(t) for t in operands.split(", ")), elem(result))
            for op, operands, result in _STABLEHLO_OP.findall(program)]


@pytest.mark.parametrize("case", ["1x1", "1x1_stride2", "stem_7x7_stride2", "3x3_stride2_wide",
                                  "3x3_wide", "3x3_narrow_output", "3x3_winograd_valid"])
def test_bf16_convolutions_are_bf16_products_or_float32(case):
    """In bf16 the fast path (forward and both gradients) multiplies bf16 operands only in
    products that accumulate in float32 (XLA:CPU's bf16 instructions), and computes the rest
    in float32: none of XLA's bf16 convolutions, which run at float32 speed or below, and no
    product of a float32 cotangent with a bf16 operand (autodiff's transpose of one)."""
    shape, k, stride, padding, *out = CONV_CASES[case]
    x = normal(0, shape, jnp.bfloat16)
    w = normal(1, (k, k, shape[-1], *(out or [7])), jnp.bfloat16)
    loss = lambda x, w: jnp.sum(layers.conv2d(x, w, stride, padding).astype(jnp.float32))  # noqa
    with layers.implementation("fast"):
        ops = _operand_dtypes(jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, w).as_text())
    assert ops
    bf16_products = [o for o in ops if "bf16" in o[1]]
    assert all(operands == ("bf16", "bf16") and result == "f32"
               for _, operands, result in bf16_products), ops
    assert all(op == "dot_general" for op, _, _ in bf16_products), ops
    if case.startswith("1x1"):  # forward, input and weight gradient
        assert len(bf16_products) == 3, ops


@pytest.mark.parametrize("m,c,o,copied", [(96, 16, 24, 16), (192, 24, 16, 16), (4, 64, 32, 64)])
def test_bf16_weight_gradient_products_stay_bf16_in_xla(m, c, o, copied):
    """XLA:CPU converts both operands of a bf16 product to float32 when one of them is not
    row-major (``a.T``, even behind a barrier). The weight gradients' ``a.T @ b`` must not: where
    this CPU's XLA keeps a product of row-major bf16 operands in bf16, it keeps this one in bf16
    too (no float32 copy of either operand in the compiled program), and a caller's transpose of
    the result runs (it once left the product to a kernel without bf16 products) and is exact.
    The row-major copy is of the narrower operand (``b.T @ a``, transposed, where b has fewer
    columns), unless the rows are too few for the copy to pay for the result's transpose (a
    classifier's weight gradient)."""
    a, b = normal(0, (m, c), jnp.bfloat16), normal(1, (m, o), jnp.bfloat16)
    copies = lambda text: [s for s in ((c, m), (m, c), (m, o))  # noqa: E731
                           if f"f32[{s[0]},{s[1]}]" in text]
    plain = jax.jit(lambda at, b: layers._dot(at, b)).lower(jnp.asarray(a.T), b).compile()
    weight_grad = jax.jit(lambda a, b: layers._dot(a, b, contract_a=0)).lower(a, b).compile()
    if not copies(plain.as_text()):  # this CPU's XLA multiplies bf16 operands as bf16
        assert not copies(weight_grad.as_text()), weight_grad.as_text()
    other = c + o - copied
    assert f"bf16[{copied},{m}]" in weight_grad.as_text(), weight_grad.as_text()
    assert f"bf16[{other},{m}]" not in weight_grad.as_text(), weight_grad.as_text()
    ref = np.asarray(a, np.float64).T @ np.asarray(b, np.float64)
    np.testing.assert_allclose(np.asarray(weight_grad(a, b)), ref, rtol=1e-5, atol=1e-4)
    transposed = jax.jit(lambda a, b: layers._dot(a, b, contract_a=0).T)(a, b)
    np.testing.assert_allclose(np.asarray(transposed), ref.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("axis", [-1, 0, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_concatenate_and_stack_equal_jnp_without_float32_copies(dtype, axis):
    """XLA:CPU concatenates bf16 in float32 (converts both ways, one slow loop); ``layers``'
    concatenation moves bf16 as uint16 bits: the same values and gradients as jnp's, and no
    float32 array or convert in the compiled program."""
    same = [normal(i, (2, 3, 4, 5), dtype) for i in range(3)]
    sized = [jnp.concatenate([p] * (i + 1), axis) for i, p in enumerate(same)]  # 1, 2, 3 long
    with layers.implementation("fast"):  # (the CPU's default)
        for ours, theirs, parts in ((layers.concatenate, jnp.concatenate, sized),
                                    (layers.stack, jnp.stack, same)):
            weights = normal(7, theirs(parts, axis).shape, jnp.float32)

            def loss(cat, parts):
                return jnp.sum(cat(parts, axis).astype(jnp.float32) * weights)

            got, ref = ours(parts, axis), theirs(parts, axis)
            assert got.dtype == ref.dtype == dtype
            np.testing.assert_array_equal(np.asarray(got, np.float32),
                                          np.asarray(ref, np.float32))
            grads = jax.grad(loss, argnums=1)(ours, parts)
            ref_grads = jax.grad(loss, argnums=1)(theirs, parts)
            for g, r in zip(grads, ref_grads):
                assert g.dtype == r.dtype == dtype
                np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))
            if dtype == jnp.bfloat16:
                text = jax.jit(lambda ps: ours(ps, axis)).lower(parts).compile().as_text()
                assert "f32[" not in text and "convert(" not in text, text


def test_materialize_computes_a_value_once():
    """XLA:CPU fuses a producer into each of its consumers (recomputing it), and drops
    ``optimization_barrier`` first; ``_materialize`` stores it once, with its values unchanged
    (NaN and -0.0 included)."""
    x = jnp.array([[jnp.nan, -0.0, 1.5], [2.0, -jnp.inf, 3.0]])
    got = jax.jit(layers._materialize)(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
    assert np.signbit(np.asarray(got)[0, 1])

    def consumers(x, keep):
        y = jnp.sin(x) * 3 + 1
        y = keep(y)
        return jnp.sum(y, axis=0), jnp.pad(y, 1)

    x = normal(0, (64, 48))
    sines = {}
    for name, keep in (("fused", lambda y: y), ("kept", layers._materialize)):
        compiled = jax.jit(lambda x: consumers(x, keep)).lower(x).compile()
        blocks = compiled.as_text().split("\n\n")  # one computation (fused or not) each
        sines[name] = sum("sine(" in b and ("pad(" in b or "reduce(" in b) for b in blocks)
        chex.assert_trees_all_equal(compiled(x), jax.jit(lambda x: consumers(x, lambda y: y))(x))
    if jax.default_backend() == "cpu":
        assert sines["fused"] >= 1 and sines["kept"] == 0, sines  # no consumer computes sin


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(4, 24), (2, 3, 5, 24)])
def test_dense_equals_nn_dense(shape, dtype, rtol):
    """``layers.Dense``: ``nn.Dense``'s parameters, values and gradients (inputs of any rank)."""
    x = normal(0, shape)
    ref_model, model = nn.Dense(16, dtype=dtype), layers.Dense(16, dtype=dtype)
    params = ref_model.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(model.init(jax.random.key(0), x)) == \
        jax.tree_util.tree_structure(params)
    r = normal(1, shape[:-1] + (16,))

    def loss(m):
        def f(p, x):
            y = m.apply(p, x)
            return jnp.sum(y.astype(jnp.float32) * r), y
        return f

    with layers.implementation("fast"):
        got = jax.jit(jax.value_and_grad(loss(model), (0, 1), has_aux=True))(params, x)
    ref = jax.jit(jax.value_and_grad(loss(ref_model), (0, 1), has_aux=True))(params, x)
    _assert_close(ref[0][1], got[0][1], rtol)
    _assert_close(ref[1], got[1], rtol)


def test_float32_1x1_weight_gradient_puts_the_narrower_output_first():
    """A float32 1x1 convolution that narrows its input (to at most 128 channels) computes its
    weight gradient as ``g.T @ x`` (the faster order on Eigen), transposed after: the compiled
    program holds the [out, in] product, and the gradients are ``x @ w``'s."""
    assert layers._narrow_output_first(256, 64) and layers._narrow_output_first(832, 128)
    assert not layers._narrow_output_first(64, 256)  # widening
    assert not layers._narrow_output_first(1024, 256)  # wider outputs: slower this way
    x, w = normal(0, (2, 6, 6, 48)), normal(1, (1, 1, 48, 16))
    r = normal(2, (2, 6, 6, 16))
    loss = lambda conv: lambda x, w: jnp.sum(conv(x, w) * r)  # noqa: E731
    fast = lambda x, w: layers.conv2d(x, w)  # noqa: E731
    with layers.implementation("fast"):
        grads = jax.jit(jax.grad(loss(fast), (0, 1)))
        text = grads.lower(x, w).compile().as_text()
        got = grads(x, w)
    assert re.search(r"f32\[16,48\]\{1,0\} dot\(", text), text
    ref = jax.jit(jax.grad(loss(lambda x, w: layers._xla_conv(x, w, (1, 1), ((0, 0), (0, 0)))),
                           (0, 1)))(x, w)
    _assert_close(ref, got, 2e-5)


def test_float32_dense_with_few_rows_multiplies_a_transposed_copy(monkeypatch):
    """A float32 product of a few rows by a large kernel (fc6, fc7) runs on Eigen: its forward
    contracts a transposed copy of the rows that XLA does not fold back into the product (which
    YNNPACK would take), and its input gradient is ``(kernel @ g.T).T``; values and both
    gradients are ``x @ kernel``'s. Which products qualify."""
    assert layers._use_few_rows(jnp.zeros((16, 9216)), jax.ShapeDtypeStruct((9216, 4096),
                                                                            jnp.float32))
    assert layers._use_few_rows(jnp.zeros((64, 4096)), jnp.zeros((4096, 4096)))
    assert not layers._use_few_rows(jnp.zeros((128, 4096)), jnp.zeros((4096, 4096)))
    assert not layers._use_few_rows(jnp.zeros((16, 4096)), jnp.zeros((4096, 1000)))
    assert not layers._use_few_rows(jnp.zeros((16, 4096), jnp.bfloat16),
                                    jnp.zeros((4096, 4096), jnp.bfloat16))
    symbolic = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 4096"), jnp.float32)
    assert not layers._use_few_rows(symbolic, jnp.zeros((4096, 4096)))  # jax.export, any batch
    monkeypatch.setattr(layers, "_FEW_ROWS_MIN_KERNEL", 1)
    x, w, r = normal(0, (2, 3, 40)), normal(1, (40, 24)), normal(2, (2, 3, 24))
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) * r)  # noqa: E731
    with layers.implementation("fast"):
        forward = jax.jit(layers.dense).lower(x, w).compile().as_text()
        grads = jax.jit(jax.value_and_grad(loss(layers.dense), (0, 1)))
        backward, got = grads.lower(x, w).compile().as_text(), grads(x, w)
    assert "lhs_contracting_dims={0}" in forward, forward
    assert re.search(r"f32\[40,6\]\{1,0\} dot\(", backward), backward  # (kernel @ g.T), 6 rows
    ref = jax.jit(jax.value_and_grad(loss(lambda x, w: x @ w), (0, 1)))(x, w)
    _assert_close(ref, got, 2e-5)


def test_bf16_dense_layers_are_bf16_products():
    """A bf16 classifier (``layers.Dense`` and ``DenseAsConv``): forward, input and weight
    gradient each one product of bf16 operands into float32 (as the 1x1 convolutions)."""
    x = normal(0, (4, 24), jnp.bfloat16)
    for model in (layers.Dense(16, dtype=jnp.bfloat16),
                  layers.DenseAsConv(16, dtype=jnp.bfloat16)):
        params = model.init(jax.random.key(0), x)
        loss = lambda p, x: jnp.sum(model.apply(p, x).astype(jnp.float32))  # noqa: E731
        with layers.implementation("fast"):
            ops = _operand_dtypes(jax.jit(jax.value_and_grad(loss, (0, 1))).lower(
                params, x).as_text())
        assert ops == [("dot_general", ("bf16", "bf16"), "f32")] * 3, ops


@pytest.mark.parametrize("layer", ["Dense", "DenseAsConv"])
def test_bf16_classifier_kernel_gradient_is_the_float32_sums(layer):
    """A bf16 classifier's float32 kernel is rounded to bf16 inside the product, and its
    gradient is the product's float32 sums, not rounded to bf16 and converted back (two passes
    over fc6's 38M entries): equal to the float32 product of the same bf16 operands, finer than
    bf16, and never a bf16 array in the compiled program (here the input is a constant, so the
    kernel's own bf16 copy, which only the input gradient reads, is not computed either). The
    bias gradient is a float32 sum too (``add_bias``)."""
    x = normal(0, (6, 40), jnp.bfloat16)
    model = getattr(layers, layer)(24, dtype=jnp.bfloat16)
    params = model.init(jax.random.key(0), x)
    r = normal(1, (6, 24), jnp.bfloat16)
    loss = lambda p: jnp.sum(model.apply(p, x).astype(jnp.float32) * r)  # noqa: E731
    with layers.implementation("fast"):
        grads = jax.jit(jax.grad(loss))
        text = grads.lower(params).compile().as_text()
        got = grads(params)["params"]
    x32, r32 = x.astype(jnp.float32), r.astype(jnp.float32)
    np.testing.assert_allclose(got["kernel"], x32.T @ r32, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["bias"], r32.sum(0), rtol=1e-6, atol=1e-6)
    assert got["kernel"].dtype == jnp.float32
    assert (got["kernel"] != got["kernel"].astype(jnp.bfloat16).astype(jnp.float32)).any()
    assert not re.search(r"bf16\[(40,24|24,40)\]", text), text  # no bf16 weight gradient


def test_dense_refuses_fields_it_does_not_use():
    x = jnp.ones((2, 8))
    for fields in ({"precision": "highest"}, {"dot_general": jax.lax.dot_general}):
        with pytest.raises(ValueError, match="use flax.linen.Dense"):
            layers.Dense(4, **fields).init(jax.random.key(0), x)


@pytest.mark.parametrize("kernel_shape,hw,stride,dtype,tile,batch", [
    ((3, 3, 128, 128), 10, 1, jnp.float32, 2, 2),  # as the forward (_use_winograd)
    ((3, 3, 128, 128), 28, 1, jnp.float32, 4, 2),  # from 28x28 outputs: F(3x3, 4x4)
    ((3, 3, 64, 64), 56, 1, jnp.float32, 4, 2),  # 64 x 64: the weight gradient only
    ((3, 3, 64, 64), 14, 1, jnp.float32, 2, 2),
    ((3, 3, 64, 64), 8, 1, jnp.float32, 0, 16),  # the CIFAR nets' last stage: per-tap products
    ((3, 3, 64, 64), 8, 1, jnp.float32, 4, 64),  # ... from 2^24 sums per tap (N*Ho*Wo*C*O)
    ((3, 3, 128, 128), 16, 1, jnp.float32, 4, 2),  # whole 4x4 tiles: F(3x3, 4x4) below 28x28
    ((3, 3, 128, 128), 12, 1, jnp.float32, 4, 2),
    ((3, 3, 64, 128), 13, 1, jnp.float32, 2, 2),
    ((3, 3, 48, 128), 56, 1, jnp.float32, 4, 2),  # _use_winograd's rule: 48 x 128 channels
    ((3, 3, 32, 128), 56, 1, jnp.float32, 0, 1),  # 64 x 64 products, fewer than 64 inputs
    ((3, 3, 32, 128), 56, 1, jnp.float32, 4, 2),  # ... with 2^24 sums per tap and more
    ((3, 3, 32, 96), 28, 1, jnp.float32, 4, 16),  # googlenet's 32 -> 96 at 28x28
    ((3, 3, 16, 32), 28, 1, jnp.float32, 0, 16),  # googlenet's 16 -> 32: fewer sums
    ((3, 3, 16, 16), 32, 1, jnp.float32, 4, 128),  # resnet20 at batch 128
    ((3, 3, 32, 32), 16, 1, jnp.float32, 4, 128),
    ((3, 3, 32, 32), 10, 1, jnp.float32, 2, 256),
    ((3, 3, 16, 16), 32, 1, jnp.float32, 0, 16),  # ... at the experiments' batch 16
    ((3, 3, 48, 12), 32, 1, jnp.float32, 0, 128),  # DenseNet-BC's growth: its planes
    ((3, 3, 128, 32), 56, 1, jnp.float32, 0, 16),  # densenet121's: its patches
    ((3, 3, 32, 64), 56, 1, jnp.float32, 0, 1),
    ((3, 3, 256, 256), 7, 1, jnp.float32, 0, 64),  # 7x7 outputs: per-tap products (_small_output)
    ((3, 3, 256, 256), 28, 2, jnp.float32, 0, 16),  # strided
    ((3, 3, 256, 256), 28, 1, jnp.bfloat16, 0, 16),
    ((5, 5, 64, 192), 27, 1, jnp.float32, 2, 2),  # 5x5s: F(5x5, 2x2) at any size
    ((5, 5, 64, 192), 28, 1, jnp.float32, 2, 2),
    ((5, 5, 32, 64), 14, 1, jnp.float32, 0, 64),
])
def test_which_weight_gradients_take_winograd(kernel_shape, hw, stride, dtype, tile, batch):
    geo = layers._geometry((batch, hw, hw, kernel_shape[2]), kernel_shape, (stride, stride),
                           ((1, 1), (1, 1)))
    assert layers._winograd_weight_grad_tile(kernel_shape, dtype, geo, batch) == tile


def test_weight_gradient_rule_takes_a_symbolic_batch():
    """jax.export traces for any batch size: the sums are not counted, the other rules hold."""
    batch = jax.export.symbolic_shape("b")[0]
    for kernel_shape, hw, tile in [((3, 3, 32, 96), 28, 0), ((3, 3, 64, 64), 56, 4)]:
        geo = layers._geometry((2, hw, hw, kernel_shape[2]), kernel_shape, (1, 1),
                               ((1, 1), (1, 1)))
        assert layers._winograd_weight_grad_tile(kernel_shape, jnp.float32, geo, batch) == tile


@pytest.mark.parametrize("hw,channels,weight_grad_products", [
    (10, 128, 16), (13, 384, 16), (14, 512, 16), (16, 128, 36), (28, 128, 36), (28, 512, 36)])
def test_winograd_computes_forward_and_both_gradients_as_products(hw, channels,
                                                                  weight_grad_products):
    """16 products each for the forward and input gradient (F(2x2, 3x3)) at any map size above
    7x7; 16 or, from 28x28 outputs or whole 4x4 tiles, 36 for the weight gradient (F(3x3, 4x4))."""
    x, w = jnp.zeros((2, hw, hw, channels)), jnp.zeros((3, 3, channels, channels))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(layers.conv2d(x, w, 1, 1)),
                                        (0, 1)))(x, w))
    # The kernel transforms (the forward's, the input gradient's of the flipped kernel, the
    # weight gradient's G^T P G) are sums of slices, not products (XLA:CPU's einsum products for
    # them took ~10x as long).
    assert jaxpr.count("conv_general_dilated") == 0
    assert jaxpr.count("dot_general") == 2 * 16 + weight_grad_products


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_5x5_winograd_computes_forward_and_both_gradients_as_products(dtype):
    """alexnet's 5x5 (64 -> 192 at 27x27) by F(2x2, 5x5): 36 products each for the forward, the
    input gradient and the weight gradient, none of them a convolution; bfloat16 computes it in
    float32 (the transformed tiles in bf16 err by ~3%)."""
    x, w = jnp.zeros((2, 27, 27, 64), dtype), jnp.zeros((5, 5, 64, 192), dtype)
    grads = jax.grad(lambda x, w: jnp.sum(layers.conv2d(x, w, 1, 2).astype(jnp.float32)), (0, 1))
    jaxpr = str(jax.make_jaxpr(grads)(x, w))
    assert jaxpr.count("conv_general_dilated") == 0
    assert jaxpr.count("dot_general") == 3 * 36  # the transforms are sums of slices
    ops = _operand_dtypes(jax.jit(grads).lower(x, w).as_text())
    assert [o for o in ops if o[0] == "dot_general"] and \
        all(o == ("dot_general", ("f32", "f32"), "f32") for o in ops), ops


def test_5x5_winograd_error_is_float32_scale():
    """F(2x2, 5x5)'s transforms (entries up to 5 and 2/3) keep the relative error of the output
    and of the weight gradient within ~1e-5 of the float32 convolution's."""
    x, w = normal(0, (2, 27, 27, 64)), normal(1, (5, 5, 64, 96), scale=0.05)
    g = normal(2, (2, 27, 27, 96))
    pad = ((2, 2), (2, 2))
    ref = layers._xla_conv(x, w, (1, 1), pad)
    dw_ref = layers._xla_weight_grad(x, g, w.shape, layers._geometry(x.shape, w.shape, (1, 1), pad))
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
    assert rel(layers._winograd_conv(x, w, pad), ref) < 1e-5
    assert rel(layers._winograd_weight_grad(x, g, pad, 2, 5), dw_ref) < 1e-5


@pytest.mark.parametrize("case", ["stem_7x7_stride2", "stem_11x11_stride4"])
def test_strided_stems_are_stride_1_convolutions_of_blocks(case):
    shape, k, stride, padding, *_ = CONV_CASES[case]
    jaxpr = str(jax.make_jaxpr(lambda x, w: layers.conv2d(x, w, stride, padding))(
        jnp.zeros(shape), jnp.zeros((k, k, shape[-1], 8))))
    assert jaxpr.count("conv_general_dilated") == 1 and "window_strides=(1, 1)" in jaxpr
    assert f"{stride * stride * shape[-1]}" in jaxpr  # s*s*3 channels


def test_unknown_implementation_is_one_line_error():
    with pytest.raises(ValueError, match="unknown layer implementation 'cudnn'; choose one of"):
        with layers.implementation("cudnn"):
            pass
    with pytest.raises(ValueError, match="'fast:eigen'; 'fast:' takes one or more of conv1x1, "
                                         "conv, max_pool, batch_norm joined by"):
        with layers.implementation("fast:eigen"):
            pass


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_batch_norm_backward_equals_autodiff(dtype):
    """Training BN's own backward (two reductions, one pass) gives autodiff's gradients in the
    input, scale and shift through all three outputs (the normalized map and the batch mean and
    variance, which feed the running averages), also for a constant channel (its variance
    clipped at 0) and a channel far from zero mean; its forward is the same program's."""
    x = normal(0, (4, 6, 6, 8)) * 2 + 1
    x = x.at[..., 3].set(2.0).at[..., 5].multiply(0.1).at[..., 5].add(30.0)
    x = x.astype(dtype)
    scale, bias = 1 + 0.3 * normal(1, (8,)), 0.1 * normal(2, (8,))
    w, wm, wv = normal(3, x.shape), normal(4, (8,)), normal(5, (8,))

    def autodiff(x, scale, bias):
        mu, var = layers._batch_statistics(x, dtype=dtype, axis_name=None, fast=True)
        return layers._bn_out(x, mu, var, scale, bias, epsilon=1e-5, dtype=dtype), mu, var

    def loss(bn):
        def f(x, scale, bias):
            y, mu, var = bn(x, scale, bias)
            return jnp.sum(jnp.sin(y.astype(jnp.float32)) * w) + mu @ wm + var @ wv
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    own = lambda x, s, b: layers._bn_batch(x, s, b, 1e-5, dtype)  # noqa: E731
    chex.assert_trees_all_equal(jax.jit(own)(x, scale, bias), jax.jit(autodiff)(x, scale, bias))
    (want, want_grads), (got, got_grads) = loss(autodiff)(x, scale, bias), loss(own)(x, scale, bias)
    assert got == want
    # bf16: dx is rounded to bf16 (half an ulp: 2^-9 of the largest), the rest is float32
    _assert_close(want_grads, got_grads, 2e-6 if dtype == jnp.float32 else 2 ** -8)


@pytest.mark.parametrize("impl,fast", [
    ("fast:max_pool", {"max_pool"}), ("fast:conv1x1", {"conv1x1"}), ("fast:conv", {"conv"}),
    ("fast:batch_norm", {"batch_norm"}),
    ("fast:conv1x1+max_pool", {"conv1x1", "max_pool"}), ("fast:conv+conv1x1+max_pool",
                                                         {"conv", "conv1x1", "max_pool"}),
    ("xla", set()), ("fast", {"conv", "conv1x1", "max_pool", "batch_norm"})])
def test_one_formulation_at_a_time(impl, fast):
    """'fast:OP+OP' (an A/B of single formulations, e.g. on a GPU) rewrites only those ops: a 1x1
    convolution is a product, a 3x3 one takes its own gradients, a max pool is the maximum of
    its windows' slices and its gradient masks over them, training BN takes its own backward;
    the rest stays XLA's (autodiff). Values and gradients equal XLA's."""
    x, w1, w3 = normal(0, (2, 8, 8, 16)), normal(1, (1, 1, 16, 24)), normal(2, (3, 3, 24, 24))
    bn = layers.batch_norm(True)
    bn_vars = bn.init(jax.random.key(0), normal(4, (2, 8, 8, 24)))

    def net(x, w1, w3):
        y = layers.conv2d(layers.conv2d(x, w1), w3, 1, 1)
        y = bn.apply(bn_vars, y, mutable=["batch_stats"])[0]
        return jnp.sin(layers.max_pool(y, 3, 2, 1)).sum()

    with layers.implementation(impl):
        assert {op for op in layers.FAST_OPS if layers.use_fast_formulations(op)} == fast
        assert layers.use_fast_formulations() == (fast == set(layers.FAST_OPS))
        one = str(jax.make_jaxpr(lambda x, w: layers.conv2d(x, w))(x, w1))
        three = str(jax.make_jaxpr(lambda x, w: layers.conv2d(x, w, 1, 1))(normal(3, (2, 8, 8, 24)),
                                                                            w3))
        pool = str(jax.make_jaxpr(lambda x: layers.max_pool(x, 3, 2, 1))(x))
        norm = str(jax.make_jaxpr(lambda x: bn.apply(bn_vars, x, mutable=["batch_stats"]))(
            normal(4, (2, 8, 8, 24))))
        grads = jax.jit(jax.grad(lambda *a: net(*a), argnums=(0, 1, 2)))(x, w1, w3)
    assert ("conv_general_dilated" not in one) == ("conv1x1" in fast)
    assert ("custom_vjp" in three) == ("conv" in fast)  # XLA's forward, its own gradients
    assert ("custom_vjp" in pool) == ("max_pool" in fast)
    assert ("custom_vjp" in norm) == ("batch_norm" in fast)
    # and its forward is the windows' maximum, not a reduce-window (which XLA:CPU lets YNNPACK
    # fuse with the convolutions and products around it: slow, see layers._max_pool_by_windows)
    assert ("reduce_window" not in pool) == ("max_pool" in fast)
    with layers.implementation("xla"):
        ref = jax.jit(jax.grad(lambda *a: net(*a), argnums=(0, 1, 2)))(x, w1, w3)
    _assert_close(ref, grads, 1e-5)


def test_conv2d_module_has_nn_conv_parameters():
    x = normal(0, (2, 8, 8, 6))
    ours = layers.Conv2d(5, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="c")
    flax_conv = nn.Conv(5, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="c")
    v_ours, v_flax = ours.init(jax.random.key(1), x), flax_conv.init(jax.random.key(1), x)
    chex.assert_trees_all_equal(v_ours, v_flax)  # names, shapes, dtypes and init values
    np.testing.assert_allclose(ours.apply(v_ours, x), flax_conv.apply(v_flax, x), atol=1e-5)
    bf16 = layers.Conv2d(5, 3, padding=1, dtype=jnp.bfloat16).init_with_output(jax.random.key(1), x)
    assert bf16[0].dtype == jnp.bfloat16 and bf16[1]["params"]["kernel"].dtype == jnp.float32


POOL_CASES = [((2, 9, 9, 3), 3, 2, 1, False), ((2, 10, 10, 3), 3, 2, 0, True),
              ((2, 8, 8, 4), 2, 2, 0, False), ((2, 7, 7, 2), 3, 1, 1, True),
              ((2, 13, 13, 2), 3, 2, 0, False),
              # the gradient's stride phases: 3x3/3, a window narrower than its stride, 5x5/2
              ((2, 11, 13, 3), 3, 3, 0, True), ((2, 9, 10, 2), 2, 3, 0, False),
              ((1, 12, 11, 2), 5, 2, 2, False),
              ((1, 13, 14, 2), 12, 1, 0, False)]  # 144 taps: int32 taps, not int8


@pytest.mark.parametrize("shape,window,stride,padding,ceil_mode", POOL_CASES)
def test_max_pool_gradient_equals_xla_with_ties(shape, window, stride, padding, ceil_mode):
    x = normal(0, shape)
    x = jnp.round(nn.relu(x) * 2) / 2  # after ReLU most windows hold tied maxima
    assert len(np.unique(np.asarray(x))) < x.size // 4

    def loss(x):
        y = layers.max_pool(x, window, stride, padding, ceil_mode=ceil_mode)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape)), y

    ref, got = _both(jax.value_and_grad(loss, has_aux=True), x)
    # The first maximum of each window gets the gradient: another tie choice moves whole window
    # gradients; what remains is float32 rounding where overlapping windows' gradients add up.
    chex.assert_trees_all_close(ref, got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,window", [((2, 8, 8, 3), 2), ((2, 9, 7, 4), 2), ((1, 9, 9, 2), 3),
                                          ((2, 8, 6, 3), (2, 3))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_avg_pool_of_tiling_windows_equals_xla(shape, window, dtype):
    """bfloat16 windows that tile the input (stride = window, no padding; odd sizes drop the last
    rows as torch's floor mode) are averaged as blocks of a reshape, not by a reduce-window (float32
    keeps XLA's); the same values and gradients as XLA's reduce-window."""
    x = normal(0, shape, dtype)

    def loss(x):
        y = layers.avg_pool(x, window, window)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * jnp.arange(y.size).reshape(y.shape)), y

    with layers.implementation("fast"):
        assert ("reduce_window" in str(jax.make_jaxpr(loss)(x))) == (dtype == jnp.float32)
    ref, got = _both(jax.value_and_grad(loss, has_aux=True), x)
    assert got[0][1].dtype == got[1].dtype == dtype
    # the pooled values and the input gradient (bf16: XLA's reduce-window sums in bf16, rounding
    # each add; the blocks' mean is float32's, rounded once)
    _assert_close((ref[0][1], ref[1]), (got[0][1], got[1]),
                  1e-6 if dtype == jnp.float32 else 1e-2)


# One model per kind of layer mix (bottleneck + strided 1x1 + stem + max pool; dense concatenation +
# transitions + average pool; grouped 11x11/4 stem + LRN); every single geometry is checked above.
@pytest.mark.parametrize("arch,size,overrides", [
    ("resnet50", 32, dict(widths=(4, 8, 8, 16), stage_sizes=(1, 1, 1, 1))),
    ("densenet_bc_100", 16, dict(block_config=(2, 2, 2))),
    ("alexnet_original", 67, dict(widths=(8, 16, 16, 16, 8), fc_features=16)),
])
def test_model_gradients_equal_xla(arch, size, overrides):
    model = create_model(arch, num_classes=5, **overrides)
    # Batch 8: with 2 images, BN at the last stage's 1x1 maps normalizes over 2 values, and
    # XLA's own float32 gradients then differ from float64 ones by 0.3% (rounding, amplified).
    x = normal(0, (8, size, size, 3))
    with layers.implementation("xla"):
        variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
        logits = out[0] if isinstance(out, tuple) else out
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

    ref, got = _both(jax.value_and_grad(loss), variables["params"])
    _assert_close(ref, got, 1e-4)
