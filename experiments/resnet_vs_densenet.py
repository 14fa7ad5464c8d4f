"""ResNet addition vs DenseNet concatenation at matched parameter counts (Huang et al. 2017).

A CIFAR ResNet (``resnet20``) against a CIFAR DenseNet-BC (3 dense blocks of bottleneck layers,
compression 0.5) whose depth is chosen, for the growth rate, so that both have the same number of
parameters (by ``cnn_jax.models.count_params``; both counts are reported).
``python -m experiments.run resnet_vs_densenet``.
"""

from __future__ import annotations

from typing import Dict, Tuple

from experiments import common

NAME = "resnet_vs_densenet"
# The registered template whose fields are all overridden (densenet_bc_100 fixes its growth rate
# in the builder, so it cannot be overridden there).
DENSENET_TEMPLATE = "densenet121"
MAX_LAYERS_PER_BLOCK = 40
WIDTHS = (8, 16, 32)
# Learning rates of the sweep variants (<arm>_lr<rate>) around the recipe's 3e-3.
LR_SWEEP = (1e-3, 1e-2)
# Each arm trains at the best rate of the same short trial (seed 0, the first 8 epochs of the
# cosine, batch 16): resnet20 at the recipe's 3e-3 (~39% best val top-1 against 21.7% at 1e-3 and
# 9.9% at 1e-2), DenseNet-BC-34 at 1e-3 (16.4% against 6.5% at 3e-3 and 6.8% at 3e-4;
# 2026-12-03). At 3e-3 the DenseNet sat near chance for its first ~9 epochs: in the 30-epoch
# budget it then learned (28.3 ± 3.1%), in the 24-epoch one the plateau criterion stopped it at
# 40% of the budget still there (seeds 0 and 1: 7.1 and 7.8%, epoch 10; 2026-12-04).
DENSE_LR = 1e-3

PAPER = ("python -m experiments.run resnet_vs_densenet --config.dataset=cifar10 "
         "--config.num_epochs=300 --config.batch_size=64 --config.optimizer=sgd "
         "--config.learning_rate=0.1 --config.lr_schedule=step "
         "--config.lr_step_epochs='(150.0, 225.0)' --config.augment='' "
         "--variants=resnet20_paper,densenet_bc_52_k12")


def densenet_options(depth: int, growth_rate: int) -> Dict[str, object]:
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (e.g. 40, 52, 100), "
                         f"got {depth}")
    n = (depth - 4) // 6
    return {"growth_rate": growth_rate, "block_config": (n, n, n),
            "num_init_features": 2 * growth_rate, "stem": "cifar"}


def param_count(arch: str, options, num_classes: int, image_size: int) -> int:
    from cnn_jax.models import abstract_variables, count_params, create_model

    model = create_model(arch, num_classes=num_classes, **dict(options))
    return count_params(abstract_variables(model, image_size)["params"])


def match_depth(target_params: int, growth_rate: int, num_classes: int,
                image_size: int) -> Tuple[int, int]:
    """(depth, params) of the DenseNet-BC closest in parameters to ``target_params``."""
    best = None
    for n in range(1, MAX_LAYERS_PER_BLOCK + 1):
        depth = 6 * n + 4
        params = param_count(DENSENET_TEMPLATE, densenet_options(depth, growth_rate),
                             num_classes, image_size)
        if best is None or abs(params - target_params) < abs(best[1] - target_params):
            best = (depth, params)
        if params > target_params:  # parameters grow with depth: nothing closer beyond
            break
    return best


