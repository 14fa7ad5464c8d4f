"""Shortcut options A, B and C of ResNet (He et al. 2016, Sec. 3.3 and Table 3).

'A': identity shortcuts, zero-padded channels where the shape changes (no parameters); 'B':
1x1 projections only where the shape changes; 'C': projections on every shortcut.

    python -m experiments.shortcuts                      # resnet20 on shapes, CPU minutes
    python -m experiments.shortcuts --arch=resnet34 --dataset=imagenet2012 --image_size=224 \\
        --epochs=90 --batch_size=256 --optimizer=sgd --learning_rate=0.1 --augment=''  # Table 3
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

NAME = "shortcuts"
TITLE = "ResNet shortcut options A, B and C"
INTRO = """\
He et al. (2016a, Sec. 3.3, Table 3) compare three shortcuts for ResNet-34 on ImageNet: (A)
zero-padding identity shortcuts where the dimensions grow (parameter-free), (B) 1x1 projection
shortcuts only where they grow, (C) projections on every shortcut. Their top-1 errors (10-crop):
A 25.03%, B 24.52%, C 24.19%: all three much better than the plain net, B slightly better than A
(the zero-padded channels learn no residual), C marginally better than B at the cost of many more
parameters, so projections are "not essential". Each variant here is the registered `resnet20`
(whose paper default is A) with `shortcut` set."""

OPTIONS = ("A", "B", "C")

CAVEATS = [
    "The paper's A/B/C differences are about half a percent of ImageNet top-1 error for "
    "ResNet-34 after 600k iterations; a 20-layer network on a small `shapes` subset for a few "
    "epochs with one seed cannot resolve differences of that size. The parameter counts are exact.",
    "In a CIFAR ResNet only two shortcuts change shape, so 'B' adds very few parameters to 'A'; "
    "'C' adds a 1x1 conv (and BN) to every block.",
]


def add_flags(p) -> None:
    flags.DEFINE_string("arch", "resnet20", "registered ResNet (CIFAR resnet20..110 or ImageNet "
                        "resnet18..152)", flag_values=p)
    common.define_tuple(p, "options", OPTIONS, "shortcut options to compare (A, B, C)")
    common.add_widths_flag(p)


def build_variants(args) -> List[common.Variant]:
    for opt in args.options:
        if opt not in OPTIONS:
            raise ValueError(f"unknown shortcut {opt!r}; choose from {', '.join(OPTIONS)}")
    from cnn_jax.models import model_info

    cifar = model_info(args.arch).default_input_size == 32  # the CIFAR nets of Sec. 4.2
    base = common.cifar_kwargs(args) if cifar else {}
    return [common.Variant(f"shortcut {opt}", args.arch, {**base, "shortcut": opt})
            for opt in args.options]


def observe(runs: Sequence[common.Run], args, info) -> List[str]:
    notes = ["Parameters: " + ", ".join(f"{r.label} {r.params:,}" for r in runs) + "."]
    notes += common.ranking_notes(runs)
    return notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_experiment(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
