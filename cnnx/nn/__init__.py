"""cnnx.nn: PyTorch-shaped layers and losses with explicit forward/backward on numpy arrays."""
from .module import Parameter, Module, Sequential, Residual, StateDictError
from .layers import (Identity, Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, AdaptiveMaxPool2d, Linear,
                     Flatten, ReLU, LeakyReLU, Tanh, Sigmoid, ScaledTanh, Softmax, LogSoftmax, Dropout,
                     BatchNorm1d, BatchNorm2d)
from .loss import CrossEntropyLoss, NLLLoss, BCEWithLogitsLoss, BCELoss, MSELoss

__all__ = ["Parameter", "Module", "Sequential", "Residual", "StateDictError",
           "Identity", "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "Linear",
           "Flatten", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "ScaledTanh", "Softmax", "LogSoftmax", "Dropout",
           "BatchNorm1d", "BatchNorm2d",
           "CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss", "BCELoss", "MSELoss"]
