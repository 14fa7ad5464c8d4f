"""Model analysis (cnn_jax.analysis / cnn_jax.summary): the design claims of the papers as facts.

Every number below is computed by the analysis from a traced model; the literals are the
hand-derived values they must equal. Registered models are traced (jax.make_jaxpr on abstract
inputs, no compute); only the XLA cross-check compiles.
"""

import csv
import io
import json
import math
import re
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from absl import flags

from cnn_jax import analysis, summary
from cnn_jax.analysis import analyze
from cnn_jax.models import count_params, create_model, layers, list_models, model_info
from cnn_jax.summary import analyze_registered


def registered(name):
    if name not in list_models():
        pytest.fail(f"model {name!r} is not registered (registered: {list_models()})")
    return analyze_registered(name)


class Stack(nn.Module):
    """Plain conv stack from a table of (features, kernel, stride, padding); no bias."""

    layers: tuple

    @nn.compact
    def __call__(self, x):
        for i, (c, k, s, p) in enumerate(self.layers):
            x = nn.Conv(c, (k, k), (s, s), padding=[(p, p)] * 2, use_bias=False,
                        name=f"conv{i}")(x)
        return x


def stack(layers, input_shape):
    return analyze(Stack(tuple(layers)), input_shape, train=None)


def conv_weights(row):
    """Kernel weights of a conv row (no bias): kh * kw * cin / groups * cout."""
    return math.prod(row.kernel) * row.in_features // row.groups * row.out_features


# ---------------------------------------------------------------------------------------------
# The library on user-written modules.


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        y = layers.ConvBNAct(8, 3, padding=1, name="c1")(x, train)
        y = nn.Conv(8, (3, 3), padding=1, name="c2")(y)
        return nn.relu(y + x)


class SetupNet(nn.Module):
    """setup()-defined submodules, a shared layer called twice, a helper method, a bare param."""

    def setup(self):
        self.stem = nn.Conv(8, (3, 3), padding=1, name="stem")
        self.shared = nn.Conv(8, (3, 3), padding=1, use_bias=False, name="shared")
        self.block = nn.remat(Block, static_argnums=(2,))(name="block")
        self.head = nn.Dense(4, name="head")
        self.drop = nn.Dropout(0.5, name="drop")
        self.unused = nn.Dense(3, name="unused")  # params exist, never called in __call__
        self.scale = self.param("scale", nn.initializers.ones, (8,))

    def features(self, x, train):
        x = self.stem(x)
        x = layers.max_pool(x, 3, 2, 1)
        x = self.shared(self.shared(x))
        x = self.block(x, train)
        return jax.jit(lambda t: t * 2)(x) * self.scale

    def __call__(self, x, train=False):
        x = self.features(x, train)
        x = self.drop(layers.global_avg_pool(x), deterministic=not train)
        return self.head(x)

    def init_all(self, x):
        return self.unused(self(x)[:, :1].repeat(8, axis=1))


def test_generic_module_rows_names_and_totals():
    model = SetupNet()
    x = jnp.zeros((2, 16, 16, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, method="init_all"))
    a = analyze(model, (2, 16, 16, 3), variables=variables)
    names = [r.name for r in a]
    assert names == ["stem", "max_pool_0", "shared", "shared#1", "block/c1/conv", "block/c1/bn",
                     "block/c2", "global_avg_pool_0", "head", "<root>", "unused"], names
    kinds = {r.name: r.kind for r in a}
    assert kinds["block/c1/bn"] == "batch_norm" and kinds["<root>"] == "params"
    assert a.find("<root>").params == 8  # the bare `scale` of the top-level module
    assert kinds["unused"] == "params" and a.find("unused").params == 8 * 3 + 3
    # Every parameter is attributed exactly once.
    assert sum(r.params for r in a) == a.totals.params == count_params(variables["params"])
    assert a.find("shared").params == 9 * 8 * 8 and a.find("shared#1").params == 0
    assert a.find("stem").params == 9 * 3 * 8 + 8  # bias attributed to its conv
    # MACs include the batch of 2: out_elems * kh * kw * cin.
    assert a.find("stem").macs == 2 * 16 * 16 * 8 * 9 * 3
    assert a.find("head").macs == 2 * 8 * 4
    # RF: 3 -> pool 3/2 -> 5 (jump 2) -> four 3x3 convs, +4 each -> 21; global pool over 8.
    assert a.find("stem").rf_size == (3, 3)
    assert a.find("max_pool_0").rf_size == (5, 5) and a.find("max_pool_0").rf_jump == (2, 2)
    assert a.find("shared#1").rf_size == (13, 13)
    assert a.find("block/c2").rf_size == (21, 21)
    assert a.find("global_avg_pool_0").rf_size == (21 + 7 * 2,) * 2
    assert a.totals.weight_layers == 6 and a.totals.depth == 6
    # Train mode: BN batch statistics are not features, so the RFs do not change; dropout shows.
    t = analyze(model, (2, 16, 16, 3), train=True, variables=variables)
    assert "drop" in [r.name for r in t]
    assert t.find("block/c2").rf_size == (21, 21)
    assert t.totals.macs == a.totals.macs and t.totals.params == a.totals.params


