"""AlexNet with and without LRN, dropout and overlapping pooling (Krizhevsky et al. 2012).

The paper's network (``alexnet_original``: two-tower grouped convs, local response normalization
after conv1 and conv2, dropout 0.5 before fc6 and fc7, 3x3 stride-2 max pooling) against the same
network with one of those ideas removed, and with all three removed.

    python -m experiments.alexnet_ablation               # 64 px shapes, 1/4 widths, CPU
    python -m experiments.alexnet_ablation --full_width --dataset=imagenet2012 \\
        --image_size=224 --epochs=90 --batch_size=128 --optimizer=sgd \\
        --learning_rate=0.01 --augment=alexnet          # the paper's setting
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

NAME = "alexnet_ablation"
TITLE = "AlexNet: local response normalization, dropout and overlapping pooling"
INTRO = """\
Krizhevsky et al. (2012) credit three of AlexNet's design choices with measurable gains on
ImageNet: local response normalization after conv1 and conv2 (Sec. 3.3: -1.4% top-1 error),
overlapping max pooling with 3x3 windows at stride 2 instead of 2x2 at stride 2 (Sec. 3.4: -0.4%
top-1 error, and "slightly more difficult to overfit"), and dropout 0.5 in the first two
fully connected layers (Sec. 4.2: "without dropout, our network exhibits substantial
overfitting"; dropout roughly doubles the iterations needed to converge). Each variant is the
registered `alexnet_original` (the paper's layout, two-tower grouped convs) with `use_lrn`,
`dropout_rate` and `overlapping_pool` set; the default run uses a quarter of the paper's widths
(24-64-96-96-64 filters, 1,024-unit fully connected layers; `--full_width` for the paper's), and
AdamW at 3e-4: the network has no batch norm, and neither SGD (lr 0.01-0.03) nor AdamW at 1e-3
left chance level within a few hundred steps here."""

# A quarter of the paper's 96-256-384-384-256 filters and 4096-unit fc layers.
QUARTER_WIDTHS = (24, 64, 96, 96, 64)
QUARTER_FC = 1024
SMOKE_WIDTHS = (8, 8, 8, 8, 8)

# label -> (use_lrn, dropout_rate, overlapping_pool)
VARIANTS: Dict[str, tuple] = {
    "paper (all three)": (True, 0.5, True),
    "no LRN": (False, 0.5, True),
    "no dropout": (True, 0.0, True),
    "no overlapping pool": (True, 0.5, False),
    "none of the three": (False, 0.0, False),
}

CAVEATS = [
    "The paper's gains are fractions of a percent to 1.4% of ImageNet top-1 error after 90 "
    "epochs on 1.2M images at 224 px; a few epochs on 2,000 `shapes` images at 64 px with "
    "reduced widths and one seed cannot resolve effects of that size, and overfitting (which "
    "dropout and overlapping pooling fight) hardly sets in so early.",
    "At 64 px the conv5 output is 1x1 (the adaptive pooling repeats it 6x6 for fc6), so pooling "
    "geometry matters less than at 224 px, where the maps are 55-27-13-6.",
    "AlexNet has no batch norm; with the same learning rate for every variant, a variant that "
    "starts more slowly (e.g. dropout's noisier gradients) is penalized more in a short run.",
]


def add_flags(p) -> None:
    flags.DEFINE_bool("full_width", False, "the paper's widths 96-256-384-384-256 and 4096-unit "
                      "fc layers", flag_values=p)
    flags.DEFINE_integer("fc_features", None, f"units of fc6 and fc7 (default {QUARTER_FC}; 4096 "
                         "with --full_width)", lower_bound=1, flag_values=p)


def build_variants(args) -> List[common.Variant]:
    base: Dict[str, Any] = {}
    if args.smoke:
        base = {"widths": SMOKE_WIDTHS, "fc_features": 16}
    elif not args.full_width:
        base = {"widths": QUARTER_WIDTHS, "fc_features": QUARTER_FC}
    if args.fc_features:
        base["fc_features"] = args.fc_features
    return [common.Variant(label, "alexnet_original",
                           {**base, "use_lrn": lrn, "dropout_rate": drop, "overlapping_pool": ov})
            for label, (lrn, drop, ov) in VARIANTS.items()]


def observe(runs: Sequence[common.Run], args, info) -> List[str]:
    notes = common.ranking_notes(runs)
    by = {r.label: r for r in runs}
    paper = by.get("paper (all three)")
    if paper:
        for label in ("no LRN", "no dropout", "no overlapping pool", "none of the three"):
            r = by.get(label)
            if r:
                gap = common.top1(paper) - common.top1(r)
                train_gap = r.last_epoch_train("accuracy") - r.final_eval().get("top1", 0.0)
                notes.append(f"{label}: final val top-1 {common.pct(common.top1(r))} "
                             f"({100 * -gap:+.1f} points vs the paper's network); last-epoch "
                             f"train accuracy minus val top-1 {100 * train_gap:+.1f} points.")
    return notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_experiment(
        __name__, argv,
        defaults={"dataset": "shapes/64px_n2000_v500", "image_size": 64, "learning_rate": 3e-4})


if __name__ == "__main__":
    sys.exit(main())
