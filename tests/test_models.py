"""cnnx.models.LeNet5: both variants' architecture, shapes, parameter counts, options, and that it learns."""
import numpy as np
import pytest

import cnnx
from cnnx import nn, optim
from cnnx.models import LeNet5


def test_modern_architecture():
    net = LeNet5()
    assert isinstance(net, nn.Sequential) and len(net) == 12
    assert [type(m).__name__ for m in net] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten",
                                               "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert net.conv1.padding == (2, 2) and net.conv1.weight.shape == (6, 1, 5, 5)
    assert net.conv2.weight.shape == (16, 6, 5, 5)
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [(400, 120), (120, 84),
                                                                                           (84, 10)]
    assert net.num_parameters() == 61706 and net.input_size == (28, 28)
    x = np.zeros((3, 1, 28, 28), np.float32)
    assert net(x).shape == (3, 10) and net(x).dtype == np.float32


def test_1998_architecture():
    net = LeNet5(variant="1998")
    assert [type(m).__name__ for m in net] == ["Conv2d", "ScaledTanh", "AvgPool2d", "Conv2d", "ScaledTanh", "AvgPool2d",
                                               "Conv2d", "ScaledTanh", "Flatten", "Linear", "ScaledTanh", "Linear"]
    assert net.c5.weight.shape == (120, 16, 5, 5) and net.input_size == (32, 32)
    assert net.num_parameters() == 61706
    s = net.summary((2, 1, 32, 32), print_summary=False)
    assert [r["output_shape"] for r in s["layers"]][:7] == [(2, 6, 28, 28), (2, 6, 28, 28), (2, 6, 14, 14),
                                                            (2, 16, 10, 10), (2, 16, 10, 10), (2, 16, 5, 5),
                                                            (2, 120, 1, 1)]
    assert s["output_shape"] == (2, 10)


def test_options_and_errors():
    net = LeNet5(num_classes=26, in_channels=3, dtype=np.float64)
    assert net(np.zeros((1, 3, 28, 28))).shape == (1, 26)
    assert all(p.dtype == np.float64 for p in net.parameters())
    with pytest.raises(ValueError, match="variant must be one of"):
        LeNet5(variant="2012")
    with pytest.raises(ValueError, match="kernel larger than the padded input"):
        LeNet5(variant="1998")(np.zeros((1, 1, 28, 28), np.float32))     # 1998 wants 32x32
    with pytest.raises(ValueError, match="in_features=400"):
        LeNet5()(np.zeros((1, 1, 32, 32), np.float32))


def synthetic_digits(rng, n, classes=4):
    """Each class is a bright 8x8 square in its own quadrant of a 28x28 image, plus noise."""
    y = rng.integers(0, classes, n)
    x = rng.normal(0, 0.3, (n, 1, 28, 28)).astype(np.float32)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 0, 3 + 14 * r:11 + 14 * r, 3 + 14 * col:11 + 14 * col] += 1.5
    return x, y


@pytest.fixture
def one_thread():
    """The inputs are small: one kernel thread avoids start-up costs that dominate on a busy 2-core machine."""
    threads = cnnx.get_num_threads()
    cnnx.set_num_threads(1)
    yield
    cnnx.set_num_threads(threads)


@pytest.mark.parametrize("variant", ["modern", "1998"])
def test_lenet_learns_a_simple_task(variant, rng, one_thread):
    cnnx.manual_seed(0)
    net = LeNet5(variant=variant, num_classes=4)
    x, y = synthetic_digits(rng, 256)
    xt, yt = synthetic_digits(rng, 128)
    if variant == "1998":
        x, xt = (np.pad(a, ((0, 0), (0, 0), (2, 2), (2, 2))) for a in (x, xt))
    opt = optim.Adam(net.parameters(), lr=3e-3)
    loss = nn.CrossEntropyLoss()
    first = None
    for epoch in range(2):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            value = loss(net(x[i:i + 32]), y[i:i + 32])
            first = float(value) if first is None else first
            net.backward(loss.backward())
            opt.step()
    net.eval()
    accuracy = (net(xt).argmax(1) == yt).mean()
    assert float(value) < first / 4
    assert accuracy > 0.9, accuracy
