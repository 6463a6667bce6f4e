"""DataLoader batching, shuffling reproducibility, drop_last; batch transforms."""
import numpy as np
import pytest

from cnnx._random import manual_seed
from cnnx.datasets import MNIST
from cnnx.data import (ArrayDataset, Compose, DataLoader, Normalize, Pad, RandomCrop, RandomShift, ToFloat)


def arrays(n=10):
    x = np.arange(n * 2 * 3, dtype=np.float32).reshape(n, 2, 3)
    y = np.arange(n, dtype=np.int64)
    return x, y


def test_batching_order_and_len():
    x, y = arrays(10)
    loader = DataLoader((x, y), batch_size=4)
    assert len(loader) == 3
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)


def test_drop_last():
    x, y = arrays(10)
    loader = DataLoader((x, y), batch_size=4, drop_last=True)
    assert len(loader) == 2 and loader.num_samples == 8
    assert [len(b[1]) for b in loader] == [4, 4]
    assert len(DataLoader((x, y), batch_size=5, drop_last=True)) == 2
    assert len(DataLoader((x, y), batch_size=11, drop_last=True)) == 0
    assert list(DataLoader((x, y), batch_size=11, drop_last=True)) == []


def test_shuffle_is_a_reproducible_permutation():
    x, y = arrays(50)
    a = DataLoader((x, y), batch_size=8, shuffle=True, generator=123)
    b = DataLoader((x, y), batch_size=8, shuffle=True, generator=123)
    epoch_a1 = np.concatenate([yy for _, yy in a])
    epoch_a2 = np.concatenate([yy for _, yy in a])
    epoch_b1 = np.concatenate([yy for _, yy in b])
    epoch_b2 = np.concatenate([yy for _, yy in b])
    assert sorted(epoch_a1.tolist()) == list(range(50))          # every sample exactly once
    np.testing.assert_array_equal(epoch_a1, epoch_b1)            # same seed, same order
    np.testing.assert_array_equal(epoch_a2, epoch_b2)
    assert not np.array_equal(epoch_a1, epoch_a2)                # a new order each epoch
    assert not np.array_equal(epoch_a1, np.arange(50))
    for xb, yb in a:                                             # inputs stay paired with their targets
        np.testing.assert_array_equal(xb, x[yb])


def test_shuffle_follows_manual_seed():
    x, y = arrays(30)
    manual_seed(7)
    first = np.concatenate([yy for _, yy in DataLoader((x, y), batch_size=4, shuffle=True)])
    manual_seed(7)
    loader = DataLoader((x, y), batch_size=4, shuffle=True)
    manual_seed(7)  # seeding after construction also takes effect
    again = np.concatenate([yy for _, yy in loader])
    np.testing.assert_array_equal(first, again)


def test_single_array_and_map_style_datasets():
    x, _ = arrays(5)
    batches = list(DataLoader(x, batch_size=2))
    assert isinstance(batches[0], np.ndarray) and [len(b) for b in batches] == [2, 2, 1]

    class Items:  # a plain map-style dataset: one (x, y) per integer index
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return np.full((2,), i, np.float32), i * 10

    xb, yb = next(iter(DataLoader(Items(), batch_size=3, shuffle=True, generator=0)))
    assert xb.shape == (3, 2) and yb.tolist() == (xb[:, 0] * 10).astype(int).tolist()


def test_loader_with_cnnx_dataset_and_transform():
    ds = MNIST()  # the embedded subset
    loader = DataLoader(ds, batch_size=64, transform=Compose([ToFloat(), Normalize(0.1307, 0.3081)]))
    xb, yb = next(iter(loader))
    assert xb.shape == (64, 1, 28, 28) and xb.dtype == np.float32 and yb.dtype == np.int64
    expected = (ds.data[:64, None].astype(np.float32) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(xb, expected, rtol=1e-5, atol=1e-5)
    assert len(loader) == 94


def test_target_transform():
    x, y = arrays(4)
    _, yb = next(iter(DataLoader((x, y), batch_size=4, target_transform=lambda t: t + 100)))
    assert yb.tolist() == [100, 101, 102, 103]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(batch_size=0), ValueError, "batch_size must be > 0"),
    (dict(batch_size=2.5), TypeError, "batch_size must be an int"),
    (dict(shuffle=True, generator="seed"), TypeError, "generator"),
    (dict(transform=3), TypeError, "transform must be callable"),
])
def test_loader_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DataLoader(arrays(4), **kwargs)


def test_array_dataset_checks_lengths():
    with pytest.raises(ValueError, match="array 0 has 3 rows but array 1 has 4"):
        ArrayDataset(np.zeros(3), np.zeros(4))
    with pytest.raises(TypeError, match="dataset must be"):
        DataLoader(42)


