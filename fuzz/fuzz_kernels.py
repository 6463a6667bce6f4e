"""Fuzz the C boundary: random shapes, geometry, dtypes, layouts and bytes into cnnx._kernels and
cnnx.functional. Allowed outcomes: a result, or ValueError / TypeError / MemoryError. Anything else --
another exception, a crash, a sanitizer report, a hang -- is a bug.

    python fuzz/fuzz_kernels.py --runs 20000               # atheris, if installed
    python fuzz/fuzz_kernels.py --runs 20000 --no-atheris  # random inputs
    scripts/sanitize.sh --fuzz 20000                        # random inputs under ASan + UBSan

Kernel-level calls get geometry that fits int64 (the functional API normalises anything else first);
functional calls get anything, including ints past 64 bits, floats, strings and None.
Sizes are either tiny (0..7) or "huge" (>= 2**36 elements: more memory than any test machine), never in
between, so every input finishes in milliseconds. Geometry values are capped at 2**12 at the kernel level:
pooling windows that large make the C max-pool clip loops run for minutes (reported; see fuzz/README.md).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _driver import Provider, run  # noqa: E402

import cnnx  # noqa: E402
import cnnx.functional as F  # noqa: E402
from cnnx import _kernels as K  # noqa: E402

ALLOWED = (ValueError, TypeError, MemoryError)
SANITIZE = True     # reaches csrc/: fuzz/run_all.py --sanitized runs it under ASan + UBSan (scripts/sanitize.sh)
HUGE = [2**36, 2**40, 2**60, 2**62, 2**63 - 1]
DTYPES = [np.float32, np.float64, np.float32, np.float64, np.float16, np.int64, np.complex64, np.bool_]
KERNEL_GEOMETRY_CAP = 2**12
# Kernel-level calls get unaligned arrays too (the boundary must refuse them); FUZZ_KERNEL_ALIGNED=1 keeps them
# aligned there, to look past that finding for others.
KERNEL_ALIGNED = os.environ.get("FUZZ_KERNEL_ALIGNED") == "1"
_kernel_level = [False]
_numpy_backend = [False]


def size(p):
    if _numpy_backend[0]:       # cnnx.reference loops over the batch even when an array is empty: with N = 2**36
        return p.int(0, 7)      # and zero channels it runs for an hour (reported), so no huge sizes there
    return p.int(0, 7) if p.int(0, 15) != 15 else p.pick(HUGE)


def shape(p, ndim=4):
    if p.int(0, 15) == 15:
        ndim = p.int(0, 6)
    return tuple(size(p) for _ in range(ndim))


def geo_int(p, kernel_level):
    r = p.int(0, 31)
    if r < 24:
        return p.int(1, 4) if r < 20 else p.int(0, 2)
    if r < 28:
        return p.int(-3, 0)
    if kernel_level:
        return p.int(5, KERNEL_GEOMETRY_CAP)
    return p.pick([2**31, 2**40, 2**61, 2**62, 2**63, 2**64, -2**63])


def geo(p, n, kernel_level):
    if not kernel_level and p.int(0, 15) == 15:
        return p.pick([None, 1.5, "same", "valid", "x", (), (1, 2, 3), [1, 1], np.int64(2), True])
    return tuple(geo_int(p, kernel_level) for _ in range(n))


def array(p, dims, dtype=None):
    """An array of `dims` filled from the fuzz bytes, in a random layout (kernel level: mostly contiguous)."""
    if dtype is None:
        dtype = p.pick(DTYPES)
    count = 1
    for d in dims:
        count *= d
    if count > 4096:                         # huge: the arguments claim it, we cannot build it
        return np.zeros((1,) * len(dims), dtype)
    itemsize = np.dtype(dtype).itemsize
    raw = p.bytes(count * itemsize).ljust(count * itemsize, b"\0")
    a = np.frombuffer(raw, dtype=dtype).reshape(dims).copy() if count else np.zeros(dims, dtype)
    kind = p.int(0, 7)
    if kind == 1 and a.ndim >= 2:
        a = np.asfortranarray(a)
    elif kind == 2 and a.ndim >= 1:
        a = np.repeat(a, 2, axis=-1)[..., ::2]
    elif kind == 3 and a.ndim >= 1:
        a = a[..., ::-1]
    elif kind == 4:
        a.flags.writeable = False
    elif kind == 5 and a.size and not (KERNEL_ALIGNED and _kernel_level[0]):
        buf = np.zeros(a.nbytes + 1, np.uint8)
        b = buf[1:].view(a.dtype).reshape(a.shape)
        b[...] = a
        a = b
    return a


def conv_shapes(p):
    """(x_shape, w_shape, groups): consistent three times in four, anything otherwise."""
    if p.int(0, 3) == 3:
        return shape(p), shape(p), geo_int(p, True)
    groups = p.pick([1, 1, 2, 3])
    n, cg, ocg = size(p), p.int(0, 3), p.int(0, 3)
    h, w = p.int(1, 9), p.int(1, 9)
    return (n, cg * groups, h, w), (ocg * groups, cg, p.int(1, 4), p.int(1, 4)), groups


def out_shape(fn, *args):
    try:
        return fn(*args)
    except (ValueError, TypeError):
        return (1, 1, 1, 1)


def maybe(p, good, bad_fn):
    return good if p.int(0, 7) != 7 else bad_fn()


def kernel_call(p):
    op = p.int(0, 6)
    dt = p.pick(DTYPES)
    same = dt if p.int(0, 7) != 7 else p.pick(DTYPES)
    if op <= 2:
        xs, ws, groups = conv_shapes(p)
        stride, pad, dil = geo(p, 2, True), geo(p, 4, True), geo(p, 2, True)
        ys = out_shape(F.conv2d_output_shape, xs, ws, stride, pad, dil, groups)
        if op == 0:
            b = None if p.bool() else array(p, maybe(p, ws[:1], lambda: shape(p, 1)), same)
            return K.conv2d_forward(array(p, xs, dt), array(p, ws, same), b, stride, pad, dil, groups)
        dy = array(p, maybe(p, ys, lambda: shape(p)), dt)
        if op == 1:
            return K.conv2d_backward_input(dy, array(p, ws, same), maybe(p, xs, lambda: shape(p)), stride, pad,
                                           dil, groups)
        return K.conv2d_backward_weight(dy, array(p, xs, same), maybe(p, ws, lambda: shape(p)), stride, pad, dil,
                                        groups, p.bool())
    xs = maybe(p, (size(p), size(p), p.int(1, 9), p.int(1, 9)), lambda: shape(p))
    ks, stride, pad = geo(p, 2, True), geo(p, 2, True), geo(p, 2, True)
    dil = geo(p, 2, True) if op <= 4 else (1, 1)
    ceil = p.bool()
    ys = out_shape(F.pool2d_output_shape, xs, ks, stride, pad, dil, ceil)
    if op == 3:
        return K.maxpool2d_forward(array(p, xs, dt), ks, stride, pad, dil, ceil)
    if op == 4:
        dy = array(p, maybe(p, ys, lambda: shape(p)), dt)
        idx_dtype = np.int64 if p.int(0, 7) != 7 else p.pick([np.int32, np.float64, np.uint64])
        if p.int(0, 3) != 3:
            try:
                _, indices = K.maxpool2d_forward(np.zeros(xs, dt), ks, stride, pad, dil, ceil)
            except ALLOWED:
                indices = array(p, dy.shape, np.int64)
        else:
            indices = array(p, maybe(p, dy.shape, lambda: shape(p)), idx_dtype)
        return K.maxpool2d_backward(dy, indices, maybe(p, xs, lambda: shape(p)))
    div = None if p.bool() else geo_int(p, True)
    cip = p.bool()
    if op == 5:
        return K.avgpool2d_forward(array(p, xs, dt), ks, stride, pad, ceil, cip, div)
    return K.avgpool2d_backward(array(p, maybe(p, ys, lambda: shape(p)), dt), maybe(p, xs, lambda: shape(p)), ks,
                                stride, pad, ceil, cip, div)


def functional_call(p):
    op = p.int(0, 5)
    dt = p.pick(DTYPES)
    if op in (0, 1):
        xs, ws, groups = conv_shapes(p)
        x = array(p, xs, dt)
        w = array(p, ws, dt if p.int(0, 7) != 7 else p.pick(DTYPES))
        b = None if p.bool() else array(p, maybe(p, ws[:1], lambda: shape(p, 1)), dt)
        kw = dict(stride=geo(p, 2, False), padding=p.pick([geo(p, 2, False), geo(p, 4, False), "same", "valid",
                                                          geo_int(p, False)]),
                  dilation=geo(p, 2, False), groups=maybe(p, groups, lambda: geo_int(p, False)))
        y = F.conv2d(x, w, b, **kw)
        if op == 0:
            return y
        return F.conv2d_backward(array(p, maybe(p, y.shape, lambda: shape(p)), dt), x, w, b, **kw)
    x = array(p, maybe(p, (size(p), size(p), p.int(1, 9), p.int(1, 9)), lambda: shape(p)), dt)
    ks = geo(p, 2, False) if p.int(0, 3) != 3 else geo_int(p, False)
    stride = None if p.bool() else geo(p, 2, False)
    if op in (2, 3):
        kw = dict(stride=stride, padding=geo(p, 2, False), dilation=geo(p, 2, False), ceil_mode=p.bool())
        y, idx = F.max_pool2d(x, ks, return_indices=True, **kw)
        if op == 2:
            return y
        return F.max_pool2d_backward(array(p, maybe(p, y.shape, lambda: shape(p)), dt), x if p.bool() else x.shape,
                                     ks, indices=maybe(p, idx, lambda: array(p, shape(p), np.int64)), **kw)
    kw = dict(stride=stride, padding=geo(p, 2, False), ceil_mode=p.bool(), count_include_pad=p.bool(),
              divisor_override=None if p.bool() else geo_int(p, False))
    y = F.avg_pool2d(x, ks, **kw)
    if op == 4:
        return y
    return F.avg_pool2d_backward(array(p, maybe(p, y.shape, lambda: shape(p)), dt), x if p.bool() else x.shape,
                                 ks, **kw)


def one_input(data):
    p = Provider(data)
    backend = p.int(0, 3)
    _kernel_level[0] = backend == 0
    _numpy_backend[0] = backend == 3
    if backend == 0:
        return kernel_call(p)
    with cnnx.backend("c" if backend < 3 else "numpy"):
        return functional_call(p)


if __name__ == "__main__":
    np.seterr(all="ignore")
    run(one_input, ALLOWED, __doc__.splitlines()[0])
