"""ResNet addition vs DenseNet concatenation at matched parameter counts (Huang et al. 2017).

A CIFAR ResNet (``resnet20``) against a CIFAR DenseNet-BC (3 dense blocks of bottleneck layers,
compression 0.5) whose depth is chosen, for the given growth rate, so that both have the same
number of parameters (within a few percent; both counts are reported).

    python -m experiments.resnet_vs_densenet             # ~68k-parameter nets on shapes, CPU
    python -m experiments.resnet_vs_densenet --widths=16,32,64 --growth_rate=12 \\
        --dataset=cifar10 --epochs=160 --batch_size=64 --optimizer=sgd --learning_rate=0.1 \\
        --augment=''
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

NAME = "resnet_vs_densenet"
TITLE = "ResNet addition vs DenseNet concatenation at matched parameter counts"
INTRO = """\
A residual block *adds* its output to its input, so every layer's features are mixed into one
running sum; a dense block *concatenates* them, so every later layer can read every earlier one
directly (Huang et al. 2017, Sec. 3). The paper's claim is parameter efficiency: on CIFAR-10 a
DenseNet-BC with 0.8M parameters reaches about the error of a 1001-layer pre-activation ResNet with
10.2M parameters (Sec. 4.4, Fig. 4 right). Here a CIFAR ResNet is compared with a
DenseNet-BC of the *same* parameter count: the registered DenseNet module with the CIFAR stem
and `growth_rate`, `block_config` and `num_init_features` (= 2k) set, as `densenet_bc_100` but
with the depth chosen automatically to match the ResNet."""

# The registered template whose fields are all overridden (densenet_bc_100 fixes its growth
# rate in the builder, so it cannot be overridden there).
DENSENET_TEMPLATE = "densenet121"
MAX_LAYERS_PER_BLOCK = 40

CAVEATS = [
    "Matched parameters are not matched compute: concatenation makes every dense layer read all "
    "earlier features, so the DenseNet does several times the multiply-accumulates of the "
    "ResNet (see the MACs column) and runs slower per image on this CPU.",
    "A few epochs on a small `shapes` subset with one seed: the paper's efficiency claim is about "
    "converged test error on CIFAR/ImageNet, which the `--dataset=cifar10 --epochs=160` command "
    "tests; the default run only checks that both families train under the same recipe.",
]


def add_flags(p) -> None:
    flags.DEFINE_string("resnet", "resnet20", "registered CIFAR ResNet", flag_values=p)
    common.add_widths_flag(p)
    flags.DEFINE_integer("growth_rate", None, "DenseNet growth rate k (default: 3/4 of the "
                         "ResNet's first width, i.e. 6 for widths 8,16,32 and 12 for the paper's "
                         "16,32,64)", lower_bound=1, flag_values=p)
    flags.DEFINE_integer("densenet_depth", 0, "DenseNet-BC depth 6n+4 (default 0: the depth "
                         "whose parameter count is closest to the ResNet's)", lower_bound=0,
                         flag_values=p)


def densenet_kwargs(depth: int, growth_rate: int) -> Dict[str, object]:
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (e.g. 40, 52, 100), "
                         f"got {depth}")
    n = (depth - 4) // 6
    return {"growth_rate": growth_rate, "block_config": (n, n, n),
            "num_init_features": 2 * growth_rate, "stem": "cifar"}


def match_depth(target_params: int, growth_rate: int, num_classes: int,
                image_size: int) -> Tuple[int, int]:
    """(depth, params) of the DenseNet-BC closest in parameters to ``target_params``."""
    best = None
    for n in range(1, MAX_LAYERS_PER_BLOCK + 1):
        depth = 6 * n + 4
        params = common.param_count(DENSENET_TEMPLATE, densenet_kwargs(depth, growth_rate),
                                    num_classes, image_size)
        if best is None or abs(params - target_params) < abs(best[1] - target_params):
            best = (depth, params)
        if params > target_params:  # parameters grow with depth: nothing closer beyond
            break
    return best


def build_variants(args) -> List[common.Variant]:
    info = common.dataset_info(args)
    res_kwargs = common.cifar_kwargs(args)
    widths = res_kwargs["widths"]
    k = args.growth_rate or max(2, round(0.75 * widths[0]))
    res_params = common.param_count(args.resnet, res_kwargs, info.num_classes, args.image_size)
    depth = args.densenet_depth or match_depth(res_params, k, info.num_classes,
                                               args.image_size)[0]
    return [common.Variant(args.resnet, args.resnet, res_kwargs),
            common.Variant(f"densenet_bc_{depth}_k{k}", DENSENET_TEMPLATE,
                           densenet_kwargs(depth, k))]


def observe(runs: Sequence[common.Run], args, info) -> List[str]:
    notes = []
    if len(runs) == 2:
        r, d = runs
        diff = d.params / r.params - 1
        matched = "matched within 10%" if abs(diff) <= 0.1 else "NOT within 10%"
        notes.append(f"Parameters: {r.label} {r.params:,}, {d.label} {d.params:,} "
                     f"({100 * diff:+.1f}%: {matched}); MACs per image: {r.macs / 1e6:.1f}M "
                     f"vs {d.macs / 1e6:.1f}M ({d.macs / r.macs:.1f}x).")
        notes.append(f"Last-epoch training loss {r.last_epoch_train('loss'):.3f} ({r.label}) vs "
                     f"{d.last_epoch_train('loss'):.3f} ({d.label}); final val top-1 "
                     f"{common.pct(common.top1(r))} vs {common.pct(common.top1(d))}; wall time "
                     f"{r.wall_seconds:.0f} s vs {d.wall_seconds:.0f} s.")
    return notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_experiment(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
