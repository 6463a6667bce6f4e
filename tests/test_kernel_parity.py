"""The C kernels (cnnx._kernels) against the numpy reference (cnnx.reference), every forward and every gradient,
float32 and float64, over a grid of the geometries where convolution and pooling bugs hide; then the public
functional API on both backends, including convolve2d and non-contiguous inputs."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cnnx
from cnnx import _geometry, functional as F

DTYPES = [np.float32, np.float64]

# ----------------------------------------------------------------------------------------------------------------
# Geometry grids.
# conv: (N, C, H, W, OC, (KH, KW), stride, padding, dilation, groups); padding in any form the public API takes.
CONV_CASES = {
    "basic_3x3": (2, 3, 8, 8, 4, (3, 3), 1, 0, 1, 1),
    "nonsquare_kernel_input": (2, 2, 7, 10, 3, (2, 5), 1, (1, 2), 1, 1),
    "stride_ne_kernel": (2, 3, 9, 11, 2, (3, 3), 2, 1, 1, 1),
    "stride_gt_kernel": (2, 2, 11, 9, 3, (2, 2), 3, 0, 1, 1),
    "stride_nonsquare": (1, 2, 10, 13, 3, (3, 2), (2, 3), (1, 0), 1, 1),
    "asymmetric_padding": (2, 2, 6, 7, 3, (3, 3), 1, (0, 2, 1, 3), 1, 1),
    "padding_gt_kernel": (1, 1, 4, 5, 2, (2, 2), 2, (3, 1, 0, 4), 1, 1),
    "same_odd": (2, 3, 9, 8, 2, (3, 5), 1, "same", 1, 1),
    "same_even_kernel": (2, 2, 7, 6, 3, (4, 2), 1, "same", 1, 1),
    "same_stride2_tf": (2, 2, 9, 10, 3, (3, 4), 2, "same", 1, 1),
    "same_dilated": (1, 2, 8, 9, 2, (3, 3), 1, "same", (2, 3), 1),
    "valid": (2, 2, 6, 6, 2, (3, 3), 1, "valid", 1, 1),
    "dilation": (2, 2, 11, 12, 3, (3, 3), 1, 1, (2, 3), 1),
    "dilation_stride": (1, 3, 13, 10, 2, (2, 3), (2, 1), (2, 1), (3, 2), 1),
    "groups2": (2, 4, 8, 7, 6, (3, 3), 1, 1, 1, 2),
    "groups3_stride": (2, 6, 9, 9, 3, (2, 3), 2, (1, 0, 0, 2), 1, 3),
    "depthwise": (2, 4, 9, 8, 4, (3, 3), 1, 1, 1, 4),
    "depthwise_multiplier2": (1, 3, 10, 11, 6, (3, 2), 2, (1, 1, 0, 1), (1, 2), 3),
    "n1_1x1": (1, 5, 6, 7, 3, (1, 1), 1, 0, 1, 1),
    "1x1_stride2": (2, 4, 7, 9, 5, (1, 1), 2, 0, 1, 1),
    "odd_sizes": (3, 1, 13, 7, 5, (3, 1), 1, (1, 0), 1, 1),
    "kernel_fills_input": (2, 2, 5, 4, 3, (5, 4), 1, 0, 1, 1),
    "kernel_fills_padded_input": (1, 2, 3, 2, 2, (5, 4), 1, 1, 1, 1),
    "input_1x1": (2, 3, 1, 1, 2, (1, 1), 1, 0, 1, 1),
    "lenet_conv1": (4, 1, 28, 28, 6, (5, 5), 1, 2, 1, 1),
    "lenet_conv2": (4, 6, 14, 14, 16, (5, 5), 1, 0, 1, 1),
    # the forward from kernel-column-shifted copies (few channels, narrow padded rows): a tall image in several row
    # chunks, and dilated with asymmetric padding
    "shifted_copies_tall_chunked": (1, 1, 1000, 28, 6, (5, 5), 1, 2, 1, 1),
    "shifted_copies_dilated": (2, 2, 30, 20, 6, (3, 3), 1, (1, 2, 2, 1), (1, 2), 1),
    "gemm_tail_sizes": (2, 19, 23, 29, 37, (3, 3), 1, 1, 1, 1),
    # a kernel covering the whole unpadded input (LeNet-5's C5): the fully connected path
    "fully_connected_kernel": (3, 4, 5, 6, 7, (5, 6), 1, 0, 1, 1),
    "fully_connected_stride2_pad_after": (2, 3, 4, 4, 5, (4, 4), 2, (0, 1, 0, 1), 1, 1),
    # the stride-1 direct backward-input path (>= 4 channels per group, padding adds <= 30% pixels, and too
    # many output channels per group for the rows path: Wz/OW = 10/8 > 1 + 18/80); a case it used to take
    "direct_bwd_input_wide_layer": (1, 4, 64, 8, 80, (3, 3), 1, 1, 1, 1),
    "direct_bwd_input_groups_dilated": (2, 10, 26, 24, 6, (3, 2), 1, (2, 1, 0, 3), (1, 2), 2),
    "wide_channels_7x7_s2": (2, 8, 21, 19, 13, (7, 7), 2, 3, 1, 1),
    # the stride-1 "rows" backward-input path (width padding Wz/OW <= 1 + 18/(OC/G)): dx padded in scratch
    # (padding, dilation, groups); the kernel one column wide (dy read in place); dx itself as the padded
    # gradient, in several row chunks (a 1100-wide image), and padded in scratch in several chunks; at the
    # threshold (Wz = 2*OW with 18 output channels) and just past it (im2col)
    "rows_bwd_input_padded_dilated_groups": (2, 4, 9, 11, 6, (3, 2), 1, (1, 2, 0, 3), (2, 1), 2),
    "rows_bwd_input_kernel_1_wide": (2, 3, 8, 7, 4, (3, 1), 1, (1, 2, 0, 0), (2, 1), 1),
    "rows_bwd_input_chunked_in_place": (1, 8, 30, 1098, 8, (3, 3), 1, 0, 1, 1),
    "rows_bwd_input_chunked_padded": (1, 8, 30, 1096, 8, (3, 3), 1, 1, 1, 1),
    "rows_bwd_input_at_threshold": (2, 3, 6, 8, 18, (2, 5), 1, 0, 1, 1),
    "rows_bwd_input_past_threshold": (2, 3, 6, 7, 18, (2, 5), 1, 0, 1, 1),
    # the stride-1 forward's gather product (output pixels x output channels, transposed store): a partial
    # channel panel (19 = 16 + 3) and a partial pixel tile (63 pixels) with padding and dilation; groups;
    # a 60x200 image in two row chunks (N = 1). lenet_conv1, n1_1x1 and gemm_tail_sizes (float32) stay on
    # the padded-width product.
    "gather_fwd_partial_tiles": (2, 5, 11, 9, 19, (3, 4), 1, (1, 2, 0, 1), (2, 1), 1),
    "gather_fwd_groups": (2, 8, 10, 9, 32, (3, 3), 1, 1, 1, 2),
    "gather_fwd_chunked": (1, 16, 60, 200, 16, (3, 3), 1, 1, 1, 1),
    # the stride-1 backward-weight's row dots (AVX2: one dot product per output row, dy in place, a masked last
    # step): padding, dilation and groups; the input read in place (no padding, odd width); two row chunks.
    # lenet_conv2 (float32) and gemm_tail_sizes keep dy spread to the padded width.
    "row_dots_bwd_weight_dilated_groups": (2, 4, 12, 37, 6, (3, 3), 1, (1, 0, 2, 1), (1, 2), 2),
    "row_dots_bwd_weight_in_place": (2, 3, 9, 45, 4, (2, 3), 1, 0, 1, 1),
    "row_dots_bwd_weight_chunked": (1, 8, 40, 600, 4, (3, 3), 1, 1, 1, 1),
    # the stride-1 backward-weight's gather product (taps x output channels, summed over real pixels): the input
    # read in place for two image groups (N = 10 > 8), partial tap tile (45 taps) and channel panel (14);
    # padding and dilation; a 256-channel input in two row chunks. lenet_conv2 takes it too.
    "wgather_bwd_weight_in_place_two_groups": (10, 5, 9, 8, 14, (3, 3), 1, 0, 1, 1),
    "wgather_bwd_weight_padded_dilated": (3, 6, 14, 14, 16, (5, 5), 1, (1, 0, 2, 1), (2, 1), 1),
    "wgather_bwd_weight_chunked": (1, 256, 60, 12, 16, (3, 3), 1, 1, 1, 1),
    # the stride-1 forward's padded-width product stored in place without the extra columns (the padded width
    # a multiple of the column panel, 32; lenet_conv1 too): a panel wholly past the output width (14 of 32),
    # skipped; a 700-row image in two row chunks (each chunk's last row stored exactly).
    "wrap_fwd_skipped_panel": (2, 2, 6, 14, 3, (3, 19), 1, (1, 9), 1, 1),
    "wrap_fwd_chunked": (1, 1, 700, 28, 6, (5, 5), 1, 2, 1, 1),
}

# pool: (N, C, H, W, kernel, stride, padding, dilation, ceil_mode); stride None = kernel.
POOL_CASES = {
    "k2_default_stride": (2, 3, 8, 8, 2, None, 0, 1, False),
    "k3_s2_p1": (2, 2, 9, 10, 3, 2, 1, 1, False),
    "nonsquare_overlapping": (2, 2, 7, 11, (2, 3), (1, 2), 0, 1, False),
    "stride_gt_kernel": (1, 2, 11, 10, 2, 3, 0, 1, False),
    "odd_input_k2": (2, 2, 7, 9, 2, None, 0, 1, False),
    "ceil_mode_leftover": (2, 2, 7, 9, 2, None, 0, 1, True),
    "ceil_mode_overlap": (1, 2, 8, 10, 3, 2, 1, 1, True),
    "ceil_mode_drop_last": (1, 1, 5, 5, 3, 3, 1, 1, True),
    "ceil_nonsquare": (2, 1, 10, 7, (3, 2), (2, 3), (1, 1), 1, True),
    "padding_half_kernel": (1, 2, 6, 7, 4, 2, 2, 1, False),
    "dilation": (1, 2, 11, 12, 3, 1, 1, 2, False),
    "dilation_nonsquare_ceil": (2, 1, 12, 13, (2, 3), (2, 1), (1, 1), (3, 2), True),
    "k1": (1, 2, 5, 6, 1, 1, 0, 1, False),
    "global": (2, 3, 6, 5, (6, 5), 1, 0, 1, False),
    "n1_c1_odd": (1, 1, 9, 5, 3, 2, 0, 1, False),
    "lenet": (4, 6, 28, 28, 2, 2, 0, 1, False),
}
AVG_OPTIONS = {"include_pad": (True, None), "exclude_pad": (False, None), "divisor3": (True, 3),
               "divisor7_exclude": (False, 7)}


def conv_geometry(case):
    """The normalised kernel-level geometry of a CONV_CASES entry."""
    n, c, h, w, oc, (kh, kw), stride, padding, dilation, groups = case
    s = _geometry.pair(stride, "stride")
    d = _geometry.pair(dilation, "dilation")
    p = _geometry.conv_padding(padding, (h, w), (kh, kw), s, d)
    return (n, c, h, w), (oc, c // groups, kh, kw), s, p, d, groups


def pool_geometry(case):
    n, c, h, w, kernel, stride, padding, dilation, ceil_mode = case
    k = _geometry.pair(kernel, "kernel_size")
    s = k if stride is None else _geometry.pair(stride, "stride")
    return (n, c, h, w), k, s, _geometry.pair(padding, "padding"), _geometry.pair(dilation, "dilation"), ceil_mode


def pool_input(rng, shape, kind, dtype):
    """normal: no ties; constant: every window tied; ints: many ties; infs: -inf patches."""
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "constant":
        x = np.full(shape, 0.75)
    elif kind == "ints":
        x = rng.integers(-2, 3, shape).astype(np.float64)
    elif kind == "infs":
        x = rng.standard_normal(shape)
        x[rng.random(shape) < 0.3] = -np.inf
    else:
        raise AssertionError(kind)
    return np.ascontiguousarray(x, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Kernel level: C vs reference.
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("case", list(CONV_CASES.values()), ids=list(CONV_CASES))
def test_conv2d_kernels(kernels, ref, check, rng, case, dtype):
    x_shape, w_shape, s, p, d, g = conv_geometry(case)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    for bias in (b, None):
        expected = ref.conv2d_forward(x, w, bias, s, p, d, g)
        check(kernels.conv2d_forward(x, w, bias, s, p, d, g), expected, dtype, "C vs numpy conv2d y",
              f"bias={bias is not None}")
    dy = rng.standard_normal(expected.shape).astype(dtype)
    check(kernels.conv2d_backward_input(dy, w, x_shape, s, p, d, g),
          ref.conv2d_backward_input(dy, w, x_shape, s, p, d, g), dtype, "C vs numpy conv2d dx")
    for with_bias in (True, False):
        dw_c, db_c = kernels.conv2d_backward_weight(dy, x, w_shape, s, p, d, g, with_bias)
        dw_r, db_r = ref.conv2d_backward_weight(dy, x, w_shape, s, p, d, g, with_bias)
        check(dw_c, dw_r, dtype, "C vs numpy conv2d dweight", f"with_bias={with_bias}")
        if with_bias:
            check(db_c, db_r, dtype, "C vs numpy conv2d dbias")
        else:
            assert db_c is None


def random_conv_case(rng):
    """A random geometry from the whole space (valid by construction)."""
    while True:
        groups = int(rng.choice([1, 1, 2, 3]))
        c = groups * int(rng.integers(1, 4))
        oc = groups * int(rng.integers(1, 4))
        if rng.random() < 0.2:
            groups, oc = c, c * int(rng.integers(1, 3))
        k = tuple(int(v) for v in rng.integers(1, 6, 2))
        s = tuple(int(v) for v in rng.integers(1, 5, 2))
        d = tuple(int(v) for v in rng.integers(1, 4, 2))
        p = tuple(int(v) for v in rng.integers(0, 4, 4))
        h, w = (int(v) for v in rng.integers(1, 14, 2))
        case = (int(rng.integers(1, 4)), c, h, w, oc, k, s, p, d, groups)
        try:
            _geometry.conv2d_output_shape((case[0], c, h, w), (oc, c // groups) + k, s, p, d, groups)
        except ValueError:
            continue
        return case


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("seed", range(12))
def test_conv2d_kernels_random_geometry(kernels, ref, check, seed, dtype):
    """Five random geometries per seed: stride, dilation, asymmetric padding, groups, depthwise, tiny inputs."""
    rng = np.random.default_rng(1000 + seed)
    for _ in range(5):
        case = random_conv_case(rng)
        x_shape, w_shape, s, p, d, g = conv_geometry(case)
        x = rng.standard_normal(x_shape).astype(dtype)
        w = rng.standard_normal(w_shape).astype(dtype)
        b = rng.standard_normal(w_shape[0]).astype(dtype)
        what = f"case={case}"
        y = ref.conv2d_forward(x, w, b, s, p, d, g)
        check(kernels.conv2d_forward(x, w, b, s, p, d, g), y, dtype, "C vs numpy conv2d y", what)
        dy = rng.standard_normal(y.shape).astype(dtype)
        check(kernels.conv2d_backward_input(dy, w, x_shape, s, p, d, g),
              ref.conv2d_backward_input(dy, w, x_shape, s, p, d, g), dtype, "C vs numpy conv2d dx", what)
        dw_c, db_c = kernels.conv2d_backward_weight(dy, x, w_shape, s, p, d, g, True)
        dw_r, db_r = ref.conv2d_backward_weight(dy, x, w_shape, s, p, d, g, True)
        check(dw_c, dw_r, dtype, "C vs numpy conv2d dweight", what)
        check(db_c, db_r, dtype, "C vs numpy conv2d dbias", what)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("name", ["gemm_tail_sizes", "wide_channels_7x7_s2", "depthwise_multiplier2",
                                  "same_stride2_tf", "lenet_conv2", "rows_bwd_input_padded_dilated_groups",
                                  "rows_bwd_input_kernel_1_wide", "gather_fwd_partial_tiles", "gather_fwd_groups",
                                  "wgather_bwd_weight_in_place_two_groups", "wrap_fwd_skipped_panel"])
def test_conv2d_portable_path(kernels, ref, check, rng, name, dtype):
    """The same parity with the AVX2+FMA GEMM switched off (the path of CPUs without AVX2)."""
    x_shape, w_shape, s, p, d, g = conv_geometry(CONV_CASES[name])
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    previous = kernels.force_portable()
    kernels.force_portable(True)
    try:
        y = kernels.conv2d_forward(x, w, b, s, p, d, g)
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx = kernels.conv2d_backward_input(dy, w, x_shape, s, p, d, g)
        dw, db = kernels.conv2d_backward_weight(dy, x, w_shape, s, p, d, g, True)
    finally:
        kernels.force_portable(previous)
    label = "C portable vs numpy conv2d"
    check(y, ref.conv2d_forward(x, w, b, s, p, d, g), dtype, label, "y")
    check(dx, ref.conv2d_backward_input(dy, w, x_shape, s, p, d, g), dtype, label, "dx")
    dw_r, db_r = ref.conv2d_backward_weight(dy, x, w_shape, s, p, d, g, True)
    check(dw, dw_r, dtype, label, "dweight")
    check(db, db_r, dtype, label, "dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_conv2d_nonfinite_propagates(kernels, ref, check, rng, dtype):
    """NaN and inf in x or dy reach exactly the outputs/gradients the reference says (no skipped zero taps)."""
    x = rng.standard_normal((2, 3, 9, 10)).astype(dtype)
    x[0, 1, 4, 5], x[1, 2, 0, 0] = np.nan, np.inf
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    w[1, 0, 1, 1] = 0.0
    geometry = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    y = ref.conv2d_forward(x, w, None, *geometry)
    assert np.isnan(y).any() and np.isinf(y).any()
    check(kernels.conv2d_forward(x, w, None, *geometry), y, dtype, "C vs numpy conv2d y", "non-finite")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dy[0, 0, 2, 2] = np.nan
    x[1, 2, 0, 0] = 0.0
    check(kernels.conv2d_backward_input(dy, w, x.shape, *geometry),
          ref.conv2d_backward_input(dy, w, x.shape, *geometry), dtype, "C vs numpy conv2d dx", "non-finite")
    for got, want in zip(kernels.conv2d_backward_weight(dy, x, w.shape, *geometry, True),
                         ref.conv2d_backward_weight(dy, x, w.shape, *geometry, True)):
        check(got, want, dtype, "C vs numpy conv2d dweight", "non-finite")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("name", ["lenet_conv2", "direct_bwd_input_wide_layer"])
def test_conv2d_backward_input_nonfinite_weight(kernels, ref, check, rng, name, dtype):
    """inf and NaN in the weight reach exactly the dx the reference says: the stride-1 paths, which multiply the
    weight with zeros outside dy, must not turn 0 * inf into NaNs at pixels that never meet that weight."""
    x_shape, w_shape, s, p, d, g = conv_geometry(CONV_CASES[name])
    w = rng.standard_normal(w_shape).astype(dtype)
    w[0, 0, 0, 0], w[-1, -1, -1, -1] = np.inf, np.nan
    y_shape = ref.conv2d_forward(np.zeros(x_shape, dtype), np.zeros(w_shape, dtype), None, s, p, d, g).shape
    dy = rng.standard_normal(y_shape).astype(dtype)
    want = ref.conv2d_backward_input(dy, w, x_shape, s, p, d, g)
    assert np.isfinite(want).any() and not np.isfinite(want).all()
    check(kernels.conv2d_backward_input(dy, w, x_shape, s, p, d, g), want, dtype, "C vs numpy conv2d dx",
          "non-finite weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_empty_batch_and_zero_channels(kernels, ref, check, dtype):
    """N = 0 gives empty results; C = 0 (weight (OC, 0, KH, KW)) gives y = bias and dbias = sum(dy)."""
    geometry = ((1, 1), (1, 0, 0, 1), (1, 1), 1)
    for x_shape, w_shape in [((0, 3, 5, 6), (2, 3, 3, 3)), ((2, 0, 5, 6), (2, 0, 3, 3))]:
        x = np.ones(x_shape, dtype)
        w = np.ones(w_shape, dtype)
        b = np.array([1.5, -2.0], dtype)
        y = kernels.conv2d_forward(x, w, b, *geometry)
        check(y, ref.conv2d_forward(x, w, b, *geometry), dtype, "C vs numpy conv2d y", f"x {x_shape}")
        dy = np.ones(y.shape, dtype)
        check(kernels.conv2d_backward_input(dy, w, x_shape, *geometry),
              ref.conv2d_backward_input(dy, w, x_shape, *geometry), dtype, "C vs numpy conv2d dx", f"x {x_shape}")
        for got, want in zip(kernels.conv2d_backward_weight(dy, x, w_shape, *geometry, True),
                             ref.conv2d_backward_weight(dy, x, w_shape, *geometry, True)):
            check(got, want, dtype, "C vs numpy conv2d dweight/dbias", f"x {x_shape}")
    x = np.ones((0, 2, 5, 5), dtype)
    y, idx = kernels.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1), False)
    assert y.shape == idx.shape == (0, 2, 2, 2)
    assert kernels.maxpool2d_backward(y, idx, x.shape).shape == x.shape
    y = kernels.avgpool2d_forward(x, (2, 2), (2, 2), (0, 0), False, True, None)
    assert kernels.avgpool2d_backward(y, x.shape, (2, 2), (2, 2), (0, 0), False, True, None).shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("kind", ["normal", "constant", "ints", "infs"])
@pytest.mark.parametrize("case", list(POOL_CASES.values()), ids=list(POOL_CASES))
def test_maxpool2d_kernels(kernels, ref, check, rng, case, kind, dtype):
    x_shape, k, s, p, d, ceil_mode = pool_geometry(case)
    x = pool_input(rng, x_shape, kind, dtype)
    y_c, idx_c = kernels.maxpool2d_forward(x, k, s, p, d, ceil_mode)
    y_r, idx_r = ref.maxpool2d_forward(x, k, s, p, d, ceil_mode)
    assert y_c.dtype == dtype and idx_c.dtype == np.int64
    assert y_c.shape == y_r.shape == idx_c.shape
    np.testing.assert_array_equal(y_c, y_r, err_msg="max values must be exact")
    np.testing.assert_array_equal(idx_c, idx_r, err_msg="argmax: ties go to the first max in row-major order")
    dy = rng.standard_normal(y_r.shape).astype(dtype)
    check(kernels.maxpool2d_backward(dy, idx_r, x_shape), ref.maxpool2d_backward(dy, idx_r, x_shape),
          dtype, "C vs numpy maxpool dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
@pytest.mark.parametrize("shape", [(3, 2, 9, 37), (2, 3, 10, 10), (1, 1, 2, 16), (2, 1, 5, 17), (1, 2, 28, 28),
                                   (1, 2, 4, 8), (2, 1, 6, 13), (1, 1, 4, 18), (1, 1, 2, 33), (1, 1, 2, 40),
                                   (1, 1, 3, 7)])
def test_maxpool2d_2x2_plane_path(kernels, ref, rng, shape, portable, dtype):
    """The whole-plane 2x2 stride-2 path (AVX2 steps of 8 or 4 outputs, the last overlapping, scalar rows
    under 4): exact values and indices on ties, -inf and NaN in every lane position, odd sizes that drop the
    last row/column."""
    previous = kernels.force_portable()
    kernels.force_portable(portable)
    try:
        for kind in ("normal", "constant", "ints", "infs", "nans"):
            x = pool_input(rng, shape, "ints" if kind == "nans" else kind, dtype)
            if kind == "nans":
                x[rng.random(shape) < 0.15] = np.nan
            y_c, idx_c = kernels.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1), False)
            y_r, idx_r = ref.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1), False)
            np.testing.assert_array_equal(y_c, y_r, err_msg=kind)
            if kind == "nans":      # the reference picks the first NaN of a window, the kernels the last
                nan_out = np.isnan(y_r)
                np.testing.assert_array_equal(idx_c[~nan_out], idx_r[~nan_out], err_msg=kind)
                flat = x.reshape(shape[0], shape[1], -1)
                picked = np.take_along_axis(flat, idx_c.reshape(shape[0], shape[1], -1), axis=2)
                assert np.isnan(picked.reshape(idx_c.shape)[nan_out]).all()
            else:
                np.testing.assert_array_equal(idx_c, idx_r, err_msg=kind)
    finally:
        kernels.force_portable(previous)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_maxpool2d_nan_propagates(kernels, ref, rng, dtype):
    x = rng.standard_normal((2, 2, 9, 8)).astype(dtype)
    x[0, 0, 1, 1] = np.nan                 # one NaN: value and index are fixed by it
    x[1, 1, 4:6, 2:4] = np.nan             # several NaNs in one window: the value is NaN, the index a NaN pixel
    for args in [((3, 3), (2, 2), (1, 1), (1, 1), False), ((2, 2), (2, 2), (0, 0), (1, 1), True),
                 ((3, 2), (1, 1), (1, 0), (2, 1), False)]:
        y_c, idx_c = kernels.maxpool2d_forward(x, *args)
        y_r, idx_r = ref.maxpool2d_forward(x, *args)
        np.testing.assert_array_equal(y_c, y_r)          # NaN == NaN for assert_array_equal
        assert np.isnan(y_c).any()
        nan_out = np.isnan(y_r)
        picked = np.take_along_axis(x.reshape(2, 2, -1), idx_c.reshape(2, 2, -1), axis=2).reshape(idx_c.shape)
        assert np.isnan(picked[nan_out]).all(), "a NaN output must point at a NaN input"
        single = np.zeros_like(nan_out)
        single[0, 0] = True
        np.testing.assert_array_equal(idx_c[single], idx_r[single])
        np.testing.assert_array_equal(idx_c[~nan_out], idx_r[~nan_out])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("option", list(AVG_OPTIONS.values()), ids=list(AVG_OPTIONS))
@pytest.mark.parametrize("case", [c for c in POOL_CASES.values() if c[7] == 1],
                         ids=[name for name, c in POOL_CASES.items() if c[7] == 1])
def test_avgpool2d_kernels(kernels, ref, check, rng, case, option, dtype):
    x_shape, k, s, p, _, ceil_mode = pool_geometry(case)
    cip, divisor = option
    x = rng.standard_normal(x_shape).astype(dtype)
    y_r = ref.avgpool2d_forward(x, k, s, p, ceil_mode, cip, divisor)
    check(kernels.avgpool2d_forward(x, k, s, p, ceil_mode, cip, divisor), y_r, dtype, "C vs numpy avgpool y")
    dy = rng.standard_normal(y_r.shape).astype(dtype)
    check(kernels.avgpool2d_backward(dy, x_shape, k, s, p, ceil_mode, cip, divisor),
          ref.avgpool2d_backward(dy, x_shape, k, s, p, ceil_mode, cip, divisor), dtype, "C vs numpy avgpool dx")


def test_avgpool2d_constant_input_is_exact(kernels, ref):
    """Averaging a constant with count_include_pad=False gives the constant, edge windows included."""
    x = np.full((1, 2, 7, 9), 2.5)
    for args in [((3, 3), (2, 2), (1, 1), True, False, None), ((2, 3), (2, 2), (1, 1), True, False, None)]:
        np.testing.assert_array_equal(kernels.avgpool2d_forward(x, *args), np.full_like(
            ref.avgpool2d_forward(x, *args), 2.5))


def test_maxpool2d_window_wholly_in_padding(kernels):
    """H=3, kernel 2, padding 1, dilation 4: each window's two taps (rows -1 and 3) are both padding.
    PyTorch gives -inf with index H*W+w (outside the plane) and its CPU backward then writes out of bounds.
    The C kernels must not: run in a subprocess so memory corruption shows as a failure, not a dead session."""
    code = textwrap.dedent("""
        import numpy as np, cnnx._kernels as K, cnnx.reference as R
        x = np.arange(24.0).reshape(1, 2, 3, 4)
        y, idx = K.maxpool2d_forward(x, (2, 1), (1, 1), (1, 0), (4, 1), False)
        y_r, idx_r = R.maxpool2d_forward(x, (2, 1), (1, 1), (1, 0), (4, 1), False)
        assert np.array_equal(y, y_r) and np.isneginf(y).all(), y
        dx = K.maxpool2d_backward(np.ones_like(y), idx, x.shape)
        assert np.array_equal(dx, np.zeros_like(x)), dx
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def test_maxpool2d_backward_accumulates_overlaps(kernels, ref):
    """Constant input, kernel 3 stride 1: every window picks its first pixel; shared pixels get summed."""
    x = np.ones((1, 1, 4, 4))
    y, idx = kernels.maxpool2d_forward(x, (3, 3), (1, 1), (1, 1), (1, 1), False)
    dx = kernels.maxpool2d_backward(np.ones_like(y), idx, x.shape)
    np.testing.assert_array_equal(dx, ref.maxpool2d_backward(np.ones_like(y), idx, x.shape))
    assert dx.sum() == y.size and dx[0, 0, 0, 0] == 4   # windows at (0,0),(0,1),(1,0),(1,1) all pick (0,0)


