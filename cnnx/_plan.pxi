# Included by _kernels.pyx: Sequential's compiled plan.
#
# A Sequential of Conv2d / ReLU / MaxPool2d / Flatten / Linear / Identity (and Dropout in eval mode) run
# layer by layer costs a Python call, argument checks, an output allocation and a cache update per layer:
# about 6 us each, 80 us for a batch-1 LeNet-5 forward whose arithmetic takes 20 us. A plan does the checks
# once per (input shape, dtype), keeps every activation and gradient buffer, and runs the whole chain of C
# kernels in one call without the GIL. ReLU after a Conv2d or Linear is applied in place to its output
# buffer (the layer's backward does not need its output, so nothing is lost), or, when a MaxPool2d(2)
# follows, by that pool as it reads (maxpool2x2_relu_forward) and in its backward (maxpool2x2_relu_backward).
# Such a pool keeps each winner's place in its 2x2 window (a byte) instead of an int64 index, and after a
# Conv2d it runs inside the convolution (conv2d_relu_maxpool2x2_forward): each image is pooled as soon as it
# is computed, from a small per-thread buffer, so the convolution's full output is never written.
#
# The results are the layers' own, bit for bit: the same kernels in the same order on the same values,
# except the weight and bias gradients of a pooled conv, summed over the pool's winners only
# (conv2d_pooled_backward_weight: the same sums in another order, a quarter of the work). Sequential
# decides when a plan applies (cnnx/nn/module.py); anything unusual (another layer type, a hook, an input
# that is not a C-contiguous array of the parameters' dtype, a parameter array replaced by something
# unusual) falls back to the layer-by-layer path, which raises the usual errors.

cdef enum:
    _OP_CONV = 1
    _OP_RELU = 2
    _OP_MAXPOOL = 3
    _OP_LINEAR = 4

cdef struct _Op:
    int kind
    int relu            # conv/linear: ReLU applied in place to y (2: by the next op, a masked maxpool)
    int pooled          # conv with relu 2: its forward also runs the next op's (conv2d_relu_maxpool2x2_forward)
    int masked          # maxpool 2x2 stride 2 (no ceil-mode windows), after a ReLU that it applies itself: forward
                        # pools relu(x) on the fly, backward writes dx masked by x > 0 (y > 0) in one pass
    int wslot, bslot    # parameter slots (-1: none)
    cnnx_conv2d_geom conv   # a conv's geometry
    cnnx_pool2d_geom pool   # a maxpool's
    int64_t rows, in_f, out_f   # a linear's: x (rows, in_f), y (rows, out_f)
    int64_t n_out       # elements of y
    char *x             # input activation (NULL for the first op: the caller's array)
    char *y             # output activation
    char *dx            # gradient to the input (NULL for the first op: a fresh array, when wanted)
    char *dy            # gradient to the output
    char *aux           # maxpool: int64 indices (fused with a ReLU: uint8 window positions)


cdef inline char *_data_ptr(a):
    return <char *>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef bint _usable(a, dtype, shape, bint writable):
    """a is an ndarray the kernels can use directly: exact dtype and shape, C-contiguous, aligned."""
    if type(a) is not np.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if arr.dtype is not dtype and arr.dtype != dtype:
        return False
    if a.shape != shape:
        return False
    cdef int flags = cnp.PyArray_FLAGS(arr)
    if not (flags & cnp.NPY_ARRAY_C_CONTIGUOUS) or not (flags & cnp.NPY_ARRAY_ALIGNED):
        return False
    return not writable or (flags & cnp.NPY_ARRAY_WRITEABLE) != 0


cdef int _relu_fwd(char *y, char *x, int64_t n, int f64) noexcept nogil:
    # y = numpy's maximum(x, 0): x where x > 0 or NaN, else +0 (also for -0.0)
    cdef int64_t i
    cdef float *yf
    cdef float *xf
    cdef double *yd
    cdef double *xd
    if f64:
        yd = <double *>y
        xd = <double *>x
        for i in range(n):
            yd[i] = xd[i] if (xd[i] > 0 or xd[i] != xd[i]) else 0.0
    else:
        yf = <float *>y
        xf = <float *>x
        for i in range(n):
            yf[i] = xf[i] if (xf[i] > 0 or xf[i] != xf[i]) else <float>0.0
    return 0


