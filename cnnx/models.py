"""Ready-made networks: LeNet-5 in its modern form and as LeCun et al. (1998) describe it; ResNet-20 and VGG for
32x32 images (CIFAR-10)."""
import collections

from . import nn
from .nn.layers import _dtype

__all__ = ["LeNet5", "ResNet20", "VGG", "VGG_CONFIGS"]

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


def _conv_bn(cin, cout, kernel, stride, padding, dt):
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False, dtype=dt),
            nn.BatchNorm2d(cout, dtype=dt)]


def _basic_block(cin, cout, stride, dt):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), the shortcut a 1x1 projection with batch norm
    where the shape changes (He et al. 2016's option B), else the identity."""
    c1, b1 = _conv_bn(cin, cout, 3, stride, 1, dt)
    c2, b2 = _conv_bn(cout, cout, 3, 1, 1, dt)
    block = nn.Sequential(collections.OrderedDict([("conv1", c1), ("bn1", b1), ("relu1", nn.ReLU()),
                                                   ("conv2", c2), ("bn2", b2)]))
    shortcut = None
    if stride != 1 or cin != cout:
        sc, sb = _conv_bn(cin, cout, 1, stride, 0, dt)
        shortcut = nn.Sequential(collections.OrderedDict([("conv", sc), ("bn", sb)]))
    return nn.Sequential(collections.OrderedDict([("residual", nn.Residual(block, shortcut)), ("relu", nn.ReLU())]))


class ResNet20(nn.Sequential):
    """ResNet-20 for 32x32 images (He, Zhang, Ren & Sun 2016, section 4.2: the CIFAR-10 networks, n = 3)::

        conv 16@3x3 -> BN -> ReLU -> stage 1 (3 blocks, 16 channels, 32x32) -> stage 2 (3 blocks, 32 channels,
        16x16) -> stage 3 (3 blocks, 64 channels, 8x8) -> global average pool -> fc 64->num_classes

    Each block is two 3x3 convolutions with batch norm, and a residual connection (nn.Residual) added before
    the second ReLU. The first block of stages 2 and 3 halves the size with stride 2 and its shortcut is a 1x1
    convolution with stride 2 and batch norm (the paper's option B; option A, zero-padded identity, is not
    provided). 272,474 parameters with num_classes=10 (the paper's ResNet-20, option A: 0.27M). Convolutions
    have no bias (batch norm follows each). The output is logits (N, num_classes).
    """

    def __init__(self, num_classes=10, in_channels=3, dtype=None):
        dt = _dtype(dtype, "ResNet20")
        conv, bn = _conv_bn(in_channels, 16, 3, 1, 1, dt)
        layers = [("conv1", conv), ("bn1", bn), ("relu1", nn.ReLU())]
        cin = 16
        for stage, cout in enumerate((16, 32, 64), start=1):
            blocks = collections.OrderedDict()
            for i in range(3):
                stride = 2 if stage > 1 and i == 0 else 1
                blocks[str(i)] = _basic_block(cin, cout, stride, dt)
                cin = cout
            layers.append((f"layer{stage}", nn.Sequential(blocks)))
        layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                   ("fc", nn.Linear(64, num_classes, dtype=dt))]
        super().__init__(collections.OrderedDict(layers))
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.dtype = dt

    @property
    def input_size(self):
        return (32, 32)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, in_channels={self.in_channels}"

    def get_config(self):
        return {"num_classes": self.num_classes, "in_channels": self.in_channels, "dtype": self.dtype.name}


# VGG configurations for 32x32 inputs: channels, "M" a 2x2 max pool
VGG_CONFIGS = {
    # the VGG-small: two stages of two 3x3 convolutions, then a linear layer on 64 x 8 x 8
    "small": [32, 32, "M", 64, 64, "M"],
    # Simonyan & Zisserman 2015, configuration A, as CIFAR-10 implementations size it (five pools to 1x1)
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


class VGG(nn.Sequential):
    """A VGG network for 32x32 images: 3x3 convolutions with padding 1 (each followed by BatchNorm2d when
    batch_norm, then ReLU) and 2x2 max pools as ``VGG_CONFIGS[config]`` lists them, then flatten and one linear
    layer to num_classes (the CIFAR-10 form: no 4096-wide classifier). ``VGG("vgg11", batch_norm=True)`` is
    VGG-11 with batch norm; ``VGG("small")`` is conv 3->32, 32->32, pool, 32->64, 64->64, pool, linear 4096->10.
    """

    def __init__(self, config="vgg11", batch_norm=True, num_classes=10, in_channels=3, dtype=None):
        if config not in VGG_CONFIGS:
            raise ValueError(f"VGG: config must be one of {sorted(VGG_CONFIGS)}, got {config!r}")
        dt = _dtype(dtype, "VGG")
        layers, cin, size, n = [], in_channels, 32, 0
        for item in VGG_CONFIGS[config]:
            if item == "M":
                layers.append((f"pool{n}", nn.MaxPool2d(2)))
                size //= 2
                continue
            n += 1
            layers.append((f"conv{n}", nn.Conv2d(cin, item, 3, padding=1, bias=not batch_norm, dtype=dt)))
            if batch_norm:
                layers.append((f"bn{n}", nn.BatchNorm2d(item, dtype=dt)))
            layers.append((f"relu{n}", nn.ReLU()))
            cin = item
        layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(cin * size * size, num_classes, dtype=dt))]
        super().__init__(collections.OrderedDict(layers))
        self.config, self.batch_norm = config, bool(batch_norm)
        self.num_classes, self.in_channels, self.dtype = num_classes, in_channels, dt

    @property
    def input_size(self):
        return (32, 32)

    def extra_repr(self):
        return f"config={self.config!r}, batch_norm={self.batch_norm}, num_classes={self.num_classes}"

    def get_config(self):
        return {"config": self.config, "batch_norm": self.batch_norm, "num_classes": self.num_classes,
                "in_channels": self.in_channels, "dtype": self.dtype.name}
