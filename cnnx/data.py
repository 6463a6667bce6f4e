"""Mini-batches and transforms on numpy arrays.

    train = cnnx.datasets.MNIST("/path/to/mnist")
    transform = Compose([ToFloat(), Normalize(0.1307, 0.3081)])
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=0, transform=transform)
    for x, y in loader:        # x (64, 1, 28, 28) float32, y (64,) int64
        ...

A dataset is either a tuple of arrays with the same first dimension, an :class:`ArrayDataset`, or any object
with ``__len__`` and ``__getitem__``. cnnx datasets and ``ArrayDataset`` (class attribute
``_batch_indexable = True``) are indexed with an index array, a whole batch at once; other map-style
datasets are indexed item by item and the items stacked.

Transforms act on a whole batch, with the spatial axes last: (N, H, W) or (N, C, H, W). Random
transforms draw one independent offset per sample from their ``generator`` (a seed, a
``numpy.random.Generator``, or None for cnnx's default generator seeded by ``cnnx.manual_seed``).
"""
import numbers

import numpy as np

from ._random import default_generator

__all__ = ["DataLoader", "ArrayDataset", "Compose", "ToFloat", "Normalize", "Pad", "CenterCrop", "RandomCrop",
           "RandomHorizontalFlip", "RandomShift"]


def _generator(generator, name):
    """A numpy Generator from None (cnnx's default generator), an int seed, or a Generator.

    Callers keep None as None and resolve it at each use, so a later ``cnnx.manual_seed`` takes effect.
    """
    if generator is None:
        return default_generator()
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        if generator < 0:
            raise ValueError(f"{name}: generator seed must be >= 0, got {generator}")
        return np.random.default_rng(int(generator))
    raise TypeError(f"{name}: generator must be None, an int seed or a numpy.random.Generator, "
                    f"got {type(generator).__name__}")


def _positive_int(value, name, allow_zero=False):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return int(value)


class ArrayDataset:
    """Arrays sharing their first dimension, indexed together (PyTorch's ``TensorDataset``).

    ``ds[i]`` gives a tuple of the i-th rows; ``ds[index_array]`` gives a tuple of batches.
    """

    _batch_indexable = True  # ds[index_array] returns whole batches; DataLoader relies on it

    def __init__(self, *arrays):
        if not arrays:
            raise ValueError("ArrayDataset: need at least one array")
        arrays = tuple(np.asarray(a) for a in arrays)
        for i, a in enumerate(arrays):
            if a.ndim == 0:
                raise ValueError(f"ArrayDataset: array {i} must have at least 1 dimension, got a scalar")
            if len(a) != len(arrays[0]):
                raise ValueError(f"ArrayDataset: all arrays need the same first dimension, array 0 has "
                                 f"{len(arrays[0])} rows but array {i} has {len(a)}")
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays[0])

    def __getitem__(self, index):
        return tuple(a[index] for a in self.arrays)

    def __repr__(self):
        shapes = ", ".join(f"{a.dtype}{tuple(a.shape)}" for a in self.arrays)
        return f"ArrayDataset({shapes})"


def _as_dataset(dataset):
    if isinstance(dataset, np.ndarray):
        return ArrayDataset(dataset), True
    if isinstance(dataset, (tuple, list)):
        return ArrayDataset(*dataset), False
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError("DataLoader: dataset must be an array, a tuple of arrays or an object with __len__ "
                        f"and __getitem__, got {type(dataset).__name__}")
    return dataset, False