cdef void _relu_bwd(char *dx, char *dy, char *y, int64_t n, int f64) noexcept nogil:
    # dx = dy * (y > 0), as ReLU.backward (a multiply, so inf * 0 gives NaN there too)
    cdef int64_t i
    cdef float *dxf
    cdef float *dyf
    cdef float *yf
    cdef double *dxd
    cdef double *dyd
    cdef double *yd
    if f64:
        dxd = <double *>dx
        dyd = <double *>dy
        yd = <double *>y
        for i in range(n):
            dxd[i] = dyd[i] * (1.0 if yd[i] > 0 else 0.0)
    else:
        dxf = <float *>dx
        dyf = <float *>dy
        yf = <float *>y
        for i in range(n):
            dxf[i] = dyf[i] * (<float>1.0 if yf[i] > 0 else <float>0.0)


cdef void _add_into(char *dst, char *src, int64_t n, int f64) noexcept nogil:
    cdef int64_t i
    if f64:
        for i in range(n):
            (<double *>dst)[i] += (<double *>src)[i]
    else:
        for i in range(n):
            (<float *>dst)[i] += (<float *>src)[i]


cdef int _run_forward(_Op *op, char *x, char *w, char *b, int f64) noexcept nogil:
    """One op's forward; a pooled conv's also runs the next op's (op + 1: its masked 2x2 pool)."""
    cdef int code = 0
    cdef _Op *nxt = op + 1
    if op.kind == _OP_CONV and op.pooled:
        if f64:
            code = conv2d_relu_maxpool2x2_forward_f64(<double *>nxt.y, <uint8_t *>nxt.aux, <double *>op.y,
                                                      <double *>x, <double *>w, <double *>b, &op.conv, &nxt.pool)
        else:
            code = conv2d_relu_maxpool2x2_forward_f32(<float *>nxt.y, <uint8_t *>nxt.aux, <float *>op.y,
                                                      <float *>x, <float *>w, <float *>b, &op.conv, &nxt.pool)
    elif op.kind == _OP_CONV:
        if f64:
            code = conv2d_forward_f64(<double *>op.y, <double *>x, <double *>w, <double *>b, &op.conv)
        else:
            code = conv2d_forward_f32(<float *>op.y, <float *>x, <float *>w, <float *>b, &op.conv)
    elif op.kind == _OP_LINEAR:
        if f64:
            code = linear_forward_f64(<double *>op.y, <double *>x, <double *>w, <double *>b, op.rows, op.in_f, op.out_f)
        else:
            code = linear_forward_f32(<float *>op.y, <float *>x, <float *>w, <float *>b, op.rows, op.in_f, op.out_f)
    elif op.kind == _OP_MAXPOOL and op.masked:     # relu(x) pooled without writing relu(x)
        if f64:
            code = maxpool2x2_relu_forward_f64(<double *>op.y, <uint8_t *>op.aux, <double *>x, &op.pool)
        else:
            code = maxpool2x2_relu_forward_f32(<float *>op.y, <uint8_t *>op.aux, <float *>x, &op.pool)
    elif op.kind == _OP_MAXPOOL:
        if f64:
            code = maxpool2d_forward_f64(<double *>op.y, <int64_t *>op.aux, <double *>x, &op.pool)
        else:
            code = maxpool2d_forward_f32(<float *>op.y, <int64_t *>op.aux, <float *>x, &op.pool)
    if code == 0 and (op.relu == 1 or op.kind == _OP_RELU):
        _relu_fwd(op.y, op.y if op.kind != _OP_RELU else x, op.n_out, f64)
    return code


