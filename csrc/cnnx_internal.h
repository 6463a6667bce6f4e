/* Internal to the C core: CPU-path dispatch, threading and the GEMM used by conv2d.c. */
#ifndef CNNX_INTERNAL_H
#define CNNX_INTERNAL_H

#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define CNNX_HAVE_X86_DISPATCH 1
#else
#define CNNX_HAVE_X86_DISPATCH 0
#endif

/* Set once by cnnx_init_cpu() (config.c): 1 when the CPU has AVX2+FMA and the portable path is not forced. */
extern int cnnx_avx2_active;
#if CNNX_HAVE_X86_DISPATCH
#define CNNX_USE_AVX2 cnnx_avx2_active
#else
#define CNNX_USE_AVX2 0
#endif

/* Thread count for every parallel region (an explicit num_threads clause, so the setting is global,
 * not per calling thread as omp_set_num_threads would be). */
int cnnx_threads(void);

/*
 * Every parallel region is written
 *     CNNX_PARALLEL(worth_it, {
 *         ...
 *         CNNX_OMP_FOR
 *         for (int64_t t = 0; t < ntasks; t++) ...
 *     });
 * The block runs as an OpenMP parallel region on cnnx_threads() threads when worth_it holds and more than one
 * thread is set; otherwise it is called directly on this thread, where its worksharing constructs bind to this
 * thread alone (an orphaned `omp for` runs every iteration, an orphaned barrier is a no-op): the same
 * iterations in the same order as a one-thread team, so the same bits. Why: entering a region costs ~0.4 us
 * even when the `if` clause makes it run on one thread (libgomp starts a team of one and ends it through two
 * barriers, each a futex system call), and a batch-1 LeNet-5 training step runs ~15 kernels, each too small to
 * share. A macro argument cannot hold a #pragma line, so the constructs inside are the _Pragma forms below, and
 * the team's size and this thread's place in it are cnnx_team_size() and cnnx_team_rank().
 */
#ifdef _OPENMP
extern volatile double cnnx_team_end;
#define CNNX_PARALLEL(worth_it, ...)                                                     \
    do {                                                                                 \
        if ((worth_it) && cnnx_threads() > 1) {                                          \
            _Pragma("omp parallel num_threads(cnnx_threads())") __VA_ARGS__              \
            cnnx_team_end = omp_get_wtime();                                             \
        } else {                                                                         \
            __VA_ARGS__                                                                  \
        }                                                                                \
    } while (0)
static inline int64_t cnnx_team_size(void) { return omp_get_num_threads(); }
static inline int64_t cnnx_team_rank(void) { return omp_get_thread_num(); }
/* Whether the worker threads are likely still awake: a parallel region ended less than 100 us ago. After a
 * region, the OpenMP runtime keeps its workers spinning for a while (libgomp: GOMP_SPINCOUNT, ~0.3 ms by
 * default; LLVM's: KMP_BLOCKTIME, 200 ms), and then puts them to sleep, from which a wake-up costs tens of
 * microseconds on a VM. A small elementwise kernel can then share its work when the threads are awake (the
 * optimizer step right after a batch's backward) and keep it on one thread when they are not (a batch-1 step,
 * whose kernels are all serial). cnnx_team_end is written by whichever thread ran the region last; with
 * several callers at once a stale time only changes this guess (an aligned double is stored whole on every
 * platform cnnx targets), and results never depend on it. */
static inline int cnnx_team_awake(void) { return omp_get_wtime() - cnnx_team_end < 100e-6; }
#else
#define CNNX_PARALLEL(worth_it, ...) do { __VA_ARGS__ } while (0)
static inline int64_t cnnx_team_size(void) { return 1; }
static inline int64_t cnnx_team_rank(void) { return 0; }
static inline int cnnx_team_awake(void) { return 0; }
#endif
#define CNNX_OMP_FOR _Pragma("omp for schedule(static)")
#define CNNX_OMP_FOR_NOWAIT _Pragma("omp for schedule(static) nowait")
#define CNNX_OMP_SINGLE _Pragma("omp single")
/* A status set from inside a region: CNNX_OMP_CRITICAL_STATUS status = CNNX_ENOMEM; */
#define CNNX_OMP_CRITICAL_STATUS _Pragma("omp critical(cnnx_status)")

/* Subnormals (cnnx_set_flush_denormal). On x86 each float operation with a subnormal operand or result costs
 * a microcode assist, ~100x a normal one: a converged model's decaying momentum buffers and small gradients
 * are full of them. With the setting on (the default), every kernel call flushes them on each thread that runs
 * it. The door brackets the call with cnnx_fpenv_enter/leave on the calling thread, and every parallel region
 * is written
 *     const cnnx_fpenv fp = cnnx_fp_caller();
 *     CNNX_PARALLEL(worth_it, {
 *         cnnx_fp_worker_enter();
 *         ...
 *         cnnx_fp_worker_leave(fp);
 *     });
 * An OpenMP worker is a thread of its own, with its own MXCSR/FPCR, and one the runtime creates inside a
 * kernel call inherits the caller's flushing mode: so a worker leaves with the caller's own bits (fp, taken
 * before the call set anything), not with the ones it found. Thread 0 is the caller: the door restores it.
 * Only the flush bits are touched, so exception flags raised inside the call stay raised, as numpy leaves
 * them. */