class DataLoader:
    """Iterate over a dataset in mini-batches of numpy arrays.

    Args:
        dataset: tuple of arrays (x, y, ...), a single array, or a map-style dataset (``len`` + indexing).
        batch_size: samples per batch (int > 0).
        shuffle: draw a new random order every epoch (every ``iter(loader)``).
        drop_last: drop the last incomplete batch.
        generator: seed (int) or ``numpy.random.Generator`` for the shuffle; None uses cnnx's default
            generator (``cnnx.manual_seed``). The same seed gives the same sequence of epochs.
        transform: applied to the first array of each batch (the inputs), e.g. ``Compose([...])``.
        target_transform: applied to the second array of each batch (the targets).
        num_replicas, rank: data-parallel training (``cnnx.distributed``): ``batch_size`` is then the GLOBAL
            batch, and this loader yields only rank ``rank``'s part of each one, ``batch_size // num_replicas``
            consecutive samples of the epoch's order (the last, smaller batch is split as evenly as possible,
            so a rank may get an empty part). Every rank draws the same seeded permutation, so the parts are
            disjoint and together they are exactly the batches of the single-process loader. ``batch_size``
            must be a multiple of ``num_replicas``, and shuffling needs an explicit ``generator`` (the same
            seed on every rank). See :meth:`shard`.

    Yields tuples of arrays (or a single array when given a single array). ``len(loader)`` is the number
    of batches per epoch (the same on every rank).
    """

    def __init__(self, dataset, batch_size=1, shuffle=False, drop_last=False, generator=None,
                 transform=None, target_transform=None, num_replicas=1, rank=0):
        self.dataset, self._single = _as_dataset(dataset)
        self.batch_size = _positive_int(batch_size, "DataLoader: batch_size")
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.generator = None if generator is None else _generator(generator, "DataLoader")
        self.num_replicas = _positive_int(num_replicas, "DataLoader: num_replicas")
        self.rank = _positive_int(rank, "DataLoader: rank", allow_zero=True)
        if self.rank >= self.num_replicas:
            raise ValueError(f"DataLoader: rank must be in 0..num_replicas - 1 = {self.num_replicas - 1}, "
                             f"got {self.rank}")
        if self.batch_size % self.num_replicas:
            raise ValueError(f"DataLoader: batch_size (the global batch) must be a multiple of num_replicas to be "
                             f"split evenly over the ranks, got batch_size {self.batch_size} for "
                             f"{self.num_replicas} ranks ({self.batch_size} % {self.num_replicas} = "
                             f"{self.batch_size % self.num_replicas})")
        if self.shuffle and self.num_replicas > 1 and self.generator is None:
            raise ValueError(f"DataLoader: shuffle with num_replicas={self.num_replicas} needs generator=SEED, the "
                             f"same on every rank (the ranks must draw the same permutation), got None")
        for name, fn in (("transform", transform), ("target_transform", target_transform)):
            if fn is not None and not callable(fn):
                raise TypeError(f"DataLoader: {name} must be callable or None, got {type(fn).__name__}")
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self):
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self):
        """Samples per epoch over all ranks (all of them, or fewer with drop_last)."""
        n = len(self.dataset)
        return (n // self.batch_size) * self.batch_size if self.drop_last else n

    def shard(self, rank, num_replicas):
        """This loader for rank ``rank`` of ``num_replicas``: same dataset, global batch, transforms, and the
        same shuffle generator object (a copy per process under MPI, each seeded alike)."""
        if self.num_replicas != 1:
            raise ValueError(f"DataLoader.shard: this loader is already rank {self.rank}'s shard of "
                             f"{self.num_replicas}")
        return DataLoader(self.dataset if not self._single else self.dataset.arrays[0],
                          batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
                          generator=self.generator, transform=self.transform,
                          target_transform=self.target_transform, num_replicas=num_replicas, rank=rank)

    def _part(self, start, stop):
        """[start, stop) of the epoch's order that is this rank's part of the global batch [start, stop)."""
        if self.num_replicas == 1:
            return start, stop
        base, extra = divmod(stop - start, self.num_replicas)
        first = start + self.rank * base + min(self.rank, extra)
        return first, first + base + (self.rank < extra)

    def _fetch(self, index):
        if getattr(self.dataset, "_batch_indexable", False):
            return self.dataset[index]
        if len(index) == 0:  # a rank's empty part of a last batch smaller than the number of ranks
            batch = self._fetch(np.zeros(1, dtype=np.int64))
            return tuple(b[:0] for b in batch) if isinstance(batch, tuple) else batch[:0]
        items = [self.dataset[int(i)] for i in index]
        if isinstance(items[0], (tuple, list)):
            return tuple(np.stack([np.asarray(it[k]) for it in items]) for k in range(len(items[0])))
        return np.stack([np.asarray(it) for it in items])

    def __iter__(self):
        n = len(self.dataset)
        order = _generator(self.generator, "DataLoader").permutation(n) if self.shuffle else None
        for start in range(0, self.num_samples, self.batch_size):
            first, last = self._part(start, min(start + self.batch_size, n))
            index = order[first:last] if self.shuffle else np.arange(first, last)
            batch = self._fetch(index)
            if self._single:
                batch = batch[0] if isinstance(batch, tuple) else batch
                yield self.transform(batch) if self.transform is not None else batch
                continue
            batch = list(batch) if isinstance(batch, (tuple, list)) else [batch]
            if self.transform is not None:
                batch[0] = self.transform(batch[0])
            if self.target_transform is not None and len(batch) > 1:
                batch[1] = self.target_transform(batch[1])
            yield tuple(batch)

    def __repr__(self):
        return (f"DataLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"drop_last={self.drop_last}, batches={len(self)}"
                + (f", rank={self.rank}, num_replicas={self.num_replicas})" if self.num_replicas > 1 else ")"))


# ------------------------------------------------------------------------------------------ transforms
def _check_batch(x, name, min_ndim=3):
    x = np.asarray(x)
    if x.ndim < min_ndim or x.ndim > 4:
        raise ValueError(f"{name}: expected a batch of shape (N, H, W) or (N, C, H, W), got shape {x.shape}")
    return x


class Compose:
    """Apply transforms in order: ``Compose([ToFloat(), Normalize(0.1307, 0.3081)])``."""

    def __init__(self, transforms):
        transforms = list(transforms)
        for i, t in enumerate(transforms):
            if not callable(t):
                raise TypeError(f"Compose: transform {i} must be callable, got {type(t).__name__}")
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self):
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class ToFloat:
    """uint8 images in [0, 255] -> float32 in [0, 1], adding the channel axis: (N, H, W) -> (N, 1, H, W).

    (N, C, H, W) batches keep their shape. The cnnx counterpart of torchvision's ``ToTensor``.
    """

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"ToFloat: dtype must be float32 or float64, got {self.dtype}")

    def __call__(self, x):
        x = _check_batch(x, "ToFloat")
        if x.ndim == 3:
            x = x[:, None]
        if x.dtype == np.uint8:
            return x.astype(self.dtype) * self.dtype.type(1.0 / 255.0)
        if np.issubdtype(x.dtype, np.floating):
            return x.astype(self.dtype, copy=False)
        raise TypeError(f"ToFloat: expected uint8 or floating images, got {x.dtype}")

    def __repr__(self):
        return f"ToFloat(dtype={self.dtype.name})"