def get_experiment(smoke: bool = False) -> common.Experiment:
    from cnn_jax import input_pipeline

    config = common.recipe(smoke)
    info = input_pipeline.get_dataset_info(config.dataset, None, image_size=config.image_size)
    res = {"widths": (4, 8, 8), "stage_sizes": (1, 1, 1)} if smoke else {"widths": WIDTHS}
    # k = the ResNet's first width. The paper's pairs have k at 3/4 of it (k = 12 against 16),
    # but at 8-16-32 that gives k = 6 and DenseNet-BC-52: 23% slower per step than k = 8's
    # DenseNet-BC-34 at about the same parameters (225 vs 173 ms, one core, batch 16), which put
    # this experiment alone over its 30 minutes (37 min). Results at k = 6: variant
    # densenet_bc_52_k6, and experiments/README.md. 2026-12-03.
    k = res["widths"][0]
    res_params = param_count("resnet20", res, info.num_classes, config.image_size)
    depth, dense_params = match_depth(res_params, k, info.num_classes, config.image_size)
    dense = f"densenet_bc_{depth}_k{k}"
    arms = {"resnet20": {"arch": "resnet20", "model": res},
            dense: {"arch": DENSENET_TEMPLATE, "model": densenet_options(depth, k)}}
    dense_run = dense if smoke else f"{dense}_lr{DENSE_LR:g}"  # the compared DenseNet
    return common.Experiment(
        name=NAME, title="ResNet addition vs DenseNet concatenation at matched parameter counts",
        intro=f"""\
A residual block *adds* its output to its input; a dense block *concatenates* them, so every
later layer reads every earlier one directly (Huang et al. 2017, Sec. 3). The paper's claim is
parameter efficiency: on CIFAR-10 a DenseNet-BC with 0.8M parameters reaches about the error of
a 1001-layer pre-activation ResNet with 10.2M parameters (Sec. 4.4, Fig. 4 right). Here a CIFAR
ResNet ({res_params:,} parameters) meets the DenseNet-BC nearest in parameters ({dense},
{dense_params:,} parameters, growth rate k = the ResNet's first width): the registered
DenseNet module with the CIFAR stem and `growth_rate`, `block_config`, `num_init_features` set.
Each network trains at the best learning rate of the same 8-epoch trial: resnet20 at the recipe's
3e-3, the DenseNet at {DENSE_LR:g} (variant {dense_run}; at 3e-3 it sits near chance for its first
~9 epochs).""",
        config=config,
        variants={**arms,
                  # the paper's widths: 269,722 vs 264,586 parameters (10 classes)
                  "resnet20_paper": {"arch": "resnet20", "model": {"widths": (16, 32, 64)}},
                  "densenet_bc_52_k12": {"arch": DENSENET_TEMPLATE,
                                         "model": densenet_options(52, 12)},
                  # this experiment's DenseNet until 2026-12-03 (k = 3/4 of 8)
                  "densenet_bc_52_k6": {"arch": DENSENET_TEMPLATE,
                                        "model": densenet_options(52, 6)},
                  # each arm at another learning rate (the recipe's is 3e-3, chosen on resnet20):
                  # a fair H1 compares each network at its own best rate
                  **{f"{label}_lr{lr:g}": {**spec, "learning_rate": lr}
                     for label, spec in arms.items() for lr in LR_SWEEP}},
        seeds=(0,) if smoke else (0, 1, 2),
        default_variants=(dense,) if smoke else ("resnet20", dense_run),
        extra={"dense": dense_run, "params": (res_params, dense_params)},
        hypotheses=[
            common.Hypothesis(
                "H1 DenseNet-BC at least as accurate at equal parameters",
                "At the same parameter count, DenseNet-BC is more accurate than a ResNet "
                "(Huang et al. 2017, Sec. 4.4, Fig. 4).",
                f"best validation top-1 of {dense_run} above resnet20's (CI above 0), each at "
                "the best learning rate of an 8-epoch trial.",
                lambda r: common.greater(r, dense_run, "resnet20", "best_val_top1"), PAPER),
        ],
        caveats=[
            "Matched parameters are not matched compute: concatenation makes every dense layer "
            "read all earlier features, so the DenseNet does several times the multiply-"
            "accumulates (MACs column) and runs several times slower per image on this CPU.",
            "The paper's efficiency claim is about converged test error after 300 epochs of "
            "CIFAR; here each run stops at its validation plateau or at the epoch cap of Setup. "
            "The DenseNets at their rate of 1e-3 learn more slowly than resnet20 and mostly "
            "plateau later (the cap was 40 before 2026-12-06, where they reached it still "
            "rising).",
            "DenseNet runs are more sensitive than three seeds show: at k = 6 (DenseNet-BC-52, "
            "this experiment's DenseNet until 2026-12-03) the same seeds before a change of the "
            "DenseNet's batch norm that alters its gradients by float32 rounding only "
            "(layers.ConcatBatchNorm) gave 62.0, 53.8 and 31.5% best validation top-1 instead of "
            "23.1, 32.4 and 31.0%, and single-threaded 43.0, 36.4 and 29.2%. The sign of the gap "
            "to resnet20 held in all of them; its size did not. At k = 8 a change of the 3x3 "
            "convolutions' weight gradient (2026-12-06, float32 rounding only) moved the same "
            "seeds from 75.7, 69.9 and 62.0% to 63.7, 66.9 and 65.0%, and H1 from inconclusive "
            "(-7.1 points, CI [-21.1, +7.0]) to not confirmed (-11.1, CI [-20.4, -1.7]).",
        ])