# ----------------------------------------------------------------------------------------------------------------
# Public functional API, on both backends, against the reference kernels.
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("name", ["asymmetric_padding", "same_stride2_tf", "groups3_stride",
                                  "depthwise_multiplier2", "dilation_stride", "valid"])
def test_functional_conv2d(backend, ref, check, rng, name, dtype):
    case = CONV_CASES[name]
    n, c, h, w, oc, (kh, kw), stride, padding, dilation, groups = case
    x_shape, w_shape, s, p, d, g = conv_geometry(case)
    x = rng.standard_normal(x_shape).astype(dtype)
    wt = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(oc).astype(dtype)
    kw_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = F.conv2d(x, wt, b, **kw_args)
    assert y.shape == F.conv2d_output_shape(x_shape, w_shape, **kw_args)
    check(y, ref.conv2d_forward(x, wt, b, s, p, d, g), dtype, f"{backend} functional vs numpy kernels")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, dwt, db = F.conv2d_backward(dy, x, wt, b, **kw_args)
    check(dx, ref.conv2d_backward_input(dy, wt, x_shape, s, p, d, g), dtype, f"{backend} functional vs numpy kernels")
    dw_r, db_r = ref.conv2d_backward_weight(dy, x, w_shape, s, p, d, g, True)
    check(dwt, dw_r, dtype, f"{backend} functional vs numpy kernels")
    check(db, db_r, dtype, f"{backend} functional vs numpy kernels")
    assert F.conv2d_backward(dy, x, wt, None, **kw_args)[2] is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_functional_convolve2d_is_flipped_conv2d(backend, check, rng, dtype):
    """True convolution, y[n, o, i, j] = sum x[n, c, i + KH-1 - a, j + KW-1 - b] w[o, c, a, b]: conv2d, w flipped."""
    x = rng.standard_normal((2, 4, 9, 8)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 2)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    args = dict(stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2), groups=2)
    flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1])
    y = F.convolve2d(x, w, b, **args)
    check(y, F.conv2d(x, flipped, b, **args), dtype, f"{backend} convolve2d vs flipped conv2d")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, dw, db = F.convolve2d_backward(dy, x, w, b, **args)
    dx_f, dw_f, db_f = F.conv2d_backward(dy, x, flipped, b, **args)
    check(dx, dx_f, dtype, f"{backend} convolve2d vs flipped conv2d")
    check(dw, dw_f[:, :, ::-1, ::-1], dtype, f"{backend} convolve2d vs flipped conv2d")
    check(db, db_f, dtype, f"{backend} convolve2d vs flipped conv2d")
    # the textbook definition, written out for one 1-channel case
    x1 = rng.standard_normal((1, 1, 4, 5)).astype(dtype)
    w1 = rng.standard_normal((1, 1, 2, 3)).astype(dtype)
    full = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            full[i, j] = sum(x1[0, 0, i + 1 - a, j + 2 - b] * w1[0, 0, a, b] for a in range(2) for b in range(3))
    check(F.convolve2d(x1, w1)[0, 0], full, dtype, f"{backend} convolve2d vs definition")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("name", ["k3_s2_p1", "ceil_mode_drop_last", "dilation_nonsquare_ceil", "k2_default_stride"])
