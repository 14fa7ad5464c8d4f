"""The model zoo: one file per family, every model registered by name with its metadata."""

from cnn_jax.models.registry import (ModelInfo, TorchvisionRef, abstract_variables,
                                     check_model_options, create_model, list_models, model_info,
                                     model_options, register_model)
from cnn_jax.models.layers import count_params

# Importing the family modules registers their builders.
from cnn_jax.models import alexnet, vgg, googlenet, resnet, densenet  # noqa: E402,F401

__all__ = ["ModelInfo", "TorchvisionRef", "abstract_variables", "check_model_options", "create_model", "list_models",
           "model_info", "model_options", "register_model", "count_params"]
