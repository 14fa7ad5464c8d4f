"""The ablation experiments (experiments/): every script end to end in --smoke mode, plus helpers.

All smoke runs share one subprocess (TensorFlow and JAX are imported once) started with
``--xla_backend_optimization_level=0``: the tiny networks then compile several times faster.
Compilation still dominates (a few seconds per trained variant), so each experiment trains two of
its variants here; the variant lists themselves are checked without training below.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `experiments` is a top-level folder of the repository, not installed
    sys.path.insert(0, REPO)

from experiments import (activations, alexnet_ablation, bn_placement, common,  # noqa: E402
                         degradation, resnet_vs_densenet, run_all, shortcuts)

# Experiment -> extra smoke flags (two variants, the most different code paths) and the variant
# labels its results must hold.
SMOKE = {
    "degradation": (["--variants=plain14,resnet14"], ["plain14", "resnet14"]),
    "bn_placement": (["--variants=pre,none"], ["pre", "none"]),
    "shortcuts": (["--variants=shortcut A,shortcut C"], ["shortcut A", "shortcut C"]),
    "activations": (["--activations=relu,sigmoid", "--variants=relu-8,sigmoid-14"],
                    ["relu-8", "sigmoid-14"]),
    "alexnet_ablation": (["--variants=paper (all three),none of the three"],
                         ["paper (all three)", "none of the three"]),
    "resnet_vs_densenet": ([], ["resnet20", "densenet_bc_16_k3"]),
}

DRIVER = textwrap.dedent("""
    import importlib, json, sys, time, traceback
    out_root, data_dir, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    status = {}
    for name, extra in plan.items():
        start = time.time()
        argv = ["--smoke", f"--out={out_root}/{name}", f"--data_dir={data_dir}", *extra]
        try:
            code = importlib.import_module(f"experiments.{name}").main(argv)
            status[name] = {"status": "ok" if code == 0 else f"exit {code}", "argv": argv}
        except Exception as e:
            traceback.print_exc()
            status[name] = {"status": f"{type(e).__name__}: {e}", "argv": argv}
        status[name]["seconds"] = round(time.time() - start, 1)
    json.dump(status, open(f"{out_root}/status.json", "w"), indent=1)
