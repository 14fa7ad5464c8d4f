"""Shortcut options A, B and C of ResNet (He et al. 2016, Sec. 3.3 and Table 3).

'A': identity shortcuts, zero-padded channels where the shape changes (no parameters); 'B': 1x1
projections only where the shape changes; 'C': projections on every shortcut. Variants of one
training config: ``python -m experiments.run shortcuts``.
"""

from __future__ import annotations

from experiments import common

NAME = "shortcuts"
WIDTHS = (8, 16, 32)
MARGIN = 0.03  # "about equal": every pairwise 95% CI of best val top-1 within +-3 points

PAPER = ("python -m experiments.run shortcuts --variants=A34,B34,C34 "
         "--config.dataset=imagenet2012 --config.image_size=224 --config.num_epochs=90 "
         "--config.batch_size=256 --config.optimizer=sgd --config.learning_rate=0.1 "
         "--config.lr_schedule=step --config.lr_step_epochs='(30.0, 60.0)' --config.augment=''")


def get_experiment(smoke: bool = False) -> common.Experiment:
    model = {"widths": (4, 8, 8), "stage_sizes": (1, 1, 1)} if smoke else {"widths": WIDTHS}
    variants = {opt: {"arch": "resnet20", "model": {**model, "shortcut": opt}}
                for opt in ("A", "B", "C")}
    variants.update({f"{opt}34": {"arch": "resnet34", "model": {"shortcut": opt}}
                     for opt in ("A", "B", "C")})  # Table 3's networks (ImageNet)
    return common.Experiment(
        name=NAME, title="ResNet shortcut options A, B and C",
        intro="""\
He et al. (2016a, Sec. 3.3, Table 3) compare three shortcuts for ResNet-34 on ImageNet: (A)
zero-padding identity shortcuts where the dimensions grow (parameter-free), (B) 1x1 projection
shortcuts only where they grow, (C) projections on every shortcut. Top-1 errors (10-crop): A
25.03%, B 24.52%, C 24.19%: "small differences", so projections "are not essential". Each variant
is the registered `resnet20` (paper default A) with `model.shortcut` set.""",
        config=common.recipe(smoke), variants=variants, seeds=(0,) if smoke else (0, 1, 2),
        default_variants=("C",) if smoke else ("A", "B", "C"),
        hypotheses=[
            common.Hypothesis(
                "H1 A, B and C about equal",
                "The three shortcut options give nearly the same accuracy (differences of about "
                "half a point of ImageNet top-1).",
                f"every pairwise 95% CI of the best validation top-1 difference lies within "
                f"+-{100 * MARGIN:.0f} points.",
                lambda r: common.equivalent(r, ["A", "B", "C"], "best_val_top1", MARGIN), PAPER),
        ],
        caveats=[
            "In a CIFAR ResNet only two shortcuts change shape, so 'B' adds very few parameters "
            "to 'A'; 'C' adds a 1x1 conv (and BN) to every block. The paper's half-point "
            "differences are far below what three seeds on 1,000 validation images resolve.",
        ])