def test_functional_pools(backend, ref, check, rng, name, dtype):
    n, c, h, w, kernel, stride, padding, dilation, ceil_mode = POOL_CASES[name]
    x_shape, k, s, p, d, _ = pool_geometry(POOL_CASES[name])
    x = rng.standard_normal(x_shape).astype(dtype)
    margs = dict(stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    y, idx = F.max_pool2d(x, kernel, return_indices=True, **margs)
    y_r, idx_r = ref.maxpool2d_forward(x, k, s, p, d, ceil_mode)
    np.testing.assert_array_equal(y, y_r)
    np.testing.assert_array_equal(idx, idx_r)
    np.testing.assert_array_equal(F.max_pool2d(x, kernel, **margs), y_r)
    assert y.shape == F.pool2d_output_shape(x_shape, kernel, **margs)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx_r = ref.maxpool2d_backward(dy, idx_r, x_shape)
    check(F.max_pool2d_backward(dy, x, kernel, **margs), dx_r, dtype, f"{backend} functional vs numpy kernels")
    check(F.max_pool2d_backward(dy, x, kernel, indices=idx, **margs), dx_r, dtype,
          f"{backend} functional vs numpy kernels")
    check(F.max_pool2d_backward(dy, x_shape, kernel, indices=idx, **margs), dx_r, dtype,
          f"{backend} functional vs numpy kernels", "x given as its shape")
    if d == (1, 1):
        for cip, divisor in AVG_OPTIONS.values():
            aargs = dict(stride=stride, padding=padding, ceil_mode=ceil_mode, count_include_pad=cip,
                         divisor_override=divisor)
            y = F.avg_pool2d(x, kernel, **aargs)
            check(y, ref.avgpool2d_forward(x, k, s, p, ceil_mode, cip, divisor), dtype,
                  f"{backend} functional vs numpy kernels")
            dx_r = ref.avgpool2d_backward(dy, x_shape, k, s, p, ceil_mode, cip, divisor)
            check(F.avg_pool2d_backward(dy, x, kernel, **aargs), dx_r, dtype, f"{backend} functional vs numpy kernels")
            check(F.avg_pool2d_backward(dy, x_shape, kernel, **aargs), dx_r, dtype,
                  f"{backend} functional vs numpy kernels", "x given as its shape")


def _layouts(a):
    """The same values as `a` in layouts the kernels cannot read directly."""
    fortran = np.asfortranarray(a)
    reversed_storage = np.ascontiguousarray(a[..., ::-1])[..., ::-1]          # negative last stride
    strided = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)[..., ::2]  # every other element
    strided[...] = a
    channels_last = np.ascontiguousarray(np.moveaxis(a, 1, -1))
    transposed = np.moveaxis(channels_last, -1, 1)                          # NHWC storage seen as NCHW
    out = {"fortran": fortran, "negative_stride": reversed_storage, "step2": strided, "nhwc_view": transposed}
    for name, v in out.items():
        assert not v.flags.c_contiguous or v.ndim < 2 or v.shape[-1] == 1, name
        np.testing.assert_array_equal(v, a)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("layout", ["fortran", "negative_stride", "step2", "nhwc_view"])
