"""Test-only access to torchvision's reference models (random weights, no downloads).

torchvision's compiled operators do not load against the CPU build of torch installed here, but its
model definitions do once ``torch.library.register_fake`` (used only to register fake kernels of
those operators) is a no-op during ``import torchvision``. Tests call :func:`import_torchvision`,
which skips them with a reason when torch or torchvision is missing.
"""

from __future__ import annotations

import numpy as np
import pytest


def import_torchvision():
    """``(torch, torchvision)``, or skip the calling test when either is not installed."""
    torch = pytest.importorskip("torch", reason="torch not installed (pip install .[torch])")
    original = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
    try:
        torchvision = pytest.importorskip(
            "torchvision", reason="torchvision not installed (pip install --no-deps "
            "torchvision==0.28.0)")
    finally:
        torch.library.register_fake = original
    # One thread: under pytest-xdist's two workers on the 2-core CI machine the other core is
    # busy, and torch's second OpenMP thread spin-waits on it (test_convert's logit comparisons
    # beside one busy core: 108-115 s -> 67-75 s of CPU, 185-218 s -> 149-160 s wall).
    torch.set_num_threads(1)
    return torch, torchvision


def random_model(name: str, seed: int = 0, vgg_fc_features: int = 0, **kwargs):
    """torchvision ``name`` in eval mode with random weights and random BN statistics.

    ``vgg_fc_features``: build a VGG with that hidden width instead of 4096 (cnn_jax's VGG has the
    same option, ``fc_features``); spares initializing and converting the 120M-weight head when a
    test is about the convolutional layers.
    """
    torch, torchvision = import_torchvision()
    torch.manual_seed(seed)
    if vgg_fc_features:
        with torch.device("meta"):  # no 4096-wide layers are ever allocated
            model = torchvision.models.get_model(name, weights=None, **kwargs)
            n = vgg_fc_features
            for index, (n_in, n_out) in zip((0, 3, 6), ((512 * 7 * 7, n), (n, n), (n, 1000))):
                model.classifier[index] = torch.nn.Linear(n_in, n_out)
        model = model.to_empty(device="cpu")
        for module in model.modules():
            if hasattr(module, "reset_parameters"):  # torch's default init
                module.reset_parameters()
    else:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                # Away from the identity (1, 0, 0, 1), so that swapping any two shows up.
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()


def to_nchw(images_nhwc: np.ndarray):
    torch, _ = import_torchvision()
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc).transpose(0, 3, 1, 2)))


def torch_logits(model, images_nhwc: np.ndarray) -> np.ndarray:
    """Eval-mode outputs of a torch module on NHWC numpy images (or feature maps)."""
    torch, _ = import_torchvision()
    with torch.no_grad():
        return model(to_nchw(images_nhwc)).numpy()


def calibrate(module, linear, inputs_nhwc: np.ndarray, std: float = 2.0) -> None:
    """Scale ``linear`` (the last layer of ``module``) to outputs of std ``std`` on ``inputs``.

    Random networks give logits anywhere from 1e-2 (N(0, 0.01) classifiers) to 1e7 (deep residual
    stacks with random BN statistics); at std ~2 an absolute tolerance of 1e-4 means the same
    (a relative error of ~1e-5) for every architecture.
    """
    torch, _ = import_torchvision()
    scale = std / float(np.std(torch_logits(module, inputs_nhwc)))
    with torch.no_grad():
        linear.weight.mul_(scale)
        linear.bias.mul_(scale)