class LaxOps(nn.Module):
    """Receptive-field rules of raw lax ops: explicit pad + VALID conv, dilation, strided slice,
    and merges of aligned and misaligned branches."""

    @nn.compact
    def __call__(self, x):
        k = self.param("k", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], 4))
        dn = ("NHWC", "HWIO", "NHWC")
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        a = jax.lax.conv_general_dilated(padded, k, (1, 1), "VALID", dimension_numbers=dn)
        b = jax.lax.conv_general_dilated(x, k, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
                                         dimension_numbers=dn)
        c = a[:, ::2, ::2, :]  # ResNet option-A shortcut style subsampling
        d = jax.lax.conv_general_dilated(x, k, (2, 2), ((0, 2), (0, 2)), dimension_numbers=dn)
        misaligned = nn.Conv(4, (1, 1), name="after_misaligned")(c + d)
        aligned = nn.Conv(4, (1, 1), name="after_aligned")(a + b)
        return misaligned, aligned


def test_receptive_field_rules_on_raw_lax_ops():
    a = analyze(LaxOps(), (1, 16, 16, 3), train=None)
    convs = a.select(kinds=["conv"])
    # pad 1 then VALID 3x3 = a 'same' 3x3: size 3, centred on pixel 0.
    assert (convs[0].rf_size, convs[0].rf_start) == ((3, 3), (0, 0))
    # 3x3 dilated by 2 = 5x5 window.
    assert convs[1].rf_size == (5, 5)
    # Stride-2 3x3 without low padding: the first output is centred on pixel 1.
    assert (convs[2].rf_jump, convs[2].rf_start) == ((2, 2), (1, 1))
    # The same-weight conv counted 3 times; its parameters once; the root's kernel row is the
    # first conv (the weight operand's leaf), the 1x1 convs carry their own.
    assert [r.name for r in convs] == ["conv_0", "conv_1", "conv_2", "after_misaligned",
                                       "after_aligned"]
    assert [r.params for r in convs] == [9 * 3 * 4, 0, 0, 4 * 4 + 4, 4 * 4 + 4]
    assert a.totals.params == sum(r.params for r in a)
    assert sum(r.macs for r in convs[:3]) == (16 * 16 + 16 * 16 + 8 * 8) * 4 * 27
    # The padding-aware count drops the taps that read the conv's own padding: per axis, of
    # the dilated conv's 16 outputs 12 see 3 taps and 4 see 2; of the strided conv's 8 outputs,
    # 7 see 3 and the last 2. Explicit jnp.pad zeros are data to the conv.
    assert convs[1].valid_macs == (12 * 3 + 4 * 2) ** 2 * 4 * 3
    assert convs[2].valid_macs == (7 * 3 + 2) ** 2 * 4 * 3
    assert convs[0].valid_macs == convs[0].macs
    # Merges are the union of the inputs' fields. Aligned (both centred on pixel 0): the max,
    # Araujo et al.'s rule. Misaligned (pixels -1..1 and 0..2): the span -1..2.
    assert convs[4].rf_size == (5, 5) and convs[4].rf_start == (0, 0)
    assert convs[3].rf_size == (4, 4) and convs[3].rf_start == (0.5, 0.5)


# ---------------------------------------------------------------------------------------------
# The papers' claims.


