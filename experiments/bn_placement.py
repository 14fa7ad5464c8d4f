"""Batch-norm placement in a ResNet: post-activation, pre-activation, conv-ReLU-BN, none.

``norm_placement`` of the registered ResNets: 'post' (He et al. 2016a, conv-BN-ReLU, addition,
ReLU), 'pre' (He et al. 2016b, "Identity Mappings", full pre-activation BN-ReLU-conv with a clean
identity path), 'conv_relu_bn' (BN after the nonlinearity) and 'none' (no normalization; biases
instead).

    python -m experiments.bn_placement                   # resnet20 on shapes, CPU minutes
    python -m experiments.bn_placement --arch=resnet110 --widths=16,32,64 --dataset=cifar10 \\
        --epochs=160 --batch_size=128 --optimizer=sgd --learning_rate=0.1 --augment=''
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

NAME = "bn_placement"
TITLE = "Batch-norm placement in ResNet-20: post, pre-activation, conv-ReLU-BN, none"
INTRO = """\
Where batch normalization (Ioffe & Szegedy 2015) sits in a residual block: after each conv
('post', the original ResNet, He et al. 2016a), before each conv together with the ReLU ('pre',
full pre-activation, He et al. 2016b, Fig. 4e, whose identity path carries no BN or ReLU), after
the ReLU ('conv_relu_bn'), or nowhere ('none', convs with biases). He et al. (2016b) find
'pre' slightly better than 'post' on CIFAR-10 (test error of ResNet-110: 6.37% vs 6.61%;
ResNet-164: 5.46% vs 5.93%). Each variant is the registered `resnet20` with `norm_placement` set;
everything else, including the learning rate, is the same."""

PLACEMENTS = ("post", "pre", "conv_relu_bn", "none")

CAVEATS = [
    "A short run with one learning rate for all variants: 'none' has no normalization to keep "
    "activations in range, so the same rate is relatively larger for it; a fair comparison of "
    "normalization-free training would tune its rate (and use an init such as Fixup's).",
    "The differences the paper reports between 'post' and 'pre' (a few tenths of a percent "
    "error at 110+ layers after 64k iterations) are far below what a 20-layer, few-epoch, "
    "single-seed run can resolve.",
]


def add_flags(p) -> None:
    flags.DEFINE_string("arch", "resnet20", "registered CIFAR ResNet (resnet20..110)",
                        flag_values=p)
    common.define_tuple(p, "placements", PLACEMENTS, "norm_placement values to compare, from "
                        f"{', '.join(PLACEMENTS)}")
    common.add_widths_flag(p)


def build_variants(args) -> List[common.Variant]:
    for place in args.placements:
        if place not in PLACEMENTS:
            raise ValueError(f"unknown placement {place!r}; choose from {', '.join(PLACEMENTS)}")
    base = common.cifar_kwargs(args)
    return [common.Variant(place, args.arch, {**base, "norm_placement": place})
            for place in args.placements]


def observe(runs: Sequence[common.Run], args, info) -> List[str]:
    notes = common.ranking_notes(runs)
    by = {r.label: r for r in runs}
    if "none" in by and "post" in by:
        n, p = by["none"], by["post"]
        notes.append(f"Without normalization the last-epoch training loss is "
                     f"{n.last_epoch_train('loss'):.3f} against {p.last_epoch_train('loss'):.3f} "
                     f"with 'post' BN" + (f" and the run {n.error}" if n.error else "") + ".")
    return notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_experiment(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
