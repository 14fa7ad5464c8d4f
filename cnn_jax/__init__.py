"""cnn_jax: the classic ImageNet CNNs as pure JAX/Flax code."""

__version__ = "0.1.0"
