# Included by _kernels.pyx: the executor of Sequential's compiled plan.
#
# A Sequential of Conv2d / ReLU / MaxPool2d / Flatten / Linear / Identity / Residual / BatchNorm2d /
# AdaptiveAvgPool2d(1) / Sequential (and Dropout in eval mode) run layer by layer costs a Python call, argument
# checks, an output allocation and a cache update per layer: about 6 us each, 80 us for a batch-1 LeNet-5 forward
# whose arithmetic takes 20 us. A plan does the checks once per (input shape, dtype), keeps every activation and
# gradient buffer, and runs the whole graph of C kernels in one call without the GIL.
#
# cnnx/_planner.py (pure Python) lowers the Sequential to a graph: ops over buffer ids, fused by its FUSIONS
# table. Here each op kind has one forward and one backward entry point (the _fw_* / _bw_* functions, in the
# tables _FWD / _BWD filled at the end of this file), and compile_plan allocates the buffers and turns the
# graph into C structs. The fused kinds: conv_relu and linear_relu apply the ReLU in place to their output (the
# layer's backward does not need its output, so nothing is lost); relu_pool pools relu(x) as it reads
# (maxpool2x2_relu_forward) and writes dx masked by the pooled output in its backward; conv_relu_pool runs the
# pooling inside the convolution (conv2d_relu_maxpool2x2_forward: each image pooled from a small per-thread buffer
# while it is in cache, the convolution's output never written) and sums its weight gradient and its input
# gradient over the pool's winners only (conv2d_pooled_backward_weight, conv2d_pooled_backward_input: a quarter
# of the dense kernels' multiply-adds, fewer where the ReLU is closed). Such pools keep each winner's place in its
# 2x2 window (a byte).
# conv_bn and conv_bn_relu fold an eval-mode batch norm into the convolution's weights and bias at each call.
# batchnorm_train (a batch norm with batch statistics: training, or eval without running statistics) runs the
# layer's own kernels (batchnorm_forward / batchnorm_backward) and, as the layer does, counts num_batches_tracked
# and updates the running statistics in place; batchnorm_train_relu gives those kernels the ReLU after it (relu=1
# in the forward's normalising pass, y= in the backward's sums). The convolution before it stays its own op: its
# output must be whole before the statistics exist. batchnorm_train_relu_pool adds a 2x2 max pool as relu_pool
# runs it, on the batch norm's output (mid). add_relu is a residual's add with the ReLU after it.
#
# The results are the layers' own, bit for bit: the same kernels in the same order on the same values, except
# conv_relu_pool's weight, bias and input gradients (the same sums in another order, a quarter of the work), and
# so every gradient its input gradient reaches, and the folded batch norms (to rounding). Sequential
# decides when a plan applies (cnnx/nn/module.py); anything unusual (another layer type, a hook, an input that is
# not a C-contiguous array of the parameters' dtype, a parameter array replaced by something unusual) falls back
# to the layer-by-layer path, which raises the usual errors.

from libc.math cimport sqrt
from libc.string cimport memcpy

cdef enum:
    _K_CONV
    _K_CONV_RELU
    _K_CONV_RELU_POOL
    _K_CONV_BN
    _K_CONV_BN_RELU
    _K_LINEAR
    _K_LINEAR_RELU
    _K_MAXPOOL
    _K_RELU
    _K_RELU_POOL
    _K_ADD
    _K_BN_TRAIN
    _K_BN_TRAIN_RELU
    _K_ADD_RELU
    _K_GLOBAL_AVGPOOL
    _K_BN_TRAIN_RELU_POOL
    _NKINDS

_KINDS = {}         # name in the graph -> kind (_register, at the end of this file)


cdef struct _Op:
    int kind
    int nin                 # inputs (1, or 2 for add)
    int inp[2]              # input buffer ids
    int out                 # output buffer id
    int acc[2]              # per input: its gradient is added to the buffer's (another reader wrote it first)
    int64_t n_in[2]         # elements of each input
    int64_t n_out           # elements of the output
    int wslot, bslot        # parameter slots (-1: none)
    cnnx_conv2d_geom conv   # conv kinds
    cnnx_pool2d_geom pool   # pool kinds
    int64_t rows, in_f, out_f   # linear kinds: x (rows, in_f), y (rows, out_f)
    char *aux               # maxpool: int64 indices; relu_pool, conv_relu_pool, batchnorm_train_relu_pool: uint8
    #                         window positions
    char *mid               # conv_relu_pool: the convolution's own output (written only when it cannot pool per
    #                         image); batchnorm_train_relu_pool: the batch norm's output, then (backward) its gradient
    char *dmid              # conv_relu_pool: mid's gradient
    int gslot, betaslot     # conv_bn kinds: the batch norm's weight (gamma) and bias (beta) slots (-1: none)
    double eps              # conv_bn kinds: the batch norm's eps, running mean and variance (OC each)
    char *bn_mean
    char *bn_var
    char *fold              # conv_bn kinds: per call, scale (OC) | folded bias (OC) | sum of dy (OC) | folded w
    int64_t bn_n, bn_c, bn_l    # batchnorm_train kinds: x and y viewed as (N, C, L = H*W)
    double momentum         # batchnorm_train kinds: the layer's momentum (cumulative: 1 / num_batches_tracked)
    int cumulative          #   (momentum=None)
    int64_t *count          # batchnorm_train kinds: num_batches_tracked, counted in place (NULL: not tracked; then
    #                         bn_mean, bn_var are NULL too and nothing is updated)
    char *saved             # batchnorm_train kinds: the forward's save_mean (C) | save_invstd (C)
    int64_t planes, plane   # global_avgpool: x is (planes = N*C, plane = H*W), y (planes,)


cdef struct _Exec:
    char **val              # per buffer id: its data (val[0]: the caller's input)
    char **grad             # per buffer id: its gradient (grad[0]: the new dx, or NULL when not wanted)
    char *tmp               # an input gradient that is then added to its buffer's
    char **wptr             # per parameter slot: the parameter's data
    int64_t *gmode          # per slot, set by each backward: 0 frozen, 1 add into grad in C (gptr),
    char **gptr             #   2 through the scratch + Parameter.accumulate_grad
    char **sptr             # per slot: its scratch array (ssize elements)
    int64_t *ssize