def test_functional_noncontiguous_inputs(backend, rng, layout, dtype):
    """Any layout of the same values gives bit-for-bit the contiguous result, never garbage."""
    x = rng.standard_normal((2, 4, 7, 6)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 2)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    args = dict(stride=(2, 1), padding=1, groups=2)
    y = F.conv2d(x, w, b, **args)
    dy = rng.standard_normal(y.shape).astype(dtype)
    grads = F.conv2d_backward(dy, x, w, b, **args)
    xl, wl, dyl = _layouts(x)[layout], _layouts(w)[layout], _layouts(dy)[layout]
    bl = b[::-1].copy()[::-1] if layout == "negative_stride" else b
    np.testing.assert_array_equal(F.conv2d(xl, wl, bl, **args), y)
    for got, want in zip(F.conv2d_backward(dyl, xl, wl, bl, **args), grads):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(F.convolve2d(xl, wl, bl, **args), F.convolve2d(x, w, b, **args))

    ym, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    ym_l, idx_l = F.max_pool2d(xl, 3, 2, 1, return_indices=True)
    np.testing.assert_array_equal(ym_l, ym)
    np.testing.assert_array_equal(idx_l, idx)
    dym = rng.standard_normal(ym.shape).astype(dtype)
    dym_l = _layouts(dym)[layout]
    np.testing.assert_array_equal(F.max_pool2d_backward(dym_l, xl, 3, 2, 1), F.max_pool2d_backward(dym, x, 3, 2, 1))
    np.testing.assert_array_equal(F.max_pool2d_backward(dym_l, xl, 3, 2, 1, indices=_layouts(idx)[layout]),
                                  F.max_pool2d_backward(dym, x, 3, 2, 1))
    np.testing.assert_array_equal(F.avg_pool2d(xl, 3, 2, 1), F.avg_pool2d(x, 3, 2, 1))
    np.testing.assert_array_equal(F.avg_pool2d_backward(dym_l, xl, 3, 2, 1), F.avg_pool2d_backward(dym, x, 3, 2, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_functional_dtype_in_is_dtype_out(backend, rng, dtype):
    x = rng.standard_normal((1, 2, 6, 5)).astype(dtype)
    w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
    b = np.zeros(3, dtype)
    y = F.conv2d(x, w, b, padding="same")
    assert y.dtype == dtype and y.shape == (1, 3, 6, 5)
    assert all(g.dtype == dtype for g in F.conv2d_backward(y, x, w, b, padding="same"))
    assert F.max_pool2d(x, 2).dtype == dtype and F.avg_pool2d(x, 2).dtype == dtype
    assert F.max_pool2d(x, 2, return_indices=True)[1].dtype == np.int64
    # array-likes (nested lists of Python floats) are float64
    assert F.conv2d(x.tolist(), w.tolist()).dtype == np.float64


def test_backends_agree_on_public_api(kernels, rng):
    """A user's own check: the same call under cnnx.backend('c') and cnnx.backend('numpy')."""
    x = rng.standard_normal((3, 3, 12, 11))
    w = rng.standard_normal((4, 3, 3, 3))
    out = {}
    for name in ("c", "numpy"):
        with cnnx.backend(name):
            assert cnnx.get_backend() == name
            out[name] = F.conv2d(x, w, stride=2, padding="same")
    np.testing.assert_allclose(out["c"], out["numpy"], rtol=1e-12, atol=1e-12)


# (H, W, (KH, KW), stride, dilation) -> (top, bottom, left, right), worked out by hand from TensorFlow's rule:
# out = ceil(in / s); total = max((out - 1)*s + d*(k - 1) + 1 - in, 0); top = total // 2, bottom = the rest.
SAME_PADDING = [
    ((9, 10), (3, 3), 2, 1, (1, 1, 0, 1)),      # H: out 5, total 2; W: out 5, total 1 -> extra on the right
    ((10, 7), (4, 2), 2, 1, (1, 1, 0, 1)),      # H: out 5, total 2; W: out 4, total 1
    ((8, 8), (4, 4), 1, 1, (1, 2, 1, 2)),       # stride 1, even kernel: extra bottom/right (= PyTorch)
    ((7, 9), (3, 2), 3, 2, (2, 2, 0, 0)),       # H: out 3, dilated kernel 5, total 4; W: out 3, total 0
    ((5, 5), (1, 1), 2, 1, (0, 0, 0, 0)),       # 1x1 never pads
    ((6, 6), (5, 5), 4, 1, (1, 2, 1, 2)),       # H: out 2, total 3
]


@pytest.mark.parametrize("h_w, k, s, d, pads", SAME_PADDING, ids=[str(c[:4]) for c in SAME_PADDING])
def test_same_padding_follows_tensorflow(backend, ref, check, rng, h_w, k, s, d, pads):
    x = rng.standard_normal((1, 2) + h_w)
    w = rng.standard_normal((3, 2) + k)
    y = F.conv2d(x, w, stride=s, padding="same", dilation=d)
    assert y.shape[2:] == (-(-h_w[0] // s), -(-h_w[1] // s))
    check(y, ref.conv2d_forward(x, w, None, (s, s), pads, (d, d), 1), np.float64,
          f"{backend} functional vs numpy kernels", "same padding")