cdef int _run_backward(_Op *op, char *x, char *dx, char **wptr, int64_t *gmode, char **gptr, char **sptr,
                       int64_t *ssize, int f64) noexcept nogil:
    """One op's backward from op.dy: its parameters' gradients (mode 1: added into .grad here; mode 2: left
    in the slot's scratch for the caller), and dx when dx is not NULL (the first op's only when wanted)."""
    cdef int code = 0, ws = op.wslot, bs = op.bslot
    cdef bint need_w, need_b, direct
    if op.kind == _OP_RELU:
        if dx != NULL:
            _relu_bwd(dx, op.dy, op.y, op.n_out, f64)
        return 0
    if op.relu == 1:
        _relu_bwd(op.dy, op.dy, op.y, op.n_out, f64)
    if op.kind == _OP_MAXPOOL:
        if dx != NULL and op.masked:
            if f64:
                code = maxpool2x2_relu_backward_f64(<double *>dx, <double *>op.dy, <uint8_t *>op.aux,
                                                    <double *>op.y, &op.pool)
            else:
                code = maxpool2x2_relu_backward_f32(<float *>dx, <float *>op.dy, <uint8_t *>op.aux,
                                                    <float *>op.y, &op.pool)
        elif dx != NULL:
            if f64:
                code = maxpool2d_backward_f64(<double *>dx, <double *>op.dy, <int64_t *>op.aux, &op.pool)
            else:
                code = maxpool2d_backward_f32(<float *>dx, <float *>op.dy, <int64_t *>op.aux, &op.pool)
        return code
    need_w = gmode[ws] != 0
    need_b = bs >= 0 and gmode[bs] != 0
    cdef _Op *nxt = op + 1
    if op.kind == _OP_CONV and op.pooled:
        # the pool's backward (op + 1, skipped by the caller) runs here: the weight gradient comes from the pooled
        # gradient directly, and op.dy (the conv's output gradient) is written only when dx needs it
        if need_w or need_b:
            if f64:
                code = conv2d_pooled_backward_weight_f64(
                    <double *>sptr[ws], <double *>sptr[bs] if bs >= 0 else NULL, <double *>op.dy, <double *>nxt.dy,
                    <uint8_t *>nxt.aux, <double *>nxt.y, <double *>x, &op.conv, &nxt.pool, dx != NULL)
            else:
                code = conv2d_pooled_backward_weight_f32(
                    <float *>sptr[ws], <float *>sptr[bs] if bs >= 0 else NULL, <float *>op.dy, <float *>nxt.dy,
                    <uint8_t *>nxt.aux, <float *>nxt.y, <float *>x, &op.conv, &nxt.pool, dx != NULL)
            if code:
                return code
            if gmode[ws] == 1:
                _add_into(gptr[ws], sptr[ws], ssize[ws], f64)
            if bs >= 0 and gmode[bs] == 1:
                _add_into(gptr[bs], sptr[bs], ssize[bs], f64)
        elif dx != NULL:
            code = _run_backward(nxt, op.y, op.dy, wptr, gmode, gptr, sptr, ssize, f64)
            if code:
                return code
    elif op.kind == _OP_CONV:
        if need_w or need_b:
            if f64:
                code = conv2d_backward_weight_f64(<double *>sptr[ws], <double *>sptr[bs] if bs >= 0 else NULL,
                                                  <double *>op.dy, <double *>x, &op.conv)
            else:
                code = conv2d_backward_weight_f32(<float *>sptr[ws], <float *>sptr[bs] if bs >= 0 else NULL,
                                                  <float *>op.dy, <float *>x, &op.conv)
            if code:
                return code
            if gmode[ws] == 1:
                _add_into(gptr[ws], sptr[ws], ssize[ws], f64)
            if bs >= 0 and gmode[bs] == 1:
                _add_into(gptr[bs], sptr[bs], ssize[bs], f64)
    if op.kind == _OP_CONV:
        if dx != NULL:
            if f64:
                code = conv2d_backward_input_f64(<double *>dx, <double *>op.dy, <double *>wptr[ws], &op.conv)
            else:
                code = conv2d_backward_input_f32(<float *>dx, <float *>op.dy, <float *>wptr[ws], &op.conv)
        return code
    # _OP_LINEAR: straight into the .grad arrays when they take it (as Linear.backward does)
    if need_w or need_b:
        direct = gmode[ws] == 1 and (bs < 0 or gmode[bs] != 2)
        if direct:
            if f64:
                code = linear_backward_weight_f64(<double *>gptr[ws], <double *>gptr[bs] if need_b else NULL,
                                                  <double *>op.dy, <double *>x, op.rows, op.in_f, op.out_f, 1)
            else:
                code = linear_backward_weight_f32(<float *>gptr[ws], <float *>gptr[bs] if need_b else NULL,
                                                  <float *>op.dy, <float *>x, op.rows, op.in_f, op.out_f, 1)
        else:
            if f64:
                code = linear_backward_weight_f64(<double *>sptr[ws], <double *>sptr[bs] if bs >= 0 else NULL,
                                                  <double *>op.dy, <double *>x, op.rows, op.in_f, op.out_f, 0)
            else:
                code = linear_backward_weight_f32(<float *>sptr[ws], <float *>sptr[bs] if bs >= 0 else NULL,
                                                  <float *>op.dy, <float *>x, op.rows, op.in_f, op.out_f, 0)
            if code == 0 and gmode[ws] == 1:
                _add_into(gptr[ws], sptr[ws], ssize[ws], f64)
            if code == 0 and bs >= 0 and gmode[bs] == 1:
                _add_into(gptr[bs], sptr[bs], ssize[bs], f64)
        if code:
            return code
    if dx != NULL:
        if f64:
            code = linear_backward_input_f64(<double *>dx, <double *>op.dy, <double *>wptr[ws], op.rows, op.in_f, op.out_f)
        else:
            code = linear_backward_input_f32(<float *>dx, <float *>op.dy, <float *>wptr[ws], op.rows, op.in_f, op.out_f)
    return code