cdef inline char *_data_ptr(a):
    return <char *>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef bint _usable(a, int typenum, tuple shape, bint writable):
    """a is an ndarray the kernels can use directly: exact dtype (typenum, native byte order) and shape,
    C-contiguous, aligned (and writable if asked). All in C, without building a.shape or a.dtype: a plan call
    checks its input and every parameter (and, in backward, every gradient) this way."""
    if not _plain(a, typenum, writable):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int k, nd = cnp.PyArray_NDIM(arr)
    if nd != len(shape):
        return False
    for k in range(nd):
        if cnp.PyArray_DIM(arr, k) != <cnp.npy_intp>shape[k]:
            return False
    return True


# ---------------------------------------------------------------- elementwise pieces

cdef inline void _relu(floating *y, const floating *x, int64_t n) noexcept nogil:
    # y = numpy's maximum(x, 0): x where x > 0 or NaN, else +0 (also for -0.0)
    cdef int64_t i
    for i in range(n):
        y[i] = x[i] if (x[i] > 0 or x[i] != x[i]) else 0


cdef inline void _relu_back(floating *dx, const floating *dy, const floating *y, int64_t n) noexcept nogil:
    # dx = dy * (y > 0), as ReLU.backward (a multiply, so inf * 0 gives NaN there too)
    cdef int64_t i
    for i in range(n):
        dx[i] = dy[i] * (<floating>1 if y[i] > 0 else <floating>0)


cdef inline void _add_into(floating *dst, const floating *src, int64_t n) noexcept nogil:
    cdef int64_t i
    for i in range(n):
        dst[i] += src[i]


cdef inline char *_dx(const _Op *op, const _Exec *ex, int i) noexcept nogil:
    """Where input i's gradient is written: its buffer's gradient, or the scratch when it is added to it
    (_dx_done); NULL when it is not wanted."""
    cdef char *g = ex.grad[op.inp[i]]
    if g == NULL or not op.acc[i]:
        return g
    return ex.tmp


cdef inline void _dx_done(const _Op *op, const _Exec *ex, int i, floating *dx) noexcept nogil:
    if dx != NULL and op.acc[i]:
        _add_into(<floating *>ex.grad[op.inp[i]], dx, op.n_in[i])


cdef inline void _collect(const _Exec *ex, int slot, floating *scratch) noexcept nogil:
    """A parameter gradient computed into its slot's scratch, added into .grad in C when it takes it (mode 1)."""
    if slot >= 0 and ex.gmode[slot] == 1:
        _add_into(<floating *>ex.gptr[slot], scratch, ex.ssize[slot])


cdef inline bint _wants(const _Exec *ex, int slot) noexcept nogil:
    return slot >= 0 and ex.gmode[slot] != 0


cdef inline floating *_scratch(const _Exec *ex, int slot, floating *tag) noexcept nogil:
    return <floating *>ex.sptr[slot] if slot >= 0 else NULL


# ---------------------------------------------------------------- forward entry points, one per kind
# (op, exec, x: the first input, y: the output) -> a C status code