# ----------------------------------------------------------------------------------- transforms
def test_to_float_adds_channel_axis_and_scales():
    x = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    y = ToFloat()(x)
    assert y.shape == (1, 1, 2, 2) and y.dtype == np.float32
    np.testing.assert_allclose(y[0, 0], [[0, 1], [0.2, 0.4]], rtol=1e-6)
    assert ToFloat()(np.zeros((2, 3, 4, 4), np.uint8)).shape == (2, 3, 4, 4)
    assert ToFloat(np.float64)(x).dtype == np.float64
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        ToFloat()(np.zeros((28, 28), np.uint8))


def test_normalize_per_channel():
    x = np.ones((2, 3, 2, 2), np.float32) * np.array([1, 2, 3], np.float32)[None, :, None, None]
    y = Normalize([1, 1, 1], [1, 2, 4])(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[0, :, 0, 0], [0, 0.5, 0.5])
    with pytest.raises(ValueError, match="2 mean/std values for a batch with 3 channels"):
        Normalize([0, 0], [1, 1])(x)
    with pytest.raises(TypeError, match="ToFloat"):
        Normalize(0.5, 0.5)(np.zeros((1, 1, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="std"):
        Normalize(0, 0)


def test_pad():
    x = np.ones((2, 1, 28, 28), np.float32)
    y = Pad(2)(x)
    assert y.shape == (2, 1, 32, 32) and y.sum() == x.sum() and y[0, 0, 0, 0] == 0 and y[0, 0, 2, 2] == 1
    z = Pad((1, 2, 3, 4), fill=5)(np.zeros((1, 3, 3), np.uint8))  # left, top, right, bottom
    assert z.shape == (1, 3 + 2 + 4, 3 + 1 + 3) and z[0, 0, 0] == 5 and z[0, 2, 1] == 0


def test_random_crop_is_a_shifted_window_per_sample():
    n = 200
    x = np.zeros((n, 1, 8, 8), np.float32)
    x[:, 0, 4, 4] = 1.0  # one lit pixel, so the crop offset can be read back
    y = RandomCrop(8, padding=2, generator=0)(x)
    assert y.shape == x.shape
    pos = np.argwhere(y[:, 0] == 1)
    assert len(pos) == n  # the pixel is never cut off with |shift| <= 2 from the centre
    shifts = pos[:, 1:] - 4
    assert shifts.min() == -2 and shifts.max() == 2           # the whole range is used
    assert len({tuple(s) for s in shifts}) > 15              # and offsets differ between samples
    same = RandomCrop(8, padding=2, generator=0)(x)
    np.testing.assert_array_equal(y, same)                    # reproducible with a seed
    crop = RandomCrop((3, 5), generator=1)(np.arange(2 * 6 * 6).reshape(2, 6, 6))
    assert crop.shape == (2, 3, 5)
    with pytest.raises(ValueError, match="larger than"):
        RandomCrop(10)(x)


def test_random_shift_keeps_content_and_shape():
    x = np.zeros((100, 5, 5), np.uint8)
    x[:, 2, 2] = 9
    y = RandomShift(1, generator=3)(x)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert (y.reshape(100, -1).sum(1) == 9).all()
    rows, cols = np.nonzero(y == 9)[1:]
    assert set(rows.tolist()) == {1, 2, 3} and set(cols.tolist()) == {1, 2, 3}
    np.testing.assert_array_equal(RandomShift(0)(x), x)


def test_compose_pipeline():
    t = Compose([RandomShift(2, generator=0), ToFloat(), Pad(2), Normalize(0.1307, 0.3081)])
    y = t(np.zeros((4, 28, 28), np.uint8))
    assert y.shape == (4, 1, 32, 32)
    np.testing.assert_allclose(y, -0.1307 / 0.3081, rtol=1e-6)
    with pytest.raises(TypeError, match="transform 1 must be callable"):
        Compose([ToFloat(), None])


def test_random_horizontal_flip():
    from cnnx.data import RandomHorizontalFlip
    x = np.arange(200 * 2 * 3 * 4, dtype=np.float32).reshape(200, 2, 3, 4)
    out = RandomHorizontalFlip(generator=0)(x)
    flipped = np.array([np.array_equal(o, i[..., ::-1]) for o, i in zip(out, x)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    assert (flipped ^ kept).all() and 60 < flipped.sum() < 140        # each image one or the other, about half
    assert np.array_equal(RandomHorizontalFlip(p=1.0)(x), x[..., ::-1])
    assert np.array_equal(RandomHorizontalFlip(p=0.0)(x), x)
    with pytest.raises(ValueError, match=r"RandomHorizontalFlip: p must be a probability in \[0, 1\], got 2"):
        RandomHorizontalFlip(p=2)