cdef class _SequentialPlan:
    """The compiled form of one Sequential for one input shape and dtype (built by sequential_plan)."""
    cdef _Op *ops
    cdef int nops
    cdef int f64
    cdef readonly tuple in_shape
    cdef readonly object dtype
    cdef tuple out_shape
    cdef list keep              # every buffer the ops point into
    cdef object out_buf         # the last op's output
    cdef object grad_buf        # the gradient to the last op's output
    cdef list params            # Parameter per slot
    cdef list pdata             # the array last validated per slot
    cdef list pshape
    cdef char **wptr            # per slot: the parameter's data
    cdef int64_t *gmode         # per slot, set by each backward: 0 frozen, 1 add into grad in C (gptr),
    cdef char **gptr            #   2 through the scratch + Parameter.accumulate_grad
    cdef char **sptr            # per slot: its scratch array (ssize elements)
    cdef int64_t *ssize
    cdef list scratch           # per slot: the scratch array its gradient goes through
    cdef list hold              # parameter copies alive during one backward
    cdef list modules
    cdef list versions
    cdef object last            # the last module (its _check_dy names it in errors)
    cdef object x_ref           # the input of the pending forward
    cdef public bint pending    # a forward ran and its backward has not
    cdef bint busy

    def __cinit__(self):
        self.ops = NULL
        self.wptr = self.gptr = self.sptr = NULL
        self.gmode = self.ssize = NULL

    def __dealloc__(self):
        PyMem_Free(self.ops)
        PyMem_Free(self.wptr)
        PyMem_Free(self.gmode)
        PyMem_Free(self.gptr)
        PyMem_Free(self.sptr)
        PyMem_Free(self.ssize)

    cdef bint _params_ready(self, bint strict) except -1:
        """Point wptr at each parameter's current data. An array the kernels cannot take as it stands gives
        False when strict (forward then runs layer by layer, which converts or raises) and otherwise, in a
        backward whose forward already ran here, a contiguous copy, or an error when it no longer fits."""
        cdef int i
        for i in range(len(self.params)):
            data = self.params[i].data
            if data is self.pdata[i]:
                continue
            if _usable(data, self.dtype, self.pshape[i], False):
                self.pdata[i] = data
                self.wptr[i] = _data_ptr(data)
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
            self.hold.append(copy)
            self.wptr[i] = _data_ptr(copy)
        return True

    def valid(self):
        """False once a module of the chain was reconfigured (a public attribute set: see Module.__setattr__)."""
        cdef int i
        for i in range(len(self.modules)):
            if self.modules[i].__dict__.get("_version", 0) != self.versions[i]:
                return False
        return True

    def forward(self, x):
        """The chain's output (a new array), or None when x or a parameter needs the layer-by-layer path."""
        if self.nops == 0 or self.busy:     # (another thread is in this plan: it runs layer by layer)
            return None
        self.busy = True
        cdef char *xp
        cdef char *inp
        cdef int i, code = 0, f64 = self.f64
        cdef _Op *op
        try:
            if not _usable(x, self.dtype, self.in_shape, False) or not self._params_ready(True):
                return None
            xp = _data_ptr(x)
            with nogil:
                i = 0
                while i < self.nops:
                    op = &self.ops[i]
                    inp = xp if op.x == NULL else op.x
                    code = _run_forward(op, inp, self.wptr[op.wslot] if op.wslot >= 0 else NULL,
                                        self.wptr[op.bslot] if op.bslot >= 0 else NULL, f64)
                    if code:
                        break
                    i += 2 if op.pooled else 1      # (a pooled conv ran the pool too)
            _status(code, "Sequential.forward")
            self.x_ref = x
            self.pending = True
            return self.out_buf.copy()
        finally:
            self.busy = False

    def backward(self, dy, bint input_grad):
        """Backward of the pending forward: parameter gradients accumulated; returns dx (or None)."""
        if not self.pending:
            raise RuntimeError("Sequential.backward: no pending forward")
        dy = self.last._check_dy(dy, self.out_shape, self.dtype)
        if self.busy:
            raise RuntimeError("Sequential.backward: this model is running in another thread; one model "
                               "cannot train in two threads at once")
        self.busy = True
        self.hold = []
        try:
            self._params_ready(False)
        except BaseException:
            self.busy = False
            raise
        cdef int nslots = len(self.params), i, code = 0, f64 = self.f64
        cdef char *xp = _data_ptr(self.x_ref)
        cdef char *dxp = NULL
        cdef _Op *op
        dx = None
        try:
            np.copyto(self.grad_buf, dy)
            for i in range(nslots):
                p = self.params[i]
                self.gptr[i] = NULL
                if not p.requires_grad:
                    self.gmode[i] = 0
                elif _usable(p.grad, self.dtype, self.pshape[i], True):
                    self.gmode[i] = 1
                    self.gptr[i] = _data_ptr(p.grad)
                else:
                    self.gmode[i] = 2
            if input_grad and self.nops:
                dx = np.empty(self.in_shape, dtype=self.dtype)
                dxp = _data_ptr(dx)
            with nogil:
                for i in range(self.nops - 1, -1, -1):
                    op = &self.ops[i]
                    if i > 0 and self.ops[i - 1].pooled:
                        continue                    # a pooled conv's pool: its backward runs with the conv's
                    code = _run_backward(op, op.x if op.x != NULL else xp, op.dx if op.dx != NULL else dxp,
                                         self.wptr, self.gmode, self.gptr, self.sptr, self.ssize, f64)
                    if code:
                        break
            _status(code, "Sequential.backward")
            for i in range(nslots):
                if self.gmode[i] == 2:
                    self.params[i].accumulate_grad(self.scratch[i].copy())
            self.pending = False
            self.x_ref = None
            return dx
        finally:
            self.hold = []
            self.busy = False