cdef int _fw_conv(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    cdef const floating *w = <const floating *>ex.wptr[op.wslot]
    cdef const floating *b = <const floating *>ex.wptr[op.bslot] if op.bslot >= 0 else NULL
    if floating is float:
        return conv2d_forward_f32(y, x, w, b, &op.conv)
    else:
        return conv2d_forward_f64(y, x, w, b, &op.conv)


cdef int _fw_conv_relu(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    cdef int code = _fw_conv(op, ex, x, y)
    if code == 0:
        _relu(y, y, op.n_out)
    return code


cdef int _fw_conv_relu_pool(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    cdef const floating *w = <const floating *>ex.wptr[op.wslot]
    cdef const floating *b = <const floating *>ex.wptr[op.bslot] if op.bslot >= 0 else NULL
    if floating is float:
        return conv2d_relu_maxpool2x2_forward_f32(y, <uint8_t *>op.aux, <float *>op.mid, x, w, b, &op.conv, &op.pool)
    else:
        return conv2d_relu_maxpool2x2_forward_f64(y, <uint8_t *>op.aux, <double *>op.mid, x, w, b, &op.conv,
                                                  &op.pool)


cdef void _bn_fold(const _Op *op, const _Exec *ex, floating *fold) noexcept nogil:
    # eval-mode batch norm after the convolution, z -> (z - mean) * s + beta with s = gamma / sqrt(var + eps), as
    # one convolution: w' = w * s (per output channel), b' = (b - mean) * s + beta; the statistics and parameters
    # as they are now (the running statistics may have changed in place since the plan was built)
    cdef int64_t OC = op.conv.OC, K = op.conv.C / op.conv.G * op.conv.KH * op.conv.KW, o, k
    cdef const floating *w = <const floating *>ex.wptr[op.wslot]
    cdef const floating *b = <const floating *>ex.wptr[op.bslot] if op.bslot >= 0 else NULL
    cdef const floating *gamma = <const floating *>ex.wptr[op.gslot] if op.gslot >= 0 else NULL
    cdef const floating *beta = <const floating *>ex.wptr[op.betaslot] if op.betaslot >= 0 else NULL
    cdef const floating *mean = <const floating *>op.bn_mean
    cdef const floating *var = <const floating *>op.bn_var
    cdef floating *scale = fold
    cdef floating *bias = fold + OC
    cdef floating *wf = fold + 3 * OC
    cdef floating s
    for o in range(OC):
        s = <floating>1 / <floating>sqrt(var[o] + <floating>op.eps)
        if gamma != NULL:
            s = s * gamma[o]
        scale[o] = s
        bias[o] = ((b[o] if b != NULL else 0) - mean[o]) * s + (beta[o] if beta != NULL else 0)
        for k in range(K):
            wf[o * K + k] = w[o * K + k] * s


cdef int _fw_conv_bn(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    cdef floating *fold = <floating *>op.fold
    cdef int64_t OC = op.conv.OC
    _bn_fold(op, ex, fold)
    if floating is float:
        return conv2d_forward_f32(y, x, fold + 3 * OC, fold + OC, &op.conv)
    else:
        return conv2d_forward_f64(y, x, fold + 3 * OC, fold + OC, &op.conv)


cdef int _fw_conv_bn_relu(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    cdef int code = _fw_conv_bn(op, ex, x, y)
    if code == 0:
        _relu(y, y, op.n_out)
    return code


cdef int _fw_linear(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    cdef const floating *w = <const floating *>ex.wptr[op.wslot]
    cdef const floating *b = <const floating *>ex.wptr[op.bslot] if op.bslot >= 0 else NULL
    if floating is float:
        return linear_forward_f32(y, x, w, b, op.rows, op.in_f, op.out_f)
    else:
        return linear_forward_f64(y, x, w, b, op.rows, op.in_f, op.out_f)


cdef int _fw_linear_relu(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    cdef int code = _fw_linear(op, ex, x, y)
    if code == 0:
        _relu(y, y, op.n_out)
    return code


cdef int _fw_maxpool(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    if floating is float:
        return maxpool2d_forward_f32(y, <int64_t *>op.aux, x, &op.pool)
    else:
        return maxpool2d_forward_f64(y, <int64_t *>op.aux, x, &op.pool)


cdef int _fw_relu(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    _relu(y, x, op.n_out)
    return 0


cdef int _fw_relu_pool(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    if floating is float:
        return maxpool2x2_relu_forward_f32(y, <uint8_t *>op.aux, x, &op.pool)
    else:
        return maxpool2x2_relu_forward_f64(y, <uint8_t *>op.aux, x, &op.pool)


cdef int _fw_add(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    cdef const floating *x2 = <const floating *>ex.val[op.inp[1]]
    cdef int64_t i
    for i in range(op.n_out):
        y[i] = x[i] + x2[i]
    return 0


cdef int _fw_add_relu(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    # relu(x1 + x2) in one pass: each sum rounded to floating, then numpy's maximum(., 0), as _relu
    cdef const floating *x2 = <const floating *>ex.val[op.inp[1]]
    cdef floating v
    cdef int64_t i
    for i in range(op.n_out):
        v = x[i] + x2[i]
        y[i] = v if (v > 0 or v != v) else 0
    return 0


cdef int _fw_global_avgpool(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    if floating is float:
        return global_avgpool2d_forward_f32(y, x, op.planes, op.plane)
    else:
        return global_avgpool2d_forward_f64(y, x, op.planes, op.plane)


cdef int _bn_train_forward(const _Op *op, const _Exec *ex, const floating *x, floating *y, int relu) noexcept nogil:
    # BatchNorm2d.forward with batch statistics: num_batches_tracked counted first, then the same kernel with
    # momentum, or 1 / num_batches_tracked for momentum=None, updating the running statistics in place (neither
    # when they are not tracked: count NULL); relu: max(y, 0) in the normalising pass (the ReLU layer's bits)
    cdef const floating *w = <const floating *>ex.wptr[op.wslot] if op.wslot >= 0 else NULL
    cdef const floating *b = <const floating *>ex.wptr[op.bslot] if op.bslot >= 0 else NULL
    cdef floating *mean = <floating *>op.saved
    cdef double factor = 0.0
    if op.count != NULL:
        op.count[0] += 1
        factor = 1.0 / <double>op.count[0] if op.cumulative else op.momentum
    if floating is float:
        return batchnorm_forward_f32(y, mean, mean + op.bn_c, <float *>op.bn_mean, <float *>op.bn_var, x, w, b,
                                     op.bn_n, op.bn_c, op.bn_l, op.eps, factor, relu)
    else:
        return batchnorm_forward_f64(y, mean, mean + op.bn_c, <double *>op.bn_mean, <double *>op.bn_var, x, w, b,
                                     op.bn_n, op.bn_c, op.bn_l, op.eps, factor, relu)


cdef int _fw_bn_train(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    return _bn_train_forward(op, ex, x, y, 0)


cdef int _fw_bn_train_relu(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    return _bn_train_forward(op, ex, x, y, 1)


cdef int _fw_bn_train_relu_pool(const _Op *op, const _Exec *ex, const floating *x, floating *y) noexcept nogil:
    # the batch norm into mid, then relu_pool's kernel pools relu(mid) (ReLU -> MaxPool2d(2)'s bits) and keeps
    # each winner's place (a byte) instead of the pool's int64 index
    cdef floating *mid = <floating *>op.mid
    cdef int code = _bn_train_forward(op, ex, x, mid, 0)
    if code:
        return code
    if floating is float:
        return maxpool2x2_relu_forward_f32(y, <uint8_t *>op.aux, mid, &op.pool)
    else:
        return maxpool2x2_relu_forward_f64(y, <uint8_t *>op.aux, mid, &op.pool)


# ---------------------------------------------------------------- backward entry points, one per kind
# (op, exec, dy: the output's gradient, complete) -> a C status code. Parameter gradients go through the slots'
# scratch (_collect); each input's gradient is written where _dx says.

cdef int _conv_input_grad(const _Op *op, const _Exec *ex, const floating *dy) noexcept nogil:
    cdef floating *dx = <floating *>_dx(op, ex, 0)
    cdef const floating *w = <const floating *>ex.wptr[op.wslot]
    cdef int code = 0
    if dx == NULL:
        return 0
    if floating is float:
        code = conv2d_backward_input_f32(dx, dy, w, &op.conv)
    else:
        code = conv2d_backward_input_f64(dx, dy, w, &op.conv)
    if code == 0:
        _dx_done(op, ex, 0, dx)
    return code


cdef int _bw_conv(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    cdef const floating *x = <const floating *>ex.val[op.inp[0]]
    cdef floating *sw
    cdef floating *sb
    cdef int code = 0
    if _wants(ex, op.wslot) or _wants(ex, op.bslot):
        sw, sb = _scratch(ex, op.wslot, dy), _scratch(ex, op.bslot, dy)
        if floating is float:
            code = conv2d_backward_weight_f32(sw, sb, dy, x, &op.conv)
        else:
            code = conv2d_backward_weight_f64(sw, sb, dy, x, &op.conv)
        if code:
            return code
        _collect(ex, op.wslot, sw)
        _collect(ex, op.bslot, sb)
    return _conv_input_grad(op, ex, dy)


cdef int _bw_conv_relu(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    _relu_back(dy, dy, <const floating *>ex.val[op.out], op.n_out)
    return _bw_conv(op, ex, dy)


cdef int _bw_conv_relu_pool(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    # The weight gradient and dx from the pooled gradient directly, each over the pool's winners only; the
    # convolution's output gradient (dmid) is written only where a kernel cannot take that shortcut.
    cdef const floating *x = <const floating *>ex.val[op.inp[0]]
    cdef const floating *yp = <const floating *>ex.val[op.out]
    cdef const floating *w = <const floating *>ex.wptr[op.wslot]
    cdef floating *dmid = <floating *>op.dmid
    cdef floating *dx = <floating *>_dx(op, ex, 0)
    cdef floating *sw
    cdef floating *sb
    cdef int code = 0
    if _wants(ex, op.wslot) or _wants(ex, op.bslot):
        sw, sb = _scratch(ex, op.wslot, dy), _scratch(ex, op.bslot, dy)
        if floating is float:
            code = conv2d_pooled_backward_weight_f32(sw, sb, dmid, dy, <uint8_t *>op.aux, yp, x, &op.conv, &op.pool,
                                                     0)
        else:
            code = conv2d_pooled_backward_weight_f64(sw, sb, dmid, dy, <uint8_t *>op.aux, yp, x, &op.conv, &op.pool,
                                                     0)
        if code:
            return code
        _collect(ex, op.wslot, sw)
        _collect(ex, op.bslot, sb)
    if dx == NULL:
        return 0
    if floating is float:
        code = conv2d_pooled_backward_input_f32(dx, dmid, dy, <uint8_t *>op.aux, yp, w, &op.conv, &op.pool)
    else:
        code = conv2d_pooled_backward_input_f64(dx, dmid, dy, <uint8_t *>op.aux, yp, w, &op.conv, &op.pool)
    if code == 0:
        _dx_done(op, ex, 0, dx)
    return code


cdef int _bw_conv_bn(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    # With z the convolution's output (never formed): G = conv2d_backward_weight(dy, x) and sum(dy) per channel
    # give dw = s * G, db = s * sum(dy), dbeta = sum(dy) and, as sum(dy * z) = <w, G> + b * sum(dy),
    # dgamma = sum(dy * (z - mean)) / sqrt(var + eps); dx through the folded weights. The same sums as the
    # layers' to rounding.
    cdef int64_t OC = op.conv.OC, K = op.conv.C / op.conv.G * op.conv.KH * op.conv.KW, o, k
    cdef const floating *x = <const floating *>ex.val[op.inp[0]]
    cdef const floating *w = <const floating *>ex.wptr[op.wslot]
    cdef const floating *b = <const floating *>ex.wptr[op.bslot] if op.bslot >= 0 else NULL
    cdef const floating *mean = <const floating *>op.bn_mean
    cdef const floating *var = <const floating *>op.bn_var
    cdef floating *fold = <floating *>op.fold
    cdef floating *scale = fold
    cdef floating *sdy = fold + 2 * OC
    cdef floating *gw = <floating *>ex.sptr[op.wslot]
    cdef floating *t
    cdef floating acc
    cdef int code = 0
    if _wants(ex, op.wslot) or _wants(ex, op.bslot) or _wants(ex, op.gslot) or _wants(ex, op.betaslot):
        if floating is float:
            code = conv2d_backward_weight_f32(gw, sdy, dy, x, &op.conv)
        else:
            code = conv2d_backward_weight_f64(gw, sdy, dy, x, &op.conv)
        if code:
            return code
        if op.gslot >= 0:
            t = <floating *>ex.sptr[op.gslot]
            for o in range(OC):
                acc = ((b[o] if b != NULL else 0) - mean[o]) * sdy[o]
                for k in range(K):
                    acc += w[o * K + k] * gw[o * K + k]
                t[o] = acc / <floating>sqrt(var[o] + <floating>op.eps)
            _collect(ex, op.gslot, t)
        if op.betaslot >= 0:
            t = <floating *>ex.sptr[op.betaslot]
            for o in range(OC):
                t[o] = sdy[o]
            _collect(ex, op.betaslot, t)
        for o in range(OC):
            for k in range(K):
                gw[o * K + k] *= scale[o]
        _collect(ex, op.wslot, gw)
        if op.bslot >= 0:
            t = <floating *>ex.sptr[op.bslot]
            for o in range(OC):
                t[o] = scale[o] * sdy[o]
            _collect(ex, op.bslot, t)
    cdef floating *dx = <floating *>_dx(op, ex, 0)
    if dx == NULL:
        return 0
    if floating is float:
        code = conv2d_backward_input_f32(dx, dy, fold + 3 * OC, &op.conv)
    else:
        code = conv2d_backward_input_f64(dx, dy, fold + 3 * OC, &op.conv)
    if code == 0:
        _dx_done(op, ex, 0, dx)
    return code


cdef int _bw_conv_bn_relu(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    _relu_back(dy, dy, <const floating *>ex.val[op.out], op.n_out)
    return _bw_conv_bn(op, ex, dy)


cdef int _bw_linear(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    # the parameter gradients straight into the .grad arrays when they take them (as Linear.backward does)
    cdef const floating *x = <const floating *>ex.val[op.inp[0]]
    cdef const floating *w = <const floating *>ex.wptr[op.wslot]
    cdef int ws = op.wslot, bs = op.bslot, code = 0
    cdef bint need_b = _wants(ex, bs)
    cdef floating *gw
    cdef floating *gb
    cdef floating *dx
    if _wants(ex, ws) or need_b:
        if ex.gmode[ws] == 1 and (bs < 0 or ex.gmode[bs] != 2):
            gw, gb = <floating *>ex.gptr[ws], <floating *>ex.gptr[bs] if need_b else NULL
            if floating is float:
                code = linear_backward_weight_f32(gw, gb, dy, x, op.rows, op.in_f, op.out_f, 1)
            else:
                code = linear_backward_weight_f64(gw, gb, dy, x, op.rows, op.in_f, op.out_f, 1)
        else:
            gw, gb = _scratch(ex, ws, dy), _scratch(ex, bs, dy)
            if floating is float:
                code = linear_backward_weight_f32(gw, gb, dy, x, op.rows, op.in_f, op.out_f, 0)
            else:
                code = linear_backward_weight_f64(gw, gb, dy, x, op.rows, op.in_f, op.out_f, 0)
            if code == 0:
                _collect(ex, ws, gw)
                _collect(ex, bs, gb)
        if code:
            return code
    dx = <floating *>_dx(op, ex, 0)
    if dx == NULL:
        return 0
    if floating is float:
        code = linear_backward_input_f32(dx, dy, w, op.rows, op.in_f, op.out_f)
    else:
        code = linear_backward_input_f64(dx, dy, w, op.rows, op.in_f, op.out_f)
    if code == 0:
        _dx_done(op, ex, 0, dx)
    return code


cdef int _bw_linear_relu(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    _relu_back(dy, dy, <const floating *>ex.val[op.out], op.n_out)
    return _bw_linear(op, ex, dy)


cdef int _bw_maxpool(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    cdef floating *dx = <floating *>_dx(op, ex, 0)
    cdef int code = 0
    if dx == NULL:
        return 0
    if floating is float:
        code = maxpool2d_backward_f32(dx, dy, <int64_t *>op.aux, &op.pool)
    else:
        code = maxpool2d_backward_f64(dx, dy, <int64_t *>op.aux, &op.pool)
    if code == 0:
        _dx_done(op, ex, 0, dx)
    return code


cdef int _bw_relu(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    cdef floating *dx = <floating *>_dx(op, ex, 0)
    if dx != NULL:
        _relu_back(dx, dy, <const floating *>ex.val[op.out], op.n_out)
        _dx_done(op, ex, 0, dx)
    return 0


cdef int _bw_relu_pool(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    cdef floating *dx = <floating *>_dx(op, ex, 0)
    cdef int code = 0
    if dx == NULL:
        return 0
    if floating is float:
        code = maxpool2x2_relu_backward_f32(dx, dy, <uint8_t *>op.aux, <const float *>ex.val[op.out], &op.pool)
    else:
        code = maxpool2x2_relu_backward_f64(dx, dy, <uint8_t *>op.aux, <const double *>ex.val[op.out], &op.pool)
    if code == 0:
        _dx_done(op, ex, 0, dx)
    return code


cdef int _bw_add(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    # y = x1 + x2: dy to both inputs (added where another reader of that buffer wrote first)
    cdef int i
    cdef floating *g
    for i in range(2):
        g = <floating *>ex.grad[op.inp[i]]
        if g == NULL:
            continue
        if op.acc[i]:
            _add_into(g, dy, op.n_out)
        else:
            memcpy(g, dy, op.n_out * sizeof(floating))
    return 0


cdef int _bw_add_relu(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    _relu_back(dy, dy, <const floating *>ex.val[op.out], op.n_out)
    return _bw_add(op, ex, dy)


cdef int _bw_global_avgpool(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    cdef floating *dx = <floating *>_dx(op, ex, 0)
    cdef int code = 0
    if dx == NULL:
        return 0
    if floating is float:
        code = global_avgpool2d_backward_f32(dx, dy, op.planes, op.plane)
    else:
        code = global_avgpool2d_backward_f64(dx, dy, op.planes, op.plane)
    if code == 0:
        _dx_done(op, ex, 0, dx)
    return code


cdef int _bn_train_backward(const _Op *op, const _Exec *ex, const floating *dy, const floating *y) noexcept nogil:
    # BatchNorm2d.backward from the forward's saved statistics, as the layer calls it; y (the output after a fused
    # ReLU, else NULL): the kernel masks dy by (y > 0) as it reads it (ReLU.backward's dy * (y > 0)). The kernel
    # always writes dx: where the input's gradient is not wanted (the caller's input), into the scratch.
    cdef const floating *x = <const floating *>ex.val[op.inp[0]]
    cdef const floating *w = <const floating *>ex.wptr[op.wslot] if op.wslot >= 0 else NULL
    cdef const floating *mean = <const floating *>op.saved
    cdef floating *dw = _scratch(ex, op.wslot, dy) if _wants(ex, op.wslot) else NULL
    cdef floating *db = _scratch(ex, op.bslot, dy) if _wants(ex, op.bslot) else NULL
    cdef floating *dx = <floating *>_dx(op, ex, 0)
    cdef int code
    if dx == NULL and dw == NULL and db == NULL:
        return 0
    if floating is float:
        code = batchnorm_backward_f32(dx if dx != NULL else <float *>ex.tmp, dw, db, dy, y, x, w, mean,
                                      mean + op.bn_c, op.bn_n, op.bn_c, op.bn_l)
    else:
        code = batchnorm_backward_f64(dx if dx != NULL else <double *>ex.tmp, dw, db, dy, y, x, w, mean,
                                      mean + op.bn_c, op.bn_n, op.bn_c, op.bn_l)
    if code:
        return code
    if dw != NULL:
        _collect(ex, op.wslot, dw)
    if db != NULL:
        _collect(ex, op.bslot, db)
    _dx_done(op, ex, 0, dx)
    return 0


cdef int _bw_bn_train(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    return _bn_train_backward(op, ex, dy, <const floating *>NULL)


cdef int _bw_bn_train_relu(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    return _bn_train_backward(op, ex, dy, <const floating *>ex.val[op.out])


cdef int _bw_bn_train_relu_pool(const _Op *op, const _Exec *ex, floating *dy) noexcept nogil:
    # relu_pool's backward (MaxPool2d -> ReLU backward's bits) into mid, which the forward's values no longer need,
    # then the batch norm's from it
    cdef floating *dmid = <floating *>op.mid
    cdef int code
    if floating is float:
        code = maxpool2x2_relu_backward_f32(dmid, dy, <uint8_t *>op.aux, <const float *>ex.val[op.out], &op.pool)
    else:
        code = maxpool2x2_relu_backward_f64(dmid, dy, <uint8_t *>op.aux, <const double *>ex.val[op.out], &op.pool)
    if code:
        return code
    return _bn_train_backward(op, ex, dmid, <const floating *>NULL)


# ---------------------------------------------------------------- the kind tables and the run loops

ctypedef int (*_fwd32_t)(const _Op *, const _Exec *, const float *, float *) noexcept nogil
ctypedef int (*_fwd64_t)(const _Op *, const _Exec *, const double *, double *) noexcept nogil
ctypedef int (*_bwd32_t)(const _Op *, const _Exec *, float *) noexcept nogil
ctypedef int (*_bwd64_t)(const _Op *, const _Exec *, double *) noexcept nogil

cdef _fwd32_t _FWD32[<int>_NKINDS]
cdef _fwd64_t _FWD64[<int>_NKINDS]
cdef _bwd32_t _BWD32[<int>_NKINDS]
cdef _bwd64_t _BWD64[<int>_NKINDS]


cdef _register(int kind, str name, _fwd32_t fwd32, _fwd64_t fwd64, _bwd32_t bwd32, _bwd64_t bwd64):
    _KINDS[name] = kind
    _FWD32[kind], _FWD64[kind], _BWD32[kind], _BWD64[kind] = fwd32, fwd64, bwd32, bwd64


# Per kind, the arrays of its own an op needs besides its buffers ({field: array}, see _Op).
def _conv_output(spec, dtype):
    g = spec.conv
    return np.empty((g["N"], g["OC"], g["OH"], g["OW"]), dtype)


def _fold_array(spec, dtype):
    g = spec.conv
    return np.empty(3 * g["OC"] + g["OC"] * g["C"] // g["G"] * g["KH"] * g["KW"], dtype)


_OP_ARRAYS = {
    _K_MAXPOOL: lambda spec, out, dtype: {"aux": np.empty(out, np.int64)},        # the winners' flat positions
    _K_RELU_POOL: lambda spec, out, dtype: {"aux": np.empty(out, np.uint8)},      # each winner's place in its window
    _K_CONV_RELU_POOL: lambda spec, out, dtype: {"aux": np.empty(out, np.uint8), "mid": _conv_output(spec, dtype),
                                                 "dmid": _conv_output(spec, dtype)},
    _K_CONV_BN: lambda spec, out, dtype: {"fold": _fold_array(spec, dtype)},
    _K_CONV_BN_RELU: lambda spec, out, dtype: {"fold": _fold_array(spec, dtype)},
    _K_BN_TRAIN: lambda spec, out, dtype: {"saved": np.empty(2 * spec.bn_train["C"], dtype)},   # mean | invstd
    _K_BN_TRAIN_RELU: lambda spec, out, dtype: {"saved": np.empty(2 * spec.bn_train["C"], dtype)},
    _K_BN_TRAIN_RELU_POOL: lambda spec, out, dtype: {
        "saved": np.empty(2 * spec.bn_train["C"], dtype), "aux": np.empty(out, np.uint8),
        "mid": np.empty(spec.bn_train["N"] * spec.bn_train["C"] * spec.bn_train["L"], dtype)},
}


cdef char *_kept(_SequentialPlan plan, a):
    """a's data (NULL for None), a kept alive with the plan."""
    if a is None:
        return NULL
    plan.keep.append(a)
    return _data_ptr(a)


cdef int _run_forward(const _Op *ops, int nops, const _Exec *ex, floating *dtype_tag) noexcept nogil:
    cdef int i, code
    cdef const _Op *op
    for i in range(nops):
        op = &ops[i]
        if floating is float:
            code = _FWD32[op.kind](op, ex, <const float *>ex.val[op.inp[0]], <float *>ex.val[op.out])
        else:
            code = _FWD64[op.kind](op, ex, <const double *>ex.val[op.inp[0]], <double *>ex.val[op.out])
        if code:
            return code
    return 0


cdef int _run_backward(const _Op *ops, int nops, const _Exec *ex, floating *dtype_tag) noexcept nogil:
    cdef int i, code
    cdef const _Op *op
    for i in range(nops - 1, -1, -1):
        op = &ops[i]
        if floating is float:
            code = _BWD32[op.kind](op, ex, <float *>ex.grad[op.out])
        else:
            code = _BWD64[op.kind](op, ex, <double *>ex.grad[op.out])
        if code:
            return code
    return 0


cdef class _SequentialPlan:
    """The compiled form of one Sequential for one input shape and dtype (built by compile_plan)."""
    cdef _Op *ops
    cdef int nops
    cdef int f64
    cdef int typenum            # dtype's (NPY_FLOAT32 or NPY_FLOAT64)
    cdef _Exec ex
    cdef readonly tuple in_shape
    cdef readonly object dtype
    cdef readonly tuple out_shape
    cdef readonly object last   # the last module (Sequential.backward checks dy with its _check_dy)
    cdef list keep              # every buffer the ops point into
    cdef object out_buf         # the graph's output
    cdef object grad_buf        # the gradient to it
    cdef list params            # Parameter per slot
    cdef list pdata             # the array last validated per slot
    cdef list pshape
    cdef list scratch           # per slot: the scratch array its gradient goes through
    cdef list hold              # parameter copies alive during one backward (None: none, the usual case)
    cdef list stamps            # (module, version) of every module of the Sequential
    cdef object x_ref           # the input of the pending forward
    cdef public bint pending    # a forward ran and its backward has not
    cdef bint busy

    def __cinit__(self):
        self.ops = NULL
        self.ex.val = self.ex.grad = self.ex.wptr = self.ex.gptr = self.ex.sptr = NULL
        self.ex.gmode = self.ex.ssize = NULL
        self.ex.tmp = NULL

    def __dealloc__(self):
        PyMem_Free(self.ops)
        PyMem_Free(self.ex.val)
        PyMem_Free(self.ex.grad)
        PyMem_Free(self.ex.wptr)
        PyMem_Free(self.ex.gmode)
        PyMem_Free(self.ex.gptr)
        PyMem_Free(self.ex.sptr)
        PyMem_Free(self.ex.ssize)

    cdef bint _params_ready(self, bint strict) except -1:
        """Point wptr at each parameter's current data. An array the kernels cannot take as it stands gives
        False when strict (forward then runs layer by layer, which converts or raises) and otherwise, in a
        backward whose forward already ran here, a contiguous copy, or an error when it no longer fits."""
        cdef int i
        for i in range(len(self.params)):
            data = self.params[i].data
            if data is self.pdata[i]:
                continue
            if _usable(data, self.typenum, self.pshape[i], False):
                self.pdata[i] = data
                self.ex.wptr[i] = _data_ptr(data)
                continue
            if strict:
                return False
            copy = np.ascontiguousarray(data) if isinstance(data, np.ndarray) else None
            if copy is None or copy.dtype != self.dtype or copy.shape != self.pshape[i]:
                raise ValueError(f"Sequential.backward: a parameter was replaced between forward and backward "
                                 f"by {type(data).__name__} {getattr(data, 'dtype', '')} "
                                 f"{getattr(data, 'shape', '')}; expected a {self.dtype} array of shape "
                                 f"{self.pshape[i]}")
            if not copy.flags.aligned:
                copy = copy.copy()
            self.pdata[i] = None
            if self.hold is None:
                self.hold = []
            self.hold.append(copy)
            self.ex.wptr[i] = _data_ptr(copy)
        return True

    def valid(self):
        """False once a module of the Sequential was reconfigured (a public attribute set: see
        Module.__setattr__)."""
        for m, version in self.stamps:
            if m.__dict__.get("_version", 0) != version:
                return False
        return True

    def forward(self, x):
        """The graph's output (a new array), or None when x or a parameter needs the layer-by-layer path."""
        if self.nops == 0 or self.busy:     # (another thread is in this plan: it runs layer by layer)
            return None
        self.busy = True
        cdef int code = 0
        try:
            if not _usable(x, self.typenum, self.in_shape, False) or not self._params_ready(True):
                return None
            self.ex.val[0] = _data_ptr(x)
            with nogil:
                cnnx_fpenv_enter()
                if self.f64:
                    code = _run_forward(self.ops, self.nops, &self.ex, <double *>NULL)
                else:
                    code = _run_forward(self.ops, self.nops, &self.ex, <float *>NULL)
                cnnx_fpenv_leave()
            _status(code, "Sequential.forward")
            self.x_ref = x
            self.pending = True
            return cnp.PyArray_NewCopy(<cnp.ndarray>self.out_buf, cnp.NPY_CORDER)   # (.copy() parses its arguments)
        finally:
            self.busy = False

    def takes(self, dy):
        """dy is an array of the output's shape and dtype that backward can read as it is (Sequential.backward
        then has nothing to check or convert)."""
        return _usable(dy, self.typenum, self.out_shape, False)

    def backward(self, dy, bint input_grad):
        """Backward of the pending forward from dy (the output's shape and dtype: Sequential.backward checks it):
        parameter gradients accumulated; returns dx (or None)."""
        if not self.pending:
            raise RuntimeError("Sequential.backward: no pending forward")
        if self.busy:
            raise RuntimeError("Sequential.backward: this model is running in another thread; one model "
                               "cannot train in two threads at once")
        self.busy = True
        self.hold = None
        try:
            self._params_ready(False)
        except BaseException:
            self.busy = False
            raise
        cdef int nslots = len(self.params), i, code = 0
        dx = None
        try:
            if _usable(dy, self.typenum, self.out_shape, False):    # the usual case: a plain copy
                memcpy(_data_ptr(self.grad_buf), _data_ptr(dy), cnp.PyArray_NBYTES(<cnp.ndarray>dy))
            else:
                np.copyto(self.grad_buf, dy)
            for i in range(nslots):
                p = self.params[i]
                self.ex.gptr[i] = NULL
                if not p.requires_grad:
                    self.ex.gmode[i] = 0
                elif _usable(p.grad, self.typenum, self.pshape[i], True):
                    self.ex.gmode[i] = 1
                    self.ex.gptr[i] = _data_ptr(p.grad)
                else:
                    self.ex.gmode[i] = 2
            self.ex.val[0] = _data_ptr(self.x_ref)
            self.ex.grad[0] = NULL
            if input_grad:
                dx = np.empty(self.in_shape, dtype=self.dtype)
                self.ex.grad[0] = _data_ptr(dx)
            with nogil:
                cnnx_fpenv_enter()
                if self.f64:
                    code = _run_backward(self.ops, self.nops, &self.ex, <double *>NULL)
                else:
                    code = _run_backward(self.ops, self.nops, &self.ex, <float *>NULL)
                cnnx_fpenv_leave()
            _status(code, "Sequential.backward")
            for i in range(nslots):
                if self.ex.gmode[i] == 2:
                    self.params[i].accumulate_grad(self.scratch[i].copy())
            self.pending = False
            self.x_ref = None
            return dx
        finally:
            self.hold = None
            self.busy = False


def compile_plan(graph):
    """A plan running the ops of graph (cnnx/_planner.lower): one that runs, or, when the graph has no ops, one
    whose forward always returns None (the layer-by-layer path then runs, and raises the usual errors). Either
    stays valid until a module of the Sequential is reconfigured."""
    cdef _SequentialPlan plan = _SequentialPlan()
    plan.stamps = list(graph.stamps)
    plan.nops = 0
    if not graph.ops or any(spec.kind not in _KINDS for spec in graph.ops):
        return plan         # (a kind with no entry point here: layer by layer)
    dtype = np.dtype(graph.dtype)
    for spec in graph.ops:
        if spec.bn is not None and not all(_usable(spec.bn[k], dtype.num, (spec.conv["OC"],), False)
                                           for k in ("mean", "var")):
            return plan     # (running statistics the kernels cannot read in place)
        tracked = spec.bn_train["count"] if spec.bn_train is not None else None
        if tracked is not None and not (all(_usable(spec.bn_train[k], dtype.num, (spec.bn_train["C"],), True)
                                            for k in ("mean", "var"))
                                        and _usable(tracked, cnp.NPY_INT64, (), True)):
            return plan     # (running statistics or a count the kernels cannot update in place)
    plan.dtype, plan.in_shape, plan.f64 = dtype, tuple(graph.in_shape), dtype == np.float64
    plan.typenum = dtype.num
    plan.out_shape, plan.last = tuple(graph.out_shape), graph.last
    plan.params, plan.pdata, plan.pshape, plan.scratch, plan.keep = [], [], [], [], []
    ops = graph.ops
    nbuf = len(graph.shapes)
    nslots = sum(1 for spec in ops for p in spec.params + (spec.bn["params"] if spec.bn is not None else [])
                 if p is not None)
    plan.ops = <_Op *>PyMem_Malloc(len(ops) * sizeof(_Op))
    plan.ex.val = <char **>PyMem_Malloc(nbuf * sizeof(char *))
    plan.ex.grad = <char **>PyMem_Malloc(nbuf * sizeof(char *))
    plan.ex.wptr = <char **>PyMem_Malloc((nslots + 1) * sizeof(char *))
    plan.ex.gptr = <char **>PyMem_Malloc((nslots + 1) * sizeof(char *))
    plan.ex.sptr = <char **>PyMem_Malloc((nslots + 1) * sizeof(char *))
    plan.ex.gmode = <int64_t *>PyMem_Malloc((nslots + 1) * sizeof(int64_t))
    plan.ex.ssize = <int64_t *>PyMem_Malloc((nslots + 1) * sizeof(int64_t))
    if plan.ops == NULL or plan.ex.val == NULL or plan.ex.grad == NULL or plan.ex.wptr == NULL \
            or plan.ex.gptr == NULL or plan.ex.sptr == NULL or plan.ex.gmode == NULL or plan.ex.ssize == NULL:
        raise MemoryError("Sequential: out of memory for a plan")
    cdef int i, b
    for b in range(nbuf):
        plan.ex.val[b] = plan.ex.grad[b] = NULL
    values, grads = {}, {}

    def buffer(bid):        # (buffer 0 is the caller's: its pointers are set by each call)
        if bid not in values and bid != 0:
            values[bid], grads[bid] = np.empty(graph.shapes[bid], dtype), np.empty(graph.shapes[bid], dtype)
            plan.keep.extend((values[bid], grads[bid]))
            plan.ex.val[bid], plan.ex.grad[bid] = _data_ptr(values[bid]), _data_ptr(grads[bid])
        return bid

    def slot(entry):
        if entry is None:
            return -1
        param, shape = entry
        plan.params.append(param)
        plan.pdata.append(None)
        plan.pshape.append(tuple(shape))
        s = np.empty(shape, dtype)
        plan.scratch.append(s)
        plan.keep.append(s)
        return len(plan.params) - 1

    cdef _Op *op
    cdef int64_t tmp_size = 0
    for i, spec in enumerate(ops):
        op = &plan.ops[i]
        op.kind = _KINDS[spec.kind]
        op.nin = len(spec.inputs)
        op.out = buffer(spec.output)
        op.n_out = math.prod(graph.shapes[spec.output])
        for k in range(2):
            op.inp[k] = buffer(spec.inputs[k]) if k < op.nin else -1
            op.acc[k] = spec.accumulate[k] if k < op.nin else 0
            op.n_in[k] = math.prod(graph.shapes[spec.inputs[k]]) if k < op.nin else 0
            if op.acc[k] and op.kind != _K_ADD and op.kind != _K_ADD_RELU:
                tmp_size = max(tmp_size, op.n_in[k])
        params = list(spec.params) + [None, None]
        op.wslot, op.bslot = slot(params[0]), slot(params[1])
        op.gslot = op.betaslot = -1
        op.bn_mean = op.bn_var = NULL
        if spec.bn is not None:
            params = list(spec.bn["params"]) + [None, None]
            op.gslot, op.betaslot = slot(params[0]), slot(params[1])
            op.eps = spec.bn["eps"]
            op.bn_mean, op.bn_var = _kept(plan, spec.bn["mean"]), _kept(plan, spec.bn["var"])
        op.count = NULL
        if spec.bn_train is not None:
            bt = spec.bn_train
            op.bn_n, op.bn_c, op.bn_l, op.eps = bt["N"], bt["C"], bt["L"], bt["eps"]
            op.cumulative = bt["momentum"] is None
            op.momentum = 0.0 if op.cumulative else bt["momentum"]
            if bt["count"] is not None:
                op.bn_mean, op.bn_var = _kept(plan, bt["mean"]), _kept(plan, bt["var"])
                op.count = <int64_t *>_kept(plan, bt["count"])
            if op.inp[0] == 0:      # (its kernel writes dx even where the caller's input wants none: into tmp)
                tmp_size = max(tmp_size, op.n_in[0])
        if spec.conv is not None:
            op.conv = spec.conv
        if spec.pool is not None:
            op.pool = spec.pool
        if spec.planes is not None:
            op.planes, op.plane = spec.planes["NC"], spec.planes["L"]
        if spec.linear is not None:
            op.rows, op.in_f, op.out_f = (spec.linear["rows"], spec.linear["in_features"],
                                          spec.linear["out_features"])
        arrays = _OP_ARRAYS[op.kind](spec, graph.shapes[spec.output], dtype) if op.kind in _OP_ARRAYS else {}
        op.aux, op.mid, op.dmid = _kept(plan, arrays.get("aux")), _kept(plan, arrays.get("mid")), \
            _kept(plan, arrays.get("dmid"))
        op.fold = _kept(plan, arrays.get("fold"))
        op.saved = _kept(plan, arrays.get("saved"))
    plan.ex.tmp = _kept(plan, np.empty(max(tmp_size, 1), dtype))
    for i in range(len(plan.params)):
        plan.pdata[i] = None
        plan.ex.wptr[i] = plan.ex.gptr[i] = NULL
        plan.ex.gmode[i] = 0
        plan.ex.sptr[i] = _data_ptr(plan.scratch[i])
        plan.ex.ssize[i] = plan.scratch[i].size
    plan.out_buf = values[graph.output].reshape(plan.out_shape)
    plan.grad_buf = grads[graph.output].reshape(plan.out_shape)
    plan.nops = len(ops)
    return plan


# One line per kind: its name in the graph (cnnx/_planner.py) and its forward and backward entry points.
_register(_K_CONV, "conv", _fw_conv[float], _fw_conv[double], _bw_conv[float], _bw_conv[double])
_register(_K_CONV_RELU, "conv_relu", _fw_conv_relu[float], _fw_conv_relu[double], _bw_conv_relu[float],
          _bw_conv_relu[double])
_register(_K_CONV_RELU_POOL, "conv_relu_pool", _fw_conv_relu_pool[float], _fw_conv_relu_pool[double],
          _bw_conv_relu_pool[float], _bw_conv_relu_pool[double])
_register(_K_CONV_BN, "conv_bn", _fw_conv_bn[float], _fw_conv_bn[double], _bw_conv_bn[float], _bw_conv_bn[double])
_register(_K_CONV_BN_RELU, "conv_bn_relu", _fw_conv_bn_relu[float], _fw_conv_bn_relu[double],
          _bw_conv_bn_relu[float], _bw_conv_bn_relu[double])
_register(_K_LINEAR, "linear", _fw_linear[float], _fw_linear[double], _bw_linear[float], _bw_linear[double])
_register(_K_LINEAR_RELU, "linear_relu", _fw_linear_relu[float], _fw_linear_relu[double], _bw_linear_relu[float],
          _bw_linear_relu[double])
_register(_K_MAXPOOL, "maxpool", _fw_maxpool[float], _fw_maxpool[double], _bw_maxpool[float], _bw_maxpool[double])
_register(_K_RELU, "relu", _fw_relu[float], _fw_relu[double], _bw_relu[float], _bw_relu[double])
_register(_K_RELU_POOL, "relu_pool", _fw_relu_pool[float], _fw_relu_pool[double], _bw_relu_pool[float],
          _bw_relu_pool[double])
_register(_K_ADD, "add", _fw_add[float], _fw_add[double], _bw_add[float], _bw_add[double])
_register(_K_ADD_RELU, "add_relu", _fw_add_relu[float], _fw_add_relu[double], _bw_add_relu[float],
          _bw_add_relu[double])
_register(_K_BN_TRAIN_RELU_POOL, "batchnorm_train_relu_pool", _fw_bn_train_relu_pool[float],
          _fw_bn_train_relu_pool[double], _bw_bn_train_relu_pool[float], _bw_bn_train_relu_pool[double])
_register(_K_GLOBAL_AVGPOOL, "global_avgpool", _fw_global_avgpool[float], _fw_global_avgpool[double],
          _bw_global_avgpool[float], _bw_global_avgpool[double])
_register(_K_BN_TRAIN, "batchnorm_train", _fw_bn_train[float], _fw_bn_train[double], _bw_bn_train[float],
          _bw_bn_train[double])
_register(_K_BN_TRAIN_RELU, "batchnorm_train_relu", _fw_bn_train_relu[float], _fw_bn_train_relu[double],
          _bw_bn_train_relu[float], _bw_bn_train_relu[double])
