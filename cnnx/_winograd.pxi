# ---------------------------------------------------------------- 3x3 convolution by Winograd F(4x4, 3x3)
# Included by _kernels.pyx. Same arguments as conv2d_forward / conv2d_backward_input / conv2d_backward_weight
# for the geometry winograd_applies accepts (3x3, stride 1, dilation 1, one group, padding 0..2 a side).

def winograd_applies(weight_shape, stride, padding, dilation, groups):
    """True when the Winograd kernels take this (normalised) geometry: 3x3 kernels, stride 1, dilation 1,
    one group, padding between 0 and 2 on every side."""
    return (tuple(weight_shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and all(0 <= p <= 2 for p in padding))


cdef _wino_geometry(tuple xs, tuple ws, padding, str fn):
    if not winograd_applies(ws, (1, 1), padding, (1, 1), 1):
        raise ValueError(f"{fn}: the Winograd kernels take 3x3 weights and padding 0..2 a side, got weight "
                         f"shape {ws}, padding {tuple(padding)}")
    return _conv_geometry(xs, ws, (1, 1), tuple(padding), (1, 1), 1, fn)


cdef int _wino_fwd(floating[:, :, :, ::1] y, const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
                   const floating *b, const cnnx_conv2d_geom *g):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = conv2d_winograd_forward_f32(&y[0, 0, 0, 0], &x[0, 0, 0, 0], &w[0, 0, 0, 0], b, g)
        else:
            code = conv2d_winograd_forward_f64(&y[0, 0, 0, 0], &x[0, 0, 0, 0], &w[0, 0, 0, 0], b, g)
        cnnx_fpenv_leave()
    return code


def conv2d_winograd_forward(x, weight, bias, padding):
    """conv2d_forward(x, weight, bias, (1, 1), padding, (1, 1), 1) by Winograd F(4x4, 3x3)."""
    fn = "conv2d_winograd_forward"
    _check(x, "x", fn, 4)
    _check(weight, "weight", fn, 4, x.dtype)
    oh, ow = _wino_geometry(x.shape, weight.shape, padding, fn)
    if bias is not None:
        _check(bias, "bias", fn, 1, x.dtype)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) (out_channels), got {bias.shape}")
    _shape4((x.shape[0], weight.shape[0], oh, ow), "output shape", fn)
    y = np.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype)
    if y.size == 0:
        return y
    cdef int code
    cdef cnnx_conv2d_geom g = _conv_geom(x.shape, weight.shape, (1, 1), tuple(padding), (1, 1), 1, oh, ow)
    cdef const float[::1] b32
    cdef const double[::1] b64
    if x.dtype == np.float32:
        b32 = bias if bias is not None else None
        code = _wino_fwd[float](y, x, weight, &b32[0] if b32 is not None else NULL, &g)
    else:
        b64 = bias if bias is not None else None
        code = _wino_fwd[double](y, x, weight, &b64[0] if b64 is not None else NULL, &g)
    _status(code, fn)
    return y


cdef int _wino_bwd_input(floating[:, :, :, ::1] dx, const floating[:, :, :, ::1] dy,
                         const floating[:, :, :, ::1] w, const cnnx_conv2d_geom *g):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = conv2d_winograd_backward_input_f32(&dx[0, 0, 0, 0], &dy[0, 0, 0, 0], &w[0, 0, 0, 0], g)
        else:
            code = conv2d_winograd_backward_input_f64(&dx[0, 0, 0, 0], &dy[0, 0, 0, 0], &w[0, 0, 0, 0], g)
        cnnx_fpenv_leave()
    return code


def conv2d_winograd_backward_input(dy, weight, x_shape, padding):
    """conv2d_backward_input(dy, weight, x_shape, (1, 1), padding, (1, 1), 1) by Winograd F(4x4, 3x3)."""
    fn = "conv2d_winograd_backward_input"
    _check(dy, "dy", fn, 4)
    _check(weight, "weight", fn, 4, dy.dtype)
    xs = _shape4(x_shape, "x_shape", fn)
    oh, ow = _wino_geometry(xs, weight.shape, padding, fn)
    expected = (xs[0], weight.shape[0], oh, ow)
    if dy.shape != expected:
        raise ValueError(f"{fn}: dy must have the output shape {expected}, got {dy.shape}")
    dx = np.empty(xs, dtype=dy.dtype)
    if dx.size == 0:
        return dx
    if dy.size == 0:
        dx.fill(0)
        return dx
    cdef int code
    cdef cnnx_conv2d_geom g = _conv_geom(xs, weight.shape, (1, 1), tuple(padding), (1, 1), 1, oh, ow)
    if dy.dtype == np.float32:
        code = _wino_bwd_input[float](dx, dy, weight, &g)
    else:
        code = _wino_bwd_input[double](dx, dy, weight, &g)
    _status(code, fn)
    return dx


cdef int _wino_bwd_weight(floating[:, :, :, ::1] dw, floating *db, const floating[:, :, :, ::1] dy,
                          const floating[:, :, :, ::1] x, const cnnx_conv2d_geom *g):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = conv2d_winograd_backward_weight_f32(&dw[0, 0, 0, 0], db, &dy[0, 0, 0, 0], &x[0, 0, 0, 0], g)
        else:
            code = conv2d_winograd_backward_weight_f64(&dw[0, 0, 0, 0], db, &dy[0, 0, 0, 0], &x[0, 0, 0, 0], g)
        cnnx_fpenv_leave()
    return code


def conv2d_winograd_backward_weight(dy, x, weight_shape, padding, with_bias):
    """conv2d_backward_weight(dy, x, weight_shape, (1, 1), padding, (1, 1), 1, with_bias) by Winograd."""
    fn = "conv2d_winograd_backward_weight"
    _check(dy, "dy", fn, 4)
    _check(x, "x", fn, 4, dy.dtype)
    ws = _shape4(weight_shape, "weight_shape", fn)
    oh, ow = _wino_geometry(x.shape, ws, padding, fn)
    expected = (x.shape[0], ws[0], oh, ow)
    if dy.shape != expected:
        raise ValueError(f"{fn}: dy must have the output shape {expected}, got {dy.shape}")
    dw = np.empty(ws, dtype=dy.dtype)
    db = np.empty((ws[0],), dtype=dy.dtype) if with_bias else None
    if dw.size == 0 or dy.size == 0:
        dw.fill(0)
        if db is not None:
            db[...] = dy.sum(axis=(0, 2, 3))
        return dw, db
    cdef int code
    cdef cnnx_conv2d_geom g = _conv_geom(x.shape, ws, (1, 1), tuple(padding), (1, 1), 1, oh, ow)
    cdef float[::1] db32
    cdef double[::1] db64
    if dy.dtype == np.float32:
        db32 = db
        code = _wino_bwd_weight[float](dw, &db32[0] if db32 is not None else NULL, dy, x, &g)
    else:
        db64 = db
        code = _wino_bwd_weight[double](dw, &db64[0] if db64 is not None else NULL, dy, x, &g)
    _status(code, fn)
    return dw, db