def sequential_plan(seq, x):
    """A plan running the modules of Sequential `seq` on arrays shaped like x: one that runs (the chain is
    made of layers a plan knows, in their stock form, and x fits them) or one whose forward always returns
    None (the layer-by-layer path then runs, and raises the usual errors). Either stays valid until a module
    of the chain is reconfigured."""
    from cnnx.nn import layers as L
    cdef _SequentialPlan plan = _SequentialPlan()
    modules = list(seq._modules.values())
    plan.modules = [seq] + [m for m in modules if m is not None]   # (a None entry: seq's stamp covers it)
    plan.versions = [m.__dict__.get("_version", 0) for m in plan.modules]
    plan.nops = 0
    if type(x) is not np.ndarray or x.dtype not in _FLOATS or x.ndim < 1 or x.size == 0 or not modules:
        return plan
    try:
        specs = _plan_specs(plan, modules, x, L)
    except (ValueError, TypeError, OverflowError):
        specs = None        # a shape or setting the layers reject: they raise it themselves
    if not specs:
        return plan
    cdef size_t nslots = len(plan.params) + 1
    plan.ops = <_Op *>PyMem_Malloc(len(specs) * sizeof(_Op))
    plan.wptr = <char **>PyMem_Malloc(nslots * sizeof(char *))
    plan.gptr = <char **>PyMem_Malloc(nslots * sizeof(char *))
    plan.sptr = <char **>PyMem_Malloc(nslots * sizeof(char *))
    plan.gmode = <int64_t *>PyMem_Malloc(nslots * sizeof(int64_t))
    plan.ssize = <int64_t *>PyMem_Malloc(nslots * sizeof(int64_t))
    if plan.ops == NULL or plan.wptr == NULL or plan.gptr == NULL or plan.sptr == NULL or plan.gmode == NULL \
            or plan.ssize == NULL:
        raise MemoryError("Sequential: out of memory for a plan")
    cdef int i, k
    cdef _Op *op
    for i, spec in enumerate(specs):
        op = &plan.ops[i]
        op.kind, op.relu, op.wslot, op.bslot = spec["kind"], spec["relu"], spec["wslot"], spec["bslot"]
        op.masked = spec.get("masked", 0)
        op.pooled = spec.get("pooled", 0)
        if "conv" in spec:
            op.conv = spec["conv"]
        if "pool" in spec:
            op.pool = spec["pool"]
        op.rows, op.in_f, op.out_f = spec.get("linear", (0, 0, 0))
        op.n_out = spec["y"].size
        op.x = _data_ptr(spec["x"]) if spec["x"] is not None else NULL
        op.dx = _data_ptr(spec["dx"]) if spec["dx"] is not None else NULL
        op.y, op.dy = _data_ptr(spec["y"]), _data_ptr(spec["dy"])
        op.aux = _data_ptr(spec["aux"]) if spec.get("aux") is not None else NULL
    for i in range(len(plan.params)):
        plan.pdata[i] = None
        plan.wptr[i] = plan.gptr[i] = NULL
        plan.gmode[i] = 0
        plan.sptr[i] = _data_ptr(plan.scratch[i])
        plan.ssize[i] = plan.scratch[i].size
    plan.nops = len(specs)
    return plan