@pytest.mark.parametrize("n,k", [(2, 5), (3, 7)])
def test_stacked_3x3_have_the_receptive_field_of_one_larger_kernel(n, k):
    c = 64
    small = stack([(c, 3, 1, 1)] * n, (1, 32, 32, c))
    large = stack([(c, k, 1, k // 2)], (1, 32, 32, c))
    assert small[-1].rf_size == large[-1].rf_size == (k, k)
    assert small[-1].output_shape == large[-1].output_shape
    assert small.totals.params == n * 9 * c * c  # 18 C^2 / 27 C^2
    assert large.totals.params == k * k * c * c  # 25 C^2 / 49 C^2
    assert small.totals.macs * k * k == large.totals.macs * n * 9  # same output size: MACs ~ params
    assert small.totals.depth == n and large.totals.depth == 1  # n-1 more non-linearities


def test_alexnet_11x11_stride4_against_3x3_stacks():
    alex = registered("alexnet")
    conv1 = alex.select(kinds=["conv"])[0]
    assert conv1.kernel == (11, 11) and conv1.strides == (4, 4)
    assert conv1.rf_size == (11, 11) and conv1.rf_jump == (4, 4)
    c_out = conv1.out_features  # 64 in torchvision's layout
    # Stride-1 3x3 layers needed to reach RF 11: each adds 2.
    n, rf = 0, 1
    while rf < conv1.rf_size[0]:
        rf, n = rf + 2, n + 1
    assert n == 5
    s1 = stack([(c_out, 3, 1, 1)] * n, (1, 224, 224, 3))
    assert s1[-1].rf_size == (11, 11)
    # Between C-channel layers the stack wins: 45 C^2 against 121 C^2 weights.
    cc = stack([(c_out, 3, 1, 1)] * n, (1, 56, 56, c_out))
    big = stack([(c_out, 11, 1, 5)], (1, 56, 56, c_out))
    assert cc[-1].rf_size == big[-1].rf_size == (11, 11)
    assert (cc.totals.params, big.totals.params) == (45 * c_out ** 2, 121 * c_out ** 2)
    # On the 3-channel image it does not: the first layer has few weights to save, and stride 1
    # keeps every later layer at full resolution.
    assert conv_weights(conv1) == 11 * 11 * 3 * c_out == 23_232
    assert s1.totals.params == 27 * c_out + 4 * 9 * c_out * c_out == 149_184
    assert conv1.macs == 55 * 55 * 11 * 11 * 3 * c_out == 70_276_800
    assert s1.totals.macs == 224 * 224 * c_out * (27 + 4 * 9 * c_out) > 100 * conv1.macs
    # The cheapest 3x3 stack with AlexNet's RF *and* jump: s2, s1, s2 -> RF 11, jump 4.
    s3 = stack([(c_out, 3, 2, 1), (c_out, 3, 1, 1), (c_out, 3, 2, 1)], (1, 224, 224, 3))
    assert s3[-1].rf_size == (11, 11) and s3[-1].rf_jump == (4, 4)
    assert s3.totals.params == 27 * c_out + 2 * 9 * c_out * c_out == 75_456
    assert s3.totals.macs == (112 * 112 * (27 + 9 * c_out) + 56 * 56 * 9 * c_out) * c_out
    assert s3.totals.macs > 8 * conv1.macs


def test_1x1_bottleneck_before_3x3():
    plain = stack([(128, 3, 1, 1)], (1, 28, 28, 128))
    reduced = stack([(32, 1, 1, 0), (128, 3, 1, 1)], (1, 28, 28, 128))
    assert plain.totals.params == 3 * 3 * 128 * 128 == 147_456
    assert reduced.totals.params == 128 * 32 + 3 * 3 * 32 * 128 == 40_960
    assert plain[-1].output_shape == reduced[-1].output_shape == (1, 28, 28, 128)
    assert plain[-1].rf_size == reduced[-1].rf_size == (3, 3)
    assert plain.totals.macs / reduced.totals.macs == pytest.approx(147_456 / 40_960)


def inception_weights(a, block):
    """Conv weights of one Inception block, as built and without its 1x1 reductions.

    Without reductions, each branch's first k>1 conv reads the block input directly and the 1x1
    convs in front of it disappear; the 1x1 branch and the pool projection stay.
    """
    rows = a.select(rf"^{block}/", kinds=["conv"])
    block_in = rows[0].in_features  # branch1 reads the block input
    branches = {}
    for r in rows:
        branches.setdefault(re.match(rf"{block}/(branch\d)", r.name).group(1), []).append(r)
    with_, without = 0, 0
    for convs in branches.values():
        with_ += sum(conv_weights(r) for r in convs)
        big = [i for i, r in enumerate(convs) if r.kernel != (1, 1)]
        if not big:
            without += sum(conv_weights(r) for r in convs)
            continue
        first = convs[big[0]]
        without += math.prod(first.kernel) * block_in * first.out_features
        without += sum(conv_weights(r) for r in convs[big[0] + 1:])
    return with_, without


@pytest.mark.parametrize("name,with_,without", [
    # torchvision's branch3 is a 3x3 (a known deviation kept for weight compatibility).
    ("googlenet", 12_288 + 18_432 + 110_592 + 3_072 + 4_608 + 6_144,
     12_288 + 9 * 192 * 128 + 9 * 192 * 32 + 6_144),
    # the paper's true 5x5 branch.
    ("googlenet_paper", 12_288 + 18_432 + 110_592 + 3_072 + 25 * 16 * 32 + 6_144,
     12_288 + 9 * 192 * 128 + 25 * 192 * 32 + 6_144),
])
def test_inception_1x1_reductions(name, with_, without):
    a = registered(name)
    got = inception_weights(a, "inception3a")
    assert got == (with_, without)
    assert without / with_ > 1.8
    blocks = sorted({r.name.split("/")[0] for r in a.select(r"^inception\d[a-z]/")})
    assert blocks == ["inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
                      "inception4d", "inception4e", "inception5a", "inception5b"]
    totals = [inception_weights(a, b) for b in blocks]
    assert sum(w for _, w in totals) > 1.8 * sum(w for w, _ in totals)


def test_resnet_bottleneck_against_two_3x3_layers():
    r50 = registered("resnet50")
    bottleneck = r50.select(r"^layer1_1/conv\d$")
    assert [(r.kernel, r.in_features, r.out_features) for r in bottleneck] == [
        ((1, 1), 256, 64), ((3, 3), 64, 64), ((1, 1), 64, 256)]
    b_weights = sum(conv_weights(r) for r in bottleneck)
    assert b_weights == 256 * 64 + 9 * 64 * 64 + 64 * 256 == 69_632
    two = stack([(256, 3, 1, 1)] * 2, (1, 56, 56, 256))
    assert two.totals.params == 2 * 9 * 256 * 256 == 1_179_648  # 16.9x the bottleneck
    assert two.totals.macs == 56 * 56 * 1_179_648
    assert sum(r.macs for r in bottleneck) == 56 * 56 * 69_632
    # He et al. 2016: the 256-d bottleneck costs about a 64-d basic block (ResNet-34).
    basic = registered("resnet34").select(r"^layer1_1/conv\d$")
    basic_weights = sum(conv_weights(r) for r in basic)
    assert basic_weights == 2 * 9 * 64 * 64 == 73_728
    assert abs(b_weights / basic_weights - 1) < 0.06
    # RF growth: one 3x3 at jump 4 adds 8; two 3x3 would add 16.
    prev = r50.find("layer1_0/conv3")
    assert bottleneck[-1].rf_size[0] - prev.rf_size[0] == 2 * prev.rf_jump[0] == 8
    assert two[-1].rf_size[0] - 1 == 4


def test_densenet_channel_growth_and_transition_halving():
    a = registered("densenet121")
    k = 32
    channels = a.select(kinds=["conv"])[0].out_features  # stem: 64
    assert channels == 64
    block_sizes = []
    for b in range(1, 5):
        conv1 = a.select(rf"denseblock{b}/denselayer\d+/conv1$")
        conv2 = a.select(rf"denseblock{b}/denselayer\d+/conv2$")
        norm1 = a.select(rf"denseblock{b}/denselayer\d+/norm1$")
        block_sizes.append(len(conv1))
        # Layer i of the block sees the block input plus k new maps from each earlier layer.
        assert [r.in_features for r in conv1] == [channels + i * k for i in range(len(conv1))]
        assert [r.output_shape[-1] for r in norm1] == [channels + i * k for i in range(len(conv1))]
        assert {r.out_features for r in conv2} == {k} and {r.out_features for r in conv1} == {4 * k}
        channels += len(conv1) * k
        if b < 4:
            conv = a.find(f"features_transition{b}/conv")
            pool = a.select(rf"features_transition{b}/avg_pool")[0]
            assert conv.in_features == channels and conv.out_features == channels // 2
            assert pool.output_shape[1:3] == tuple(s // 2 for s in conv.output_shape[1:3])
            channels //= 2
    assert block_sizes == [6, 12, 24, 16]
    assert channels == 1024 and a.find("classifier").in_features == 1024


def _rf(layers):
    """The standard recurrence over (kernel, stride): r += (k - 1) * j, j *= s."""
    r, j = 1, 1
    for k, s in layers:
        r, j = r + (k - 1) * j, j * s
    return r


def test_receptive_field_of_vgg16_and_resnet50():
    vgg = registered("vgg16")
    cfg_d = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M"]
    layers = [(2, 2) if v == "M" else (3, 1) for v in cfg_d]
    assert vgg.find("conv5_3").rf_size == (_rf(layers[:-1]),) * 2 == (196, 196)
    # 212 is often quoted for "conv5": it is the RF after pool5, the next row.
    rows = list(vgg)
    after = rows[rows.index(vgg.find("conv5_3")) + 1]
    assert after.kind == "max_pool" and after.rf_size == (_rf(layers),) * 2 == (212, 212)

    r50 = registered("resnet50")
    # torchvision (v1.5) layout: 7x7/2 conv, 3x3/2 pool, stride on each stage's first 3x3.
    layers = [(7, 2), (3, 2)]
    for blocks, stride in zip((3, 4, 6, 3), (1, 2, 2, 2)):
        for i in range(blocks):
            layers += [(1, 1), (3, stride if i == 0 else 1), (1, 1)]
    last_conv = r50.select(kinds=["conv"])[-1]
    assert last_conv.name == "layer4_2/conv3"
    assert last_conv.rf_size == (_rf(layers),) * 2 == (427, 427)
    assert last_conv.rf_jump == (32, 32)


# Parameter counts of issue 3 (torchvision's published counts).
REGISTRY_PARAMS = {"alexnet": 61_100_840, "vgg16": 138_357_544, "googlenet": 6_624_904,
                   "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                   "densenet121": 7_978_856}
DEPTHS = {"alexnet": 8, "vgg16": 16, "googlenet": 22, "resnet18": 18, "resnet34": 34,
          "resnet50": 50, "densenet121": 121, "resnet20": 20}


@pytest.mark.parametrize("name", sorted(REGISTRY_PARAMS))
def test_totals_match_registry_and_torchvision(name):
    a = registered(name)
    assert a.totals.params == REGISTRY_PARAMS[name] == sum(r.params for r in a)
    assert a.totals.depth == DEPTHS[name]
    tv = model_info(name).torchvision
    if tv and tv.gflops:  # torchvision's "GFLOPS" are MACs at 224
        assert a.totals.macs / 1e9 == pytest.approx(tv.gflops, abs=6e-4)


def test_totals_equal_count_params_of_init():
    model = create_model("resnet20")
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    a = registered("resnet20")
    assert a.totals.params == count_params(variables["params"])
    assert a.totals.state == count_params(variables["batch_stats"])
    assert a.totals.depth == DEPTHS["resnet20"] == a.totals.weight_layers


# XLA's cost analysis counts 2 FLOPs per multiply-accumulate but only for kernel taps that land
# on the input (HloCostAnalysis skips taps in the padding), and adds elementwise work (bias,
# batch norm, ReLU, pooling windows, softmax-free logits). So, measured on these convnets:
# - against the padding-aware count: 1.00 <= XLA / (2 * valid_macs) <= 1.05 at any size
#   (observed 1.001-1.031; the excess is the elementwise work, largest for pre-activation BN);
# - against the papers' convention (every tap): within 10% at 224x224 (observed 0.92-0.99;
#   AlexNet's 13x13 maps lose most to padding); at CIFAR sizes padding is a larger share.
@pytest.mark.parametrize("name,size", [("resnet20", 32), ("alexnet", 224), ("vgg11", 224),
                                       ("resnet18", 224)])
def test_macs_agree_with_xla_cost_analysis(name, size):
    model = create_model(name)
    a = analyze(model, (1, size, size, 3))
    flops = analysis.xla_flops(model, (1, size, size, 3))
    assert 1.0 <= flops / (2 * a.totals.valid_macs) <= 1.05
    if size == 224:
        assert abs(flops / a.totals.flops - 1) <= 0.10


def test_macs_agree_with_xla_on_a_user_module():
    model = SetupNet()
    a = analyze(model, (2, 16, 16, 3))
    flops = analysis.xla_flops(model, (2, 16, 16, 3))
    assert 1.0 <= flops / (2 * a.totals.valid_macs) <= 1.05


# ---------------------------------------------------------------------------------------------
# Output formats, comparison, plot, CLI.


def test_formats():
    a = registered("resnet20")
    table = analysis.format_analysis(a, "table")
    assert "layer1_0/conv1" in table and "269,722 params" in table
    md = analysis.format_analysis(a, "markdown").splitlines()
    assert md[0].startswith("| layer | kind | output |") and md[1].startswith("|---|")
    rows = list(csv.reader(io.StringIO(analysis.format_analysis(a, "csv"))))
    assert rows[0][:5] == ["layer", "kind", "output", "params", "MACs"]
    assert len(rows) == len(a) + 2 and rows[-1][:1] == ["total"]
    assert sum(int(r[3]) for r in rows[1:-1]) == int(rows[-1][3]) == a.totals.params
    data = json.loads(analysis.format_analysis(a, "json"))
    assert data["totals"]["params"] == a.totals.params and len(data["layers"]) == len(a)
    assert data["layers"][0]["rf_size"] == [3, 3]
    with pytest.raises(ValueError, match="unknown format"):
        analysis.format_analysis(a, "yaml")


def test_compare_models_and_plot(tmp_path):
    names = ["alexnet", "vgg16", "googlenet", "resnet50", "densenet121", "resnet20"]
    rows = summary.compare_models(names)
    by = {r.name: r for r in rows}
    assert by["resnet50"].top1 == 76.13 and by["alexnet"].top1 == 56.522
    assert by["vgg16"].top1 == 71.592 and by["googlenet"].top1 == 69.778
    assert by["densenet121"].top1 == 74.434 and by["resnet20"].top1 is None
    assert by["resnet20"].image_size == 32 and by["vgg16"].image_size == 224
    assert by["vgg16"].depth == 16 and by["resnet50"].weight_layers == 54  # + 4 projections
    assert by["vgg16"].params == REGISTRY_PARAMS["vgg16"]
    with_top1 = [n for n in list_models() if model_info(n).torchvision]
    assert len(with_top1) == 19 and all(model_info(n).torchvision.name == n for n in with_top1)
    text = summary.format_comparison(rows)
    assert "torchvision model docs" in text and "76.13" in text
    assert len(list(csv.reader(io.StringIO(summary.format_comparison(rows, "csv"))))) == 7
    assert json.loads(summary.format_comparison(rows, "json"))["models"][0]["name"] == "alexnet"
    path = tmp_path / "zoo.png"
    fig = summary.plot_comparison(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes[0].collections) == len({summary._family(n) for n in names})


def run_cli(argv, capsys):
    fv = flags.FlagValues()
    summary.define_flags(fv)
    fv(["summary"] + argv)
    rc = summary.run(fv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_in_process(capsys, tmp_path):
    rc, out, _ = run_cli(["--arch=resnet20", "--format=json"], capsys)
    assert rc == 0 and json.loads(out)["totals"]["params"] == 269_722
    rc, out, _ = run_cli(["--arch=vgg16"], capsys)
    assert rc == 0 and "conv5_3" in out and "138,357,544 params" in out
    png = tmp_path / "cmp.png"
    rc, out, _ = run_cli(["--compare", "--models=resnet2*", f"--plot={png}"], capsys)
    assert rc == 0 and "resnet20" in out and png.exists()
    rc, out, err = run_cli(["--arch=nope"], capsys)
    assert rc == 1 and out == "" and err.startswith("error: unknown architecture 'nope'")
    assert len(err.strip().splitlines()) == 1
    rc, _, err = run_cli([], capsys)
    assert rc == 1 and "--arch" in err


def test_cli_unknown_arch_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "cnn_jax.summary", "--arch=nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        line for line in proc.stderr.strip().splitlines() if line.startswith("error: ")]
    assert "unknown architecture 'nope'" in proc.stderr


def test_analyze_validates_input_shape():
    with pytest.raises(ValueError, match="batch axis"):
        analyze(Stack(((4, 3, 1, 1),)), (8,), train=None)
    chex.assert_equal(stack([(4, 3, 1, 1)], (1, 8, 8, 2))[0].output_shape, (1, 8, 8, 4))
