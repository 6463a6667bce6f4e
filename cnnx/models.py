"""Ready-made networks: LeNet-5 in its modern form and as LeCun et al. (1998) describe it."""
import collections

from . import nn
from .nn.layers import _dtype

__all__ = ["LeNet5"]

_VARIANTS = ("modern", "1998")


class LeNet5(nn.Sequential):
    """LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998) as a :class:`cnnx.nn.Sequential`.

    variant='modern' (default), for 28x28 inputs such as MNIST::

        conv1 6@5x5 pad 2 -> ReLU -> maxpool 2 -> conv2 16@5x5 -> ReLU -> maxpool 2 -> flatten
        -> fc1 400->120 -> ReLU -> fc2 120->84 -> ReLU -> fc3 84->num_classes

    variant='1998', for 32x32 inputs (MNIST padded by 2), with the paper's scaled tanh 1.7159 tanh(2x/3)::

        C1 conv 6@5x5 -> tanh -> S2 avgpool 2 -> C3 conv 16@5x5 -> tanh -> S4 avgpool 2
        -> C5 conv 120@5x5 -> tanh -> flatten -> F6 120->84 -> tanh -> output 84->num_classes

    Simplifications of the paper: S2/S4 are plain average pooling (no trainable coefficient and bias), C3
    connects every S2 map (not the paper's sparse table), and the output is a linear layer producing logits
    for CrossEntropyLoss instead of Euclidean RBF units. The output is logits (N, num_classes).
    """

    def __init__(self, num_classes=10, variant="modern", in_channels=1, dtype=None):
        if variant not in _VARIANTS:
            raise ValueError(f"LeNet5: variant must be one of {list(_VARIANTS)}, got {variant!r}")
        dt = _dtype(dtype, "LeNet5")
        if variant == "modern":
            layers = [
                ("conv1", nn.Conv2d(in_channels, 6, 5, padding=2, dtype=dt)), ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(6, 16, 5, dtype=dt)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(16 * 5 * 5, 120, dtype=dt)), ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(120, 84, dtype=dt)), ("relu4", nn.ReLU()),
                ("fc3", nn.Linear(84, num_classes, dtype=dt)),
            ]
        else:
            layers = [
                ("c1", nn.Conv2d(in_channels, 6, 5, dtype=dt)), ("act1", nn.ScaledTanh()),
                ("s2", nn.AvgPool2d(2)),
                ("c3", nn.Conv2d(6, 16, 5, dtype=dt)), ("act3", nn.ScaledTanh()), ("s4", nn.AvgPool2d(2)),
                ("c5", nn.Conv2d(16, 120, 5, dtype=dt)), ("act5", nn.ScaledTanh()),
                ("flatten", nn.Flatten()),
                ("f6", nn.Linear(120, 84, dtype=dt)), ("act6", nn.ScaledTanh()),
                ("output", nn.Linear(84, num_classes, dtype=dt)),
            ]
        super().__init__(collections.OrderedDict(layers))
        self.num_classes = num_classes
        self.variant = variant
        self.in_channels = in_channels
        self.dtype = dt

    @property
    def input_size(self):
        """The (H, W) the architecture is built for: 28x28 (modern) or 32x32 (1998)."""
        return (28, 28) if self.variant == "modern" else (32, 32)

    def extra_repr(self):
        return f"variant={self.variant!r}, num_classes={self.num_classes}, in_channels={self.in_channels}"

    def get_config(self):
        return {"num_classes": self.num_classes, "variant": self.variant, "in_channels": self.in_channels,
                "dtype": self.dtype.name}