cdef list _plan_specs(_SequentialPlan plan, list modules, x, L):
    """The ops of the plan as dicts, or None when a module needs the layer-by-layer path."""
    dtype = x.dtype
    shape = tuple(x.shape)
    plan.dtype, plan.in_shape, plan.f64 = dtype, shape, dtype == np.float64
    plan.params, plan.pdata, plan.pshape, plan.scratch, plan.keep = [], [], [], [], []
    cur = grad = None               # the current activation and its gradient (None: the caller's x / dx)
    specs = []
    fusable = None                  # the op a ReLU straight after it can run inside

    def slot(param, shape_):
        plan.params.append(param)
        plan.pdata.append(None)
        plan.pshape.append(tuple(shape_))
        s = np.empty(shape_, dtype)
        plan.scratch.append(s)
        plan.keep.append(s)
        return len(plan.params) - 1

    def new_op(kind, out_shape, **extra):
        y = np.empty(out_shape, dtype)
        dy = np.empty(out_shape, dtype)
        plan.keep.extend((y, dy))
        spec = dict(kind=kind, relu=0, wslot=-1, bslot=-1, x=cur, dx=grad, y=y, dy=dy, **extra)
        specs.append(spec)
        return spec

    relu_spec = None                # the op whose output a ReLU just made non-negative
    for m in modules:
        prev_relu, relu_spec = relu_spec, None
        t = type(m)
        if m is None or "forward" in m.__dict__ or "backward" in m.__dict__:
            return None
        if t is L.Conv2d:
            ws = m._param_shapes["weight"]
            if m.dtype != dtype or len(shape) != 4 or shape[1] != m.in_channels or m.weight is None:
                return None
            if ("bias" in m._param_shapes) != (m.bias is not None):
                return None
            pad = m._padding4(shape[2:])
            oh, ow = _conv_geometry(shape, ws, m.stride, pad, m.dilation, m.groups, "Conv2d")
            out = (shape[0], ws[0], oh, ow)
            _shape4(out, "output shape", "Conv2d")
            if 0 in out:
                return None
            conv = dict(N=shape[0], C=shape[1], H=shape[2], W=shape[3], OC=ws[0], KH=ws[2], KW=ws[3],
                        SH=m.stride[0], SW=m.stride[1], PT=pad[0], PB=pad[1], PL=pad[2], PR=pad[3],
                        DH=m.dilation[0], DW=m.dilation[1], G=m.groups, OH=oh, OW=ow)
            spec = new_op(_OP_CONV, out, conv=conv)
            spec["wslot"] = slot(m.weight, ws)
            if m.bias is not None:
                spec["bslot"] = slot(m.bias, (ws[0],))
            fusable = spec
        elif t is L.Linear:
            if m.dtype != dtype or shape[len(shape) - 1] != m.in_features or m.weight is None:
                return None
            if ("bias" in m._param_shapes) != (m.bias is not None):
                return None
            rows = math.prod(shape[:len(shape) - 1])
            out = shape[:len(shape) - 1] + (m.out_features,)
            if rows == 0:
                return None
            spec = new_op(_OP_LINEAR, out, linear=(rows, m.in_features, m.out_features))
            spec["wslot"] = slot(m.weight, (m.out_features, m.in_features))
            if m.bias is not None:
                spec["bslot"] = slot(m.bias, (m.out_features,))
            fusable = spec
        elif t is L.MaxPool2d:
            if m.return_indices or len(shape) != 4:
                return None
            k, s, p, d = m._geometry()
            oh, ow = _pool_geometry(shape, k, s, p, d, m.ceil_mode, "MaxPool2d")
            out = (shape[0], shape[1], oh, ow)
            if 0 in out:
                return None
            masked = prev_relu is not None and k == (2, 2) and s == (2, 2) and p == (0, 0) and d == (1, 1) \
                and shape[2] >= 2 * oh and shape[3] >= 2 * ow
            idx = np.empty(out, np.uint8 if masked else np.int64)   # fused: each winner's place in its window
            plan.keep.append(idx)
            pool = dict(NC=shape[0] * shape[1], H=shape[2], W=shape[3], KH=k[0], KW=k[1], SH=s[0], SW=s[1], PH=p[0],
                        PW=p[1], DH=d[0], DW=d[1], OH=oh, OW=ow)
            spec = new_op(_OP_MAXPOOL, out, aux=idx, pool=pool)
            if masked:
                spec["masked"] = 1
                prev_relu["relu"] = 2
                if prev_relu["kind"] == _OP_CONV and specs[len(specs) - 2] is prev_relu:
                    prev_relu["pooled"] = 1     # the conv pools each image as it computes it
            fusable = None
        elif t is L.ReLU:
            if fusable is not None and not fusable["relu"]:
                fusable["relu"] = 1         # in place on the conv/linear output
                relu_spec = fusable
                continue
            if m.inplace and cur is None:
                return None                 # would overwrite the caller's array
            spec = new_op(_OP_RELU, shape)
            fusable = None
        elif t is L.Flatten:
            nd = len(shape)
            start = m.start_dim + nd if m.start_dim < 0 else m.start_dim
            end = m.end_dim + nd if m.end_dim < 0 else m.end_dim
            if not (0 <= start <= end < nd):
                return None
            out = shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:]
            if cur is not None:
                cur, grad = cur.reshape(out), grad.reshape(out)
            shape = out
            fusable = None
            continue
        elif t is L.Identity or (t is L.Dropout and not m.training):
            continue
        else:
            return None
        cur, grad = spec["y"], spec["dy"]
        shape = tuple(cur.shape)
    if not specs:
        return None
    plan.out_shape = shape
    plan.out_buf, plan.grad_buf = cur.reshape(shape), grad.reshape(shape)
    plan.last = modules[len(modules) - 1]
    return specs