""")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run every experiment's --smoke mode once; returns (results root, status per experiment)."""
    root = tmp_path_factory.mktemp("experiments")
    data_dir = tmp_path_factory.mktemp("tfds")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    plan = {name: extra for name, (extra, _) in SMOKE.items()}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(root), str(data_dir),
                           json.dumps(plan)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    status_path = root / "status.json"
    assert proc.returncode == 0 and status_path.exists(), proc.stderr[-4000:]
    return root, json.loads(status_path.read_text()), proc.stderr


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_run_writes_results(smoke, name):
    root, status, log = smoke
    assert status[name]["status"] == "ok", log[-4000:]
    out = root / name
    labels = SMOKE[name][1]

    summary = _read_csv(out / "summary.csv")
    assert [r["variant"] for r in summary] == labels
    for row in summary:
        assert int(row["params"]) > 0 and int(row["macs"]) > 0
        assert int(row["steps"]) == 6  # 96 images / batch 16, one epoch
        assert 0.0 <= float(row["val_top1"]) <= 1.0
        assert math.isfinite(float(row["train_loss_last_epoch"]))
        assert row["status"] == "ok"

    curves = _read_csv(out / "curves.csv")
    for label in labels:
        mine = [r for r in curves if r["variant"] == label]
        train = [int(r["step"]) for r in mine if r["split"] == "train"]
        evals = [int(r["step"]) for r in mine if r["split"] == "eval"]
        assert train == sorted(train) and train[-1] == 6
        assert evals == [3, 6]  # two evaluations per epoch
        assert all(math.isfinite(float(r["loss"])) for r in mine)

    png = (out / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # several drawn panels

    md = (out / "README.md").read_text()
    assert f"python -m experiments.{name} --smoke" in md  # the exact command
    assert f"![{name}]({name}.png)" in md
    for label in labels:
        assert f"| {label} |" in md
    assert "## What these numbers show" in md and "## What they do not show" in md
    assert "shapes/32px_n96_v32" in md or "shapes/64px_n96_v32" in md


def test_activations_gradient_norms_vanish_with_sigmoid(smoke):
    """Without batch norm the sigmoid network's first layer gets a far smaller gradient."""
    root, status, _ = smoke
    assert status["activations"]["status"] == "ok"
    rows = _read_csv(root / "activations" / "grad_norms.csv")

    def norms(variant, step):
        sel = [r for r in rows if r["variant"] == variant and int(r["step"]) == step]
        return [float(r["grad_norm"]) for r in sorted(sel, key=lambda r: int(r["layer_index"]))]

    for depth in (8, 14):
        relu = norms(f"relu-{depth} (no BN, init only)", 0)
        sigmoid = norms(f"sigmoid-{depth} (no BN, init only)", 0)
        assert len(relu) == len(sigmoid) == depth  # every conv plus the dense layer
        assert all(v > 0 for v in relu + sigmoid)
        relu_ratio, sigmoid_ratio = relu[0] / relu[-2], sigmoid[0] / sigmoid[-2]
        assert sigmoid_ratio < 1e-2 < relu_ratio  # vanishing vs not
    # The trained networks (batch norm by default): recorded at init and after training.
    for variant, depth in (("relu-8", 8), ("sigmoid-14", 14)):
        assert len(norms(variant, 0)) == len(norms(variant, 6)) == depth
        assert {r["batch_norm"] for r in rows if r["variant"] == variant} == {"True"}
    deep = norms("sigmoid-14 (no BN, init only)", 0)
    shallow = norms("sigmoid-8 (no BN, init only)", 0)
    assert deep[0] / deep[-2] < shallow[0] / shallow[-2]  # more layers, more decay


def test_densenet_matched_within_ten_percent_in_results(smoke):
    root, status, _ = smoke
    rows = _read_csv(root / "resnet_vs_densenet" / "summary.csv")
    assert rows[1]["arch"] == "densenet121" and "stem=cifar" in rows[1]["model_kwargs"]
    md = (root / "resnet_vs_densenet" / "README.md").read_text()
    assert f"{int(rows[0]['params']):,}" in md and f"{int(rows[1]['params']):,}" in md


# ------------------------------------------------------------------------- no training below


def _args(module, argv=()):
    parser = common.make_parser(module.NAME, "test")
    module.add_flags(parser)
    return common.parse(parser, list(argv))


def test_parse_precedence():
    parser = common.make_parser("x", "test")
    args = common.parse(parser, [], defaults={"learning_rate": 0.3})
    assert args.learning_rate == 0.3 and args.epochs == common.DEFAULTS["epochs"]
    args = common.parse(parser, ["--smoke", "--image_size=64"])
    assert args.dataset == "shapes/64px_n96_v32" and args.epochs == 1.0
    args = common.parse(parser, ["--smoke", "--epochs=2", "--dataset=cifar10"])
    assert args.epochs == 2.0 and args.dataset == "cifar10"
    assert common.int_tuple("16,32,64") == (16, 32, 64)
    with pytest.raises(ValueError, match="comma-separated integers"):
        common.int_tuple("16,x")
    with pytest.raises(SystemExit, match="error: flag --widths=16,x: expected comma-separated"):
        _args(degradation, ["--widths=16,x"])


def test_default_variants_are_the_papers_comparisons():
    deg = degradation.build_variants(_args(degradation))
    assert [(v.label, v.arch) for v in deg] == [
        ("plain20", "plain20"), ("plain56", "plain56"), ("resnet20", "resnet20"),
        ("resnet56", "resnet56")]
    assert all(v.model_kwargs == {"widths": (8, 16, 32)} for v in deg)
    wide = degradation.build_variants(_args(degradation, ["--widths=16,32,64"]))
    assert wide[0].model_kwargs == {"widths": (16, 32, 64)}

    bn = bn_placement.build_variants(_args(bn_placement))
    assert [v.model_kwargs["norm_placement"] for v in bn] == ["post", "pre", "conv_relu_bn", "none"]
    sc = shortcuts.build_variants(_args(shortcuts))
    assert [v.model_kwargs["shortcut"] for v in sc] == ["A", "B", "C"]
    sc34 = shortcuts.build_variants(_args(shortcuts, ["--arch=resnet34"]))
    assert sc34[0].model_kwargs == {"shortcut": "A"}  # ImageNet nets keep their widths

    alex = alexnet_ablation.build_variants(_args(alexnet_ablation))
    fields = [(v.model_kwargs["use_lrn"], v.model_kwargs["dropout_rate"],
               v.model_kwargs["overlapping_pool"]) for v in alex]
    assert fields == [(True, 0.5, True), (False, 0.5, True), (True, 0.0, True),
                      (True, 0.5, False), (False, 0.0, False)]
    assert all(v.arch == "alexnet_original" and v.model_kwargs["fc_features"] == 1024
               for v in alex)
    full = alexnet_ablation.build_variants(_args(alexnet_ablation, ["--full_width"]))
    assert "widths" not in full[0].model_kwargs and "fc_features" not in full[0].model_kwargs


@pytest.mark.parametrize("module, argv, match", [
    (degradation, ["--depths=20,21"], "no registered plain21"),
    (bn_placement, ["--placements=post,after"], "unknown placement 'after'"),
    (shortcuts, ["--options=A,D"], "unknown shortcut 'D'"),
])
def test_bad_flags_are_clear_errors(module, argv, match):
    with pytest.raises(ValueError, match=match):
        module.build_variants(_args(module, argv))


def test_select_variants():
    variants = [common.Variant("a", "resnet20"), common.Variant("b", "resnet20")]
    assert [v.label for v in common.select(variants, ["b"])] == ["b"]
    with pytest.raises(ValueError, match="unknown variant.*choose from a, b"):
        common.select(variants, ["c"])


def test_densenet_depth_matches_resnet_parameters():
    """The default pairing (ResNet-20 at 8-16-32, k=6); at the paper's widths (k=12) the same
    depth, 52, matches too."""
    target = common.param_count("resnet20", {"widths": (8, 16, 32)}, 10, 32)
    depth, params = resnet_vs_densenet.match_depth(target, 6, 10, 32)
    assert depth == 52 and abs(params / target - 1) <= 0.02, (depth, params, target)
    paper = common.param_count("resnet20", {"widths": (16, 32, 64)}, 10, 32)
    dense = common.param_count(resnet_vs_densenet.DENSENET_TEMPLATE,
                               resnet_vs_densenet.densenet_kwargs(52, 12), 10, 32)
    assert (paper, dense) == (269_722, 264_586)  # -1.9%
    with pytest.raises(ValueError, match="6n \\+ 4"):
        resnet_vs_densenet.densenet_kwargs(50, 12)


def test_plain_cifar_net_layers():
    """6n + 2 weight layers; its gradient norms are checked in the smoke run above."""
    import jax
    import jax.numpy as jnp

    from cnn_jax import analysis

    model = activations.PlainCifarNet(depth=8, widths=(4, 8, 8), activation="tanh")
    a = analysis.analyze(model, (1, 32, 32, 3))
    assert a.totals.weight_layers == 8 and a.totals.depth == 8
    assert [r.output_shape[1] for r in a if r.kind == "conv"] == [32, 32, 32, 16, 16, 8, 8]
    assert [r.name.split("/")[0] for r in a if r.kind in ("conv", "dense")] == \
        activations.layer_names(8)
    with_bn = analysis.analyze(model.clone(use_norm=True), (1, 32, 32, 3))
    assert with_bn.totals.state > 0 and a.totals.state == 0  # batch_stats only with BN
    with pytest.raises(ValueError, match="6n \\+ 2"):
        jax.eval_shape(lambda: activations.PlainCifarNet(depth=10).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def test_run_all_rejects_unknown_experiment():
    with pytest.raises(SystemExit):
        run_all.main(["--only=nope"])