class Normalize:
    """(x - mean) / std per channel on a float batch (N, C, H, W) or (N, H, W); mean/std: scalar or length C."""

    def __init__(self, mean, std):
        self.mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
        self.std = np.atleast_1d(np.asarray(std, dtype=np.float64))
        if self.mean.ndim != 1 or self.std.ndim != 1 or len(self.mean) != len(self.std):
            raise ValueError(f"Normalize: mean and std must be scalars or sequences of the same length, got "
                             f"mean {self.mean.tolist()} and std {self.std.tolist()}")
        if np.any(self.std <= 0) or not np.all(np.isfinite(self.std)):
            raise ValueError(f"Normalize: std must be finite and > 0, got {self.std.tolist()}")

    def __call__(self, x):
        x = _check_batch(x, "Normalize")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"Normalize: expected a float32/float64 batch (apply ToFloat first), got {x.dtype}")
        channels = x.shape[1] if x.ndim == 4 else 1
        if len(self.mean) not in (1, channels):
            raise ValueError(f"Normalize: {len(self.mean)} mean/std values for a batch with {channels} "
                             f"channels (shape {x.shape})")
        shape = (1, -1, 1, 1) if x.ndim == 4 else (1, 1, 1)
        mean = self.mean.astype(x.dtype).reshape(shape)
        inv_std = (1.0 / self.std).astype(x.dtype).reshape(shape)
        return (x - mean) * inv_std

    def __repr__(self):
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


def _padding4(padding, name):
    """int p -> (p, p, p, p); (ph, pw) -> (ph, ph, pw, pw); (left, top, right, bottom) as in torchvision."""
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        p = (padding,) * 4
    elif isinstance(padding, (tuple, list)) and len(padding) == 2:
        p = (padding[1], padding[1], padding[0], padding[0])  # torchvision: (left/right, top/bottom)
    elif isinstance(padding, (tuple, list)) and len(padding) == 4:
        left, top, right, bottom = padding
        p = (top, bottom, left, right)
    else:
        raise TypeError(f"{name}: padding must be an int or a tuple of 2 or 4 ints, got {padding!r}")
    for v in p:
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}: padding values must be ints >= 0, got {padding!r}")
    return tuple(int(v) for v in p)


def _pad(x, pad4, fill):
    top, bottom, left, right = pad4
    width = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
    return np.pad(x, width, mode="constant", constant_values=fill)


class Pad:
    """Constant padding of the last two axes. ``padding``: int, (left/right, top/bottom) or
    (left, top, right, bottom), as torchvision's ``Pad``; e.g. ``Pad(2)`` makes 28x28 digits 32x32."""

    def __init__(self, padding, fill=0):
        self.pad4 = _padding4(padding, "Pad")
        self.padding = padding
        self.fill = fill

    def __call__(self, x):
        return _pad(_check_batch(x, "Pad"), self.pad4, self.fill)

    def __repr__(self):
        return f"Pad(padding={self.padding!r}, fill={self.fill})"