extern int cnnx_flush_denormal;
typedef uint64_t cnnx_fpenv;
#if defined(__x86_64__) || defined(_M_X64)
#define CNNX_FP_FLUSH_BITS 0x8040u          /* MXCSR: FTZ (bit 15), DAZ (bit 6) */
static inline cnnx_fpenv cnnx_fp_read(void) { return _mm_getcsr(); }
static inline void cnnx_fp_write(cnnx_fpenv v) { _mm_setcsr((unsigned int)v); }
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#define CNNX_FP_FLUSH_BITS (1u << 24)       /* FPCR.FZ */
static inline cnnx_fpenv cnnx_fp_read(void)
{
    uint64_t v;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(v));
    return v;
}
static inline void cnnx_fp_write(cnnx_fpenv v) { __asm__ __volatile__("msr fpcr, %0" : : "r"(v)); }
#else
#define CNNX_FP_FLUSH_BITS 0u               /* no control bits known: nothing is flushed */
static inline cnnx_fpenv cnnx_fp_read(void) { return 0; }
static inline void cnnx_fp_write(cnnx_fpenv v) { (void)v; }
#endif
/* This thread's flush bits set to those of `bits` (a value read by cnnx_fp_read). */
static inline void cnnx_fp_set_flush(cnnx_fpenv bits)
{
    const cnnx_fpenv now = cnnx_fp_read();
    const cnnx_fpenv want = (now & ~(cnnx_fpenv)CNNX_FP_FLUSH_BITS) | (bits & CNNX_FP_FLUSH_BITS);
    if (want != now)
        cnnx_fp_write(want);
}
/* The caller's own environment, as it was before the door's cnnx_fpenv_enter (config.c). */
cnnx_fpenv cnnx_fp_caller(void);
static inline void cnnx_fp_worker_enter(void)
{
    cnnx_fp_set_flush(cnnx_flush_denormal ? CNNX_FP_FLUSH_BITS : 0);
}
static inline void cnnx_fp_worker_leave(cnnx_fpenv caller)
{
    if (cnnx_team_rank() != 0)
        cnnx_fp_set_flush(caller);
}

#define CNNX_GEMM_MR_MAX 6
#define CNNX_GEMM_NR_MAX 16

/* The GEMM path to use for one whole kernel call: 1 = AVX2+FMA, 0 = portable. */
int cnnx_gemm_path(void);
/* Scratch sizes (elements): a packed (M, K) matrix, and the padded last column panel of B. */
int64_t cnnx_gemm_apack_size(int64_t M, int64_t K);
int64_t cnnx_gemm_bpad_size(int64_t K);
/* ... and a (N, K) matrix packed by cnnx_gemm_pack_b_*. */
int64_t cnnx_gemm_bpack_size(int64_t N, int64_t K);
/* The register tile of a path (rows x columns; dsize = sizeof(REAL)), for callers that weigh tile waste. */
void cnnx_gemm_tile_shape(int path, int dsize, int64_t *mr, int64_t *nr);

#define CNNX_GEMM_DECLARE(REAL, S)                                                                 \
/* Pack a (M, K), element (i, k) at a[i*rsa + k*csa], for cnnx_gemm_* on the same path. */          \
void cnnx_gemm_pack_a_##S(int path, REAL *apack, const REAL *a, int64_t rsa, int64_t csa, int64_t M, \
                          int64_t K);                                                              \
/* c (M, N) = or += bias + A @ B: row i of c at c + coff[i] (c + i*ldc if coff is NULL), A packed, row k \
 * of B at b + boff[k] (b + k*rsb if boff is NULL), N contiguous columns, bias (M,) or NULL. Rows of c    \
 * may overlap (they are stored one after another: a col2im in the store). wrap_w > 0: column q lands   \
 * at (q / wrap_w)*wrap_n + q % wrap_w, and only if q % wrap_w < wrap_n. bpad: cnnx_gemm_bpad_size(K)   \
 * elements of scratch. Single-threaded. */                                                        \
void cnnx_gemm_##S(int path, REAL *c, int64_t ldc, const int64_t *coff, const REAL *apack,          \
                   const REAL *b, const int64_t *boff, int64_t rsb, const REAL *bias, int64_t M,      \
                   int64_t N, int64_t K, int accumulate, int64_t wrap_w, int64_t wrap_n, REAL *bpad); \
