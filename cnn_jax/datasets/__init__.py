"""Dataset sources for the input pipeline: the built-in `shapes` builder and TFDS preparation.

Importing this package does not import TensorFlow (``shapes_generator`` needs only NumPy and
Pillow); the names from ``sources`` load it on first use.

``python -m cnn_jax.datasets.prepare --dataset=NAME --data_dir=DIR`` prepares a dataset.
"""

import sys


def _provide_importlib_resources() -> None:
    """Work around tensorflow/datasets#11212 (TFDS 4.9.10).

    TFDS uses the ``importlib_resources`` backport when preparing any dataset but only declares it
    for Python < 3.9; without it, ``download_and_prepare`` fails with ModuleNotFoundError. The
    standard library's ``importlib.resources`` has the same API on Python >= 3.11.
    """
    try:
        import importlib_resources  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.resources
    import types

    try:
        import importlib.resources.abc as resources_abc
    except ImportError:  # Python 3.10: Traversable lives in importlib.abc
        import importlib.abc as resources_abc
    shim = types.ModuleType("importlib_resources")
    shim.__dict__.update({k: v for k, v in vars(importlib.resources).items()
                          if not k.startswith("__")})
    shim.abc = resources_abc
    sys.modules["importlib_resources"] = shim


_provide_importlib_resources()

_FROM_SOURCES = ("DATASETS", "DatasetNotFoundError", "default_data_dir", "get_builder",
                 "imagenet_manual_dir")


def __getattr__(name):
    # Lazy, so that `cnn_jax.datasets.shapes_generator` imports without TensorFlow/TFDS.
    if name in _FROM_SOURCES:
        from cnn_jax.datasets import sources

        return getattr(sources, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