def _size2(size, name):
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, numbers.Integral) and s > 0 for s in size)):
        raise ValueError(f"{name}: size must be an int > 0 or a pair (h, w) of ints > 0, got {size!r}")
    return int(size[0]), int(size[1])


def _crop_at(x, oy, ox, h, w):
    """Per-sample crops: out[n] = x[n, ..., oy[n]:oy[n]+h, ox[n]:ox[n]+w]."""
    n = x.shape[0]
    rows = oy[:, None] + np.arange(h)                  # (N, h)
    cols = ox[:, None] + np.arange(w)                  # (N, w)
    if x.ndim == 3:
        return x[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return x[np.arange(n)[:, None, None, None], np.arange(x.shape[1])[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :]]


class CenterCrop:
    """Crop the central (h, w) window of every image (torchvision's ``CenterCrop``; offsets round down)."""

    def __init__(self, size):
        self.size = _size2(size, "CenterCrop")

    def __call__(self, x):
        x = _check_batch(x, "CenterCrop")
        h, w = self.size
        H, W = x.shape[-2:]
        if h > H or w > W:
            raise ValueError(f"CenterCrop: crop size {(h, w)} is larger than the images {(H, W)}")
        top, left = (H - h) // 2, (W - w) // 2
        return x[..., top:top + h, left:left + w].copy()

    def __repr__(self):
        return f"CenterCrop(size={self.size})"


class RandomCrop:
    """Pad (optionally), then crop a random (h, w) window per sample, as torchvision's ``RandomCrop``.

    ``RandomCrop(28, padding=2)`` shifts each digit by up to 2 pixels in each direction.
    """

    def __init__(self, size, padding=None, fill=0, generator=None):
        self.size = _size2(size, "RandomCrop")
        self.padding = padding
        self.pad4 = _padding4(padding, "RandomCrop") if padding is not None else (0, 0, 0, 0)
        self.fill = fill
        self.generator = None if generator is None else _generator(generator, "RandomCrop")

    def __call__(self, x):
        x = _check_batch(x, "RandomCrop")
        if any(self.pad4):
            x = _pad(x, self.pad4, self.fill)
        h, w = self.size
        H, W = x.shape[-2:]
        if h > H or w > W:
            raise ValueError(f"RandomCrop: crop size {(h, w)} is larger than the (padded) images {(H, W)}")
        rng = _generator(self.generator, "RandomCrop")
        oy = rng.integers(0, H - h + 1, size=x.shape[0])
        ox = rng.integers(0, W - w + 1, size=x.shape[0])
        return _crop_at(x, oy, ox, h, w)

    def __repr__(self):
        return f"RandomCrop(size={self.size}, padding={self.padding!r})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability p (torchvision's ``RandomHorizontalFlip``), per sample."""

    def __init__(self, p=0.5, generator=None):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"RandomHorizontalFlip: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self.generator = None if generator is None else _generator(generator, "RandomHorizontalFlip")

    def __call__(self, x):
        x = _check_batch(x, "RandomHorizontalFlip")
        rng = _generator(self.generator, "RandomHorizontalFlip")
        flip = rng.random(x.shape[0]) < self.p
        out = x.copy()
        out[flip] = x[flip][..., ::-1]
        return out

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class RandomShift:
    """Translate each image by a random integer (dy, dx) in [-max_shift, max_shift]^2, filling with ``fill``.

    The output has the input's shape; equal to ``RandomCrop((H, W), padding=max_shift)``.
    """

    def __init__(self, max_shift, fill=0, generator=None):
        self.max_shift = _positive_int(max_shift, "RandomShift: max_shift", allow_zero=True)
        self.fill = fill
        self.generator = None if generator is None else _generator(generator, "RandomShift")

    def __call__(self, x):
        x = _check_batch(x, "RandomShift")
        s = self.max_shift
        if s == 0:
            return x.copy()
        H, W = x.shape[-2:]
        padded = _pad(x, (s, s, s, s), self.fill)
        rng = _generator(self.generator, "RandomShift")
        oy = rng.integers(0, 2 * s + 1, size=x.shape[0])
        ox = rng.integers(0, 2 * s + 1, size=x.shape[0])
        return _crop_at(padded, oy, ox, H, W)

    def __repr__(self):
        return f"RandomShift(max_shift={self.max_shift}, fill={self.fill})"