/* c (M, N) = or += sum_{s < nseg} A_s @ B_s^T: row i of A_s at a + s*sa + i*lda, row j of B_s at      \
 * b + s*sb + boff[j], all K long. */                                                               \
void cnnx_gemm_nt_##S(int path, REAL *c, int64_t ldc, const REAL *a, int64_t lda, const REAL *b,    \
                      const int64_t *boff, int64_t M, int64_t N, int64_t K, int accumulate,         \
                      int64_t nseg, int64_t sa, int64_t sb);                                       \
/* part (33) += x (n) by lane: x[q] into part[q % 32] over whole 32-blocks, then part[q % 8] over      \
 * 8-blocks, the rest into part[32]; the same order on every path. */                              \
void cnnx_sum_into_##S(int path, REAL *part, const REAL *x, int64_t n);                            \
/* Pack w (N, K), element (j, k) at w[j*rsa + k*csa], as the B (K, N) of cnnx_gemm_gather_*. */     \
void cnnx_gemm_pack_b_##S(int path, REAL *bpack, const REAL *w, int64_t rsa, int64_t csa, int64_t N, \
                          int64_t K);                                                              \
/* c[j*ldc + q] (+)= bias[j] (0 if NULL) + sum_k src[qoff[q] + koff[k]] * B[k, j], q < M, j < N:     \
 * a transposed product whose M rows of A are gathered in place (q: output pixel, k: kernel tap). */ \
void cnnx_gemm_gather_##S(int path, REAL *c, int64_t ldc, const REAL *src, const int64_t *qoff,      \
                          const int64_t *koff, const REAL *bpack, const REAL *bias, int64_t M,       \
                          int64_t N, int64_t K, int accumulate);
CNNX_GEMM_DECLARE(float, f32)
CNNX_GEMM_DECLARE(double, f64)

/* A kernel's geometry struct (cnnx.h) as the glossary's letters, at the top of its body (a part of the kernel may
 * not need them all). */
#define CNNX_CONV_GEOM(g)                                                                                    \
    const int64_t N = (g)->N, C = (g)->C, H = (g)->H, W = (g)->W, OC = (g)->OC, KH = (g)->KH, KW = (g)->KW; \
    const int64_t SH = (g)->SH, SW = (g)->SW, PT = (g)->PT, PL = (g)->PL, DH = (g)->DH, DW = (g)->DW;     \
    const int64_t G = (g)->G, OH = (g)->OH, OW = (g)->OW;                                                 \
    (void)(N + C + H + W + OC + KH + KW + SH + SW + PT + PL + DH + DW + G + OH + OW) /* not all used */
#define CNNX_POOL_PLANES(g) const int64_t NC = (g)->NC, H = (g)->H, W = (g)->W, OH = (g)->OH, OW = (g)->OW
#define CNNX_POOL_WINDOW(g)                                                                                  \
    const int64_t KH = (g)->KH, KW = (g)->KW, SH = (g)->SH, SW = (g)->SW, PH = (g)->PH, PW = (g)->PW;     \
    const int64_t DH = (g)->DH, DW = (g)->DW

/* maxpool2x2_relu_forward's work on NC planes, single-threaded (pool2d.c, for the fused convolution). */
void cnnx_max2x2_relu_planes_f32(float *y, uint8_t *code, const float *x, int64_t NC, int64_t H, int64_t W,
                                 int64_t OH, int64_t OW);
void cnnx_max2x2_relu_planes_f64(double *y, uint8_t *code, const double *x, int64_t NC, int64_t H, int64_t W,
                                 int64_t OH, int64_t OW);
/* The same from NC planes whose output pixels are stored tap-major: plane p holds the windows' top-left taps,
 * then their top-right, bottom-left and bottom-right ones, Q (= OH*OW windows) each: x + p*4*Q + t*Q + window
 * (the fused convolution's gather product writes them so). The same values and codes, bit for bit. */
void cnnx_max2x2_relu_taps_f32(float *y, uint8_t *code, const float *x, int64_t NC, int64_t Q);
void cnnx_max2x2_relu_taps_f64(double *y, uint8_t *code, const double *x, int64_t NC, int64_t Q);


/* The gradient a ReLU -> 2x2 max pool passes to the pool's winner: (0 + dy) * (y > 0 ? 1 : 0), y the pooled output
 * (y > 0 exactly when the winning input is), as maxpool2x2_relu_backward and conv2d_pooled_backward_weight
 * compute it. The mask is a load from {0, 1}: written as ?: or a cast, gcc compiles it to a jump, which the
 * ReLU's random zeros mispredict. */
static inline float cnnx_relu_pool_grad_f32(float dy, float y)
{
    static const float mask[2] = {0, 1};
    return (0.0f + dy) * mask[y > 0];
}
static inline double cnnx_relu_pool_grad_f64(double dy, double y)
{
    static const double mask[2] = {0, 1};
    return (0.0 + dy) * mask[y > 0];
}

#endif
