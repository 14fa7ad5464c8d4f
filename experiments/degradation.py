"""Degradation: deeper plain nets train worse, residual nets do not (He et al. 2016, Sec. 4.2).

The CIFAR plain networks and ResNets of Sec. 4.2 (``plainN`` is ``resnetN`` with ``skip=False``:
the same layers without identity shortcuts), at two depths, as variants of one training config:
``python -m experiments.run degradation``.
"""

from __future__ import annotations

import math

from experiments import common, stats

NAME = "degradation"
WIDTHS = (8, 16, 32)  # half the paper's 16-32-64: four times cheaper, same depth
LOSS_MARGIN = 0.05  # nats: "does not train worse" = the CI of the loss increase stays below this

PAPER = ("python -m experiments.run degradation --variants=plain20,plain56,resnet20,resnet56 "
         "--config.dataset=cifar10 --config.model.widths='(16, 32, 64)' --config.num_epochs=160 "
         "--config.batch_size=128 --config.optimizer=sgd --config.learning_rate=0.1 "
         "--config.lr_schedule=step --config.lr_step_epochs='(80.0, 120.0)' --config.augment=''")
DEPTHS = (20, 32)  # the default set (CPU); 56 and 110 are variants too
PAPER_DEPTHS = (56, 110)
SMOKE_DEPTHS = (8, 14)


def _residual_not_worse(r: common.Results) -> common.Outcome:
    shallow, deep = r.exp.extra["depths"]
    d = r.compare(f"resnet{deep}", f"resnet{shallow}", "train_loss")
    line = f"train_loss resnet{deep} - resnet{shallow}: {d.describe(1.0, ' nats')}."
    if math.isfinite(d.high) and d.high < LOSS_MARGIN:
        return common.Outcome("confirmed", line + f" The interval lies below +{LOSS_MARGIN} "
                              "nats: the deeper residual net trains at least about as well.")
    if d.significant and d.low > LOSS_MARGIN:
        return common.Outcome("not confirmed", line + " The deeper residual net fits worse "
                              "within this budget (deeper nets start slower; the paper trains "
                              "64k iterations).")
    return common.Outcome("inconclusive", line + f" The interval reaches above +{LOSS_MARGIN} "
                          "nats, so 'not worse' is not shown.")


def get_experiment(smoke: bool = False) -> common.Experiment:
    shallow, deep = SMOKE_DEPTHS if smoke else DEPTHS
    widths = (4, 8, 8) if smoke else WIDTHS
    variants = {}
    depths = (shallow, deep) if smoke else (shallow, deep, *PAPER_DEPTHS)
    for family in ("plain", "resnet"):
        for depth in depths:
            n = (depth - 2) // 6
            variants[f"{family}{depth}"] = {"arch": f"{family}20",
                                            "model": {"widths": widths, "stage_sizes": (n, n, n)}}
    return common.Experiment(
        name=NAME,
        title=f"Degradation: plain vs residual networks of {shallow} and {deep} layers",
        intro=f"""\
He et al. (2016, "Deep Residual Learning", Sec. 4.2, Fig. 6) train plain CIFAR networks of 20 to
110 layers and their residual twins: the deeper *plain* networks reach a higher *training* error
(an optimization difficulty, not overfitting: their test error is higher too), while the deeper
residual networks train at least as well as the shallow ones. Here: the registered CIFAR networks
(`plain20`/`resnet20` with `model.stage_sizes` set for {shallow} and {deep} layers, widths
{', '.join(map(str, widths))}, batch norm, shortcut option A) on the hard `shapes` level.""",
        # --smoke evaluates at steps 2, 4 (and 6) with a plateau criterion that holds at step
        # 4: the stopping path runs in the tests.
        config=common.recipe(smoke, **({"eval_every_steps": 2} if smoke else {})),
        plateau=stats.Plateau(patience=1, min_delta=1.0, min_epochs=0.5, max_loss_drop=1.0)
        if smoke else common.PLATEAU,
        variants=variants, seeds=(0,) if smoke else (0, 1, 2),
        default_variants=("plain8", "resnet14") if smoke else tuple(
            f"{f}{d}" for f in ("plain", "resnet") for d in (shallow, deep)),
        hypotheses=[
            common.Hypothesis(
                "H1 deeper plain nets train worse",
                "Deeper plain networks reach a higher training error (He et al. 2016, Fig. 6 "
                "left).",
                f"the training loss of plain{deep} is higher than plain{shallow}'s (95% CI of "
                "the difference above 0).",
                lambda r: common.greater(r, f"plain{deep}", f"plain{shallow}", "train_loss",
                                         percent=False), PAPER),
            common.Hypothesis(
                "H2 deeper residual nets do not",
                "With identity shortcuts the deeper network trains at least as well (Fig. 6 "
                "right).",
                f"the training loss of resnet{deep} minus resnet{shallow}'s has a 95% CI below "
                f"+{LOSS_MARGIN} nats.", _residual_not_worse, PAPER),
            common.Hypothesis(
                "H3 shortcuts help the deep net",
                "At equal depth the residual net is more accurate than the plain one (Table 6).",
                f"the best validation top-1 of resnet{deep} is above plain{deep}'s (CI above 0).",
                lambda r: common.greater(r, f"resnet{deep}", f"plain{deep}", "best_val_top1"),
                PAPER),
        ],
        extra={"depths": (shallow, deep)},
        caveats=[
            f"Depths {shallow} and {deep}, not the paper's 20 and 56 (the 2-core CPU budget); "
            "widths halved; the hard `shapes` level, not CIFAR-10; AdamW at a constant rate divided "
            "by 10 at the first validation plateau, not the paper's SGD divided by 10 at fixed "
            "iterations. The paper's command is given under each outcome.",
            "Three seeds resolve differences of a few points (or a few hundredths of a nat); "
            "smaller effects stay inconclusive.",
        ])
