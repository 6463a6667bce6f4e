"""ResNet-20 and VGG (cnnx.models) against PyTorch twins built the same way: the same state_dict keys and
shapes, the same outputs, and, after one training step (batch-statistics BatchNorm, cross-entropy), the same
gradient for every parameter; and a save/load round trip."""
import numpy as np
import pytest

import cnnx
from cnnx import models, nn

from test_interop import torch_twin  # the same architecture in torch.nn, module for module


MODELS = {"resnet20": lambda dt: models.ResNet20(dtype=dt),
          "vgg-small-bn": lambda dt: models.VGG("small", batch_norm=True, dtype=dt),
          "vgg-small": lambda dt: models.VGG("small", batch_norm=False, dtype=dt),
          "vgg11-bn": lambda dt: models.VGG("vgg11", dtype=dt)}
TOL = {np.float32: 2e-4, np.float64: 1e-10}       # loss and running statistics


def test_resnet20_shape_and_parameters():
    m = models.ResNet20()
    assert sum(p.data.size for p in m.parameters()) == 272474
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert m(x).shape == (2, 10)
    with pytest.raises(ValueError, match="VGG: config must be one of"):
        models.VGG("vgg99")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_round_trip(tmp_path, name):
    cnnx.manual_seed(0)
    m = MODELS[name](np.float32)
    m.eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    m2 = cnnx.load(cnnx.save(m, tmp_path / "m.npz"))
    m2.eval()
    assert type(m2) is type(m) and np.array_equal(m(x), m2(x))


@pytest.mark.parametrize("dt", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_training_step_matches_pytorch(name, dt):
    torch = pytest.importorskip("torch", reason="torch not installed")
    torch.manual_seed(0)
    cnnx.manual_seed(0)
    model = MODELS[name](dt)
    tmodel = torch_twin(torch, model).to(torch.float64 if dt == np.float64 else torch.float32)
    assert list(model.state_dict()) == list(tmodel.state_dict())
    model.load_state_dict(tmodel.state_dict())
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 32, 32)).astype(dt)
    y = rng.integers(0, 10, 4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    tmodel.train()
    loss = loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    assert abs(float(loss) - tloss.item()) <= TOL[dt] * max(1.0, abs(tloss.item()))
    # float64: every gradient element. float32: the norm of each gradient's error, because a ReLU whose input
    # lies within rounding of 0 can switch between two float32 computations and move the gradient by a whole
    # term (measured on ResNet-20 over 8 torch initialisations: 1e-5 typically; 5e-3 to 8e-3 in two, with
    # cnnx's Winograd convolutions, whose float32 error is ~10x a direct convolution's; 3.8e-2 in one with
    # direct convolutions too)
    tparams = dict(tmodel.named_parameters())
    for key, p in model.named_parameters():
        g, tg = p.grad, tparams[key].grad.numpy()
        if dt == np.float64:
            err = np.abs(g - tg).max() / max(np.abs(tg).max(), 1e-12)
            assert err <= 1e-9, (key, err)
        else:
            err = np.linalg.norm(g - tg) / max(np.linalg.norm(tg), 1e-12)
            assert err <= 2e-2, (key, err)
    for key, buf in model.named_buffers():
        tb = dict(tmodel.named_buffers())[key].numpy()
        assert np.allclose(buf, tb, rtol=TOL[dt], atol=TOL[dt]), key
