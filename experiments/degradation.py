"""Degradation: deeper plain nets train worse, residual nets do not (He et al. 2016, Fig. 1 and 6).

Trains the CIFAR plain networks and ResNets of Sec. 4.2 (``plain20``, ``plain56``, ``resnet20``,
``resnet56``: the same layers without and with identity shortcuts) with one recipe and compares
their training and validation curves.

    python -m experiments.degradation                    # shapes, half-width nets, CPU
    python -m experiments.degradation --widths=16,32,64 --dataset=cifar10 --epochs=160 \\
        --batch_size=128 --optimizer=sgd --learning_rate=0.1 --augment=''
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

NAME = "degradation"
TITLE = "Degradation: plain vs residual networks of 20 and 56 layers"
INTRO = """\
He et al. (2016, "Deep Residual Learning", Sec. 4.2, Fig. 6) train plain CIFAR networks of 20 to
110 layers and their residual twins: the deeper *plain* networks reach a higher *training* error
(an optimization difficulty, not overfitting), while the deeper residual networks train at least
as well as the shallow ones. Each variant is a registered model (`plainN` is `resnetN` with
`skip=False`), all with batch norm and shortcut option A, trained with the same recipe."""

CIFAR_DEPTHS = (20, 32, 44, 56, 110)  # registered plainN / resnetN
SMOKE_BLOCKS = {20: 1, 56: 2}  # --smoke: 8 and 14 layers, quick to compile

CAVEATS = [
    "A short run: the paper trains 64k iterations (~180 epochs) on CIFAR-10; the default here is "
    "a few epochs on a 2,000-image subset of `shapes` with half the paper's widths. Early in "
    "training deeper networks often converge more slowly, so a short run can show a depth "
    "penalty for ResNets too, which a full schedule removes; only the full schedule "
    "(`--dataset=cifar10 --epochs=160 --widths=16,32,64`) tests the paper's claim.",
    "In the paper the 56-layer plain net (with batch norm, as here) does train, to a training "
    "error a few points above the 20-layer one; in a budget this short it may not leave the "
    "plateau at chance level at all, which makes the gap look larger than it is at convergence.",
]


def add_flags(p) -> None:
    common.define_tuple(p, "depths", (20, 56), "CIFAR depths with a registered plainN/resnetN: "
                        f"{CIFAR_DEPTHS}", item=int)
    common.add_widths_flag(p)


def build_variants(args) -> List[common.Variant]:
    base = common.cifar_kwargs(args)
    base.pop("stage_sizes", None)
    out = []
    for family in ("plain", "resnet"):
        for depth in args.depths:
            if depth not in CIFAR_DEPTHS:
                raise ValueError(f"no registered {family}{depth}; choose depths from "
                                 f"{', '.join(map(str, CIFAR_DEPTHS))}")
            kwargs, label = dict(base), f"{family}{depth}"
            if args.smoke:
                n = SMOKE_BLOCKS.get(depth, 1)
                kwargs["stage_sizes"] = (n, n, n)
                label = f"{family}{6 * n + 2}"
            out.append(common.Variant(label, f"{family}{depth}", kwargs))
    return out


def _depth(label: str) -> int:
    return int(label.replace("plain", "").replace("resnet", ""))


def observe(runs: Sequence[common.Run], args, info) -> List[str]:
    by = {r.label: r for r in runs}
    depths = sorted({_depth(label) for label in by})
    if not depths:
        return []
    notes = []
    shallow, deep = depths[0], depths[-1]
    if shallow != deep:
        for family, name in (("plain", "plain"), ("resnet", "residual")):
            a, b = by.get(f"{family}{shallow}"), by.get(f"{family}{deep}")
            if not a or not b:
                continue
            la, lb = a.last_epoch_train("loss"), b.last_epoch_train("loss")
            if lb > la * 1.05:
                verdict = f"the deeper {name} network fits the training set worse"
                verdict += (" (the degradation problem)" if family == "plain" else
                            " (in this short run; see below)")
            elif lb < la / 1.05:
                verdict = f"the deeper {name} network fits the training set better"
            else:
                verdict = "about the same (within 5%)"
            notes.append(f"{family}{deep} vs {family}{shallow}: last-epoch training loss "
                         f"{lb:.3f} vs {la:.3f}, final val top-1 {common.pct(common.top1(b))} vs "
                         f"{common.pct(common.top1(a))}: {verdict}.")
    p, r = by.get(f"plain{deep}"), by.get(f"resnet{deep}")
    if p and r:
        notes.append(
            f"At depth {deep} the shortcuts change the last-epoch training loss from "
            f"{p.last_epoch_train('loss'):.3f} to {r.last_epoch_train('loss'):.3f} and the "
            f"final val top-1 from {common.pct(common.top1(p))} to "
            f"{common.pct(common.top1(r))}.")
    return notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_experiment(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
