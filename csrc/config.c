/* Run-time configuration: thread count, CPU path (portable or AVX2+FMA), build facts. */
#include <stdlib.h>
#include <string.h>
#include "cnnx.h"
#include "cnnx_internal.h"

int cnnx_avx2_active = 0;
int cnnx_flush_denormal = 1;
#ifdef _OPENMP
volatile double cnnx_team_end = -1e300; /* when the last parallel region ended (omp_get_wtime; cnnx_team_awake) */
#endif
static int cnnx_portable_forced = 0;
static int cnnx_nthreads = 0; /* 0: not yet set, use the OpenMP default (OMP_NUM_THREADS or all cores) */

static int cpu_has_avx2_fma(void)
{
#if CNNX_HAVE_X86_DISPATCH
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* Called once when the extension is imported: reads CNNX_FORCE_PORTABLE and the CPU's features. */
void cnnx_init_cpu(void)
{
    const char *env = getenv("CNNX_FORCE_PORTABLE");
    cnnx_portable_forced = env && env[0] && strcmp(env, "0") != 0;
    cnnx_avx2_active = !cnnx_portable_forced && cpu_has_avx2_fma();
    const char *flush = getenv("CNNX_FLUSH_DENORMAL");
    if (flush && flush[0])
        cnnx_flush_denormal = strcmp(flush, "0") != 0;
}

int cnnx_force_portable(int on)
{
    if (on >= 0) {
        cnnx_portable_forced = on != 0;
        cnnx_avx2_active = !cnnx_portable_forced && cpu_has_avx2_fma();
    }
    return cnnx_portable_forced;
}

const char *cnnx_simd_path(void) { return cnnx_avx2_active ? "avx2+fma" : "portable"; }

int cnnx_have_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int cnnx_threads(void)
{
#ifdef _OPENMP
    return cnnx_nthreads > 0 ? cnnx_nthreads : omp_get_max_threads();
#else
    return 1;
#endif
}

int cnnx_get_num_threads(void) { return cnnx_threads(); }

int cnnx_set_num_threads(int n)
{
    const int old = cnnx_threads();
    cnnx_nthreads = n > 0 ? n : 0;
    return old;
}

int cnnx_set_flush_denormal(int on)
{
    const int old = cnnx_flush_denormal;
    if (on >= 0)
        cnnx_flush_denormal = on != 0;
    return old;
}

int cnnx_flush_denormal_supported(void) { return CNNX_FP_FLUSH_BITS != 0; }

#if defined(_MSC_VER)
#define CNNX_THREAD_LOCAL __declspec(thread)
#else
#define CNNX_THREAD_LOCAL _Thread_local
#endif
static CNNX_THREAD_LOCAL cnnx_fpenv fpenv_saved;
static CNNX_THREAD_LOCAL int fpenv_depth;

void cnnx_fpenv_enter(void)
{
    if (fpenv_depth++ == 0) {
        fpenv_saved = cnnx_fp_read();
        cnnx_fp_set_flush(cnnx_flush_denormal ? CNNX_FP_FLUSH_BITS : 0);
    }
}

void cnnx_fpenv_leave(void)
{
    if (fpenv_depth > 0 && --fpenv_depth == 0)
        cnnx_fp_set_flush(fpenv_saved);
}

cnnx_fpenv cnnx_fp_caller(void) { return fpenv_depth > 0 ? fpenv_saved : cnnx_fp_read(); }

int cnnx_fp_flush_modes(int *out, int n)
{
    int team = 1;
    if (n < 1)
        n = 1;
    if (n > cnnx_threads())
        n = cnnx_threads();
#pragma omp parallel num_threads(n)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#pragma omp single
        team = omp_get_num_threads();
#endif
        out[t] = (cnnx_fp_read() & CNNX_FP_FLUSH_BITS) != 0;
    }
    return team;
}

const char *cnnx_compiler(void)
{
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#elif defined(_MSC_VER)
#define CNNX_STR_(x) #x
#define CNNX_STR(x) CNNX_STR_(x)
    return "msvc " CNNX_STR(_MSC_VER);
#else
    return "unknown";
#endif
}
