"""Batch-norm placement in a ResNet: post-activation, pre-activation, conv-ReLU-BN, none.

``model.norm_placement`` of the registered ResNets: 'post' (He et al. 2016a), 'pre' (He et al.
2016b, full pre-activation), 'conv_relu_bn' (BN after the nonlinearity) and 'none' (no
normalization; biases instead). ``python -m experiments.run bn_placement``.
"""

from __future__ import annotations

from experiments import common

NAME = "bn_placement"
WIDTHS = (8, 16, 32)
PLACEMENTS = ("post", "pre", "conv_relu_bn", "none")

PAPER = ("python -m experiments.run bn_placement --config.dataset=cifar10 "
         "--config.model.widths='(16, 32, 64)' --config.model.stage_sizes='(18, 18, 18)' "
         "--config.num_epochs=160 --config.batch_size=128 --config.optimizer=sgd "
         "--config.learning_rate=0.1 --config.lr_schedule=step "
         "--config.lr_step_epochs='(80.0, 120.0)' --config.augment=''  # ResNet-110")


def get_experiment(smoke: bool = False) -> common.Experiment:
    model = {"widths": (4, 8, 8), "stage_sizes": (1, 1, 1)} if smoke else {"widths": WIDTHS}
    variants = {p: {"arch": "resnet20", "model": {**model, "norm_placement": p}}
                for p in PLACEMENTS}
    return common.Experiment(
        name=NAME, title="Batch-norm placement in ResNet-20: post, pre-activation, "
        "conv-ReLU-BN, none",
        intro="""\
Where batch normalization (Ioffe & Szegedy 2015) sits in a residual block: after each conv
('post', the original ResNet, He et al. 2016a), before each conv with the ReLU ('pre', full
pre-activation, He et al. 2016b, Fig. 4e, whose identity path carries no BN or ReLU), after the
ReLU ('conv_relu_bn'), or nowhere ('none', convs with biases). He et al. (2016b, Table 2) find
'pre' better than 'post' on CIFAR-10 (ResNet-110: 6.37% vs 6.61% test error; ResNet-164: 5.46%
vs 5.93%). Each variant is the registered `resnet20` with `model.norm_placement` set; everything
else, the learning rate included, is the same.""",
        config=common.recipe(smoke), variants=variants, seeds=(0,) if smoke else (0, 1, 2),
        default_variants=("none",) if smoke else None,
        hypotheses=[
            common.Hypothesis(
                "H1 pre-activation at least as good as post",
                "Full pre-activation trains at least as well as the original post-activation "
                "block (He et al. 2016b, Table 2: 0.2-0.5 points better).",
                "best validation top-1 of 'pre' above 'post' (CI above 0) would confirm; a "
                "paper-sized difference is below what three seeds resolve, so 'inconclusive' "
                "is the expected outcome unless the short schedule favours one.",
                lambda r: common.greater(r, "pre", "post", "best_val_top1"), PAPER),
            common.Hypothesis(
                "H2 normalization matters",
                "Batch norm makes a 20-layer network train faster (Ioffe & Szegedy 2015).",
                "the training loss of 'none' is higher than that of 'post' (CI of none - post "
                "above 0).",
                lambda r: common.greater(r, "none", "post", "train_loss", percent=False),
                PAPER),
        ],
        caveats=[
            "One learning rate for all variants: 'none' has no normalization to keep "
            "activations in range, so the same rate is relatively larger for it; a fair test "
            "of normalization-free training would tune its rate and init (e.g. Fixup).",
            "The paper's 'pre' vs 'post' differences are for 110 and 164 layers; at 20 layers "
            "(this run) the paper itself shows little difference.",
        ])
