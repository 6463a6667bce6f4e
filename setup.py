"""Build the cnnx._kernels extension: csrc/*.c (the C core) + cnnx/_kernels.pyx (the Cython door).

Environment variables read at build time:

    CNNX_OPENMP=auto|on|off   auto (default): use OpenMP when a test program compiles and links with it;
                              on: the build fails when it does not; off: never use it.
    CNNX_LIBOMP_PREFIX=DIR    macOS: where libomp lives (include/omp.h, lib/libomp.dylib). Default: the
                              Homebrew prefixes /opt/homebrew/opt/libomp and /usr/local/opt/libomp.

Flags: -O3 (MSVC /O2), no -march=native, no -ffast-math: the wheel must run on any CPU of its
architecture and must not change the process's floating-point flags. CPU-specific code (AVX2+FMA)
is compiled per function with __attribute__((target(...))) and chosen at run time.

The build configuration (compiler, flags, OpenMP) is written to cnnx/_build_info.py next to the
compiled extension, as BUILD_INFO = {...}; cnnx.show_config() prints it.
"""
import os
import sys
import glob
import shutil
import platform
import tempfile
import subprocess
import sysconfig

import numpy as np
import Cython
from setuptools import setup, Extension
from setuptools.command.build_ext import build_ext
from Cython.Build import cythonize

# The C core keeps to OpenMP 2.0 (parallel, for, single, critical, barrier; no atomic write, collapse,
# tasks or simd), the level of MSVC's /openmp (_OPENMP == 200203), so Windows wheels get threads too.
OPENMP_MIN = 200203
OMP_TEST = r"""
#include <omp.h>
#include <stdio.h>
#if !defined(_OPENMP) || _OPENMP < %d
#error "OpenMP too old"
#endif
int main(void) {
    int n = 0, last = 0;
#pragma omp parallel reduction(+:n)
    {
        n += 1;
#pragma omp critical
        last = 1;
    }
    printf("%%d %%d %%d\n", omp_get_max_threads(), n, last);
    return (omp_get_max_threads() > 0 && n > 0 && last == 1) ? 0 : 1;
}
""" % OPENMP_MIN

HOMEBREW_LIBOMP = ("/opt/homebrew/opt/libomp", "/usr/local/opt/libomp")


def _openmp_candidates(compiler):
    """(label, compile_args, link_args) to try, best first."""
    if compiler.compiler_type == "msvc":
        # /openmp links vcomp140.dll, part of the Visual C++ redistributable, and is OpenMP 2.0, which
        # the C core keeps to. /openmp:llvm needs libomp140.x86_64.dll, which Microsoft does not
        # license for redistribution, so a wheel cannot carry it.
        return [("msvc /openmp", ["/openmp"], [])]
    candidates = []
    if sys.platform == "darwin":
        # Apple clang has no -fopenmp driver flag, but compiles OpenMP with -Xpreprocessor -fopenmp
        # against LLVM's libomp (Homebrew: brew install libomp).
        prefixes = [os.environ["CNNX_LIBOMP_PREFIX"]] if os.environ.get("CNNX_LIBOMP_PREFIX") else []
        prefixes += [p for p in HOMEBREW_LIBOMP if p not in prefixes]
        for prefix in prefixes:
            if os.path.exists(os.path.join(prefix, "include", "omp.h")):
                lib = os.path.join(prefix, "lib")
                candidates.append((f"libomp {prefix}",
                                   ["-Xpreprocessor", "-fopenmp", "-I" + os.path.join(prefix, "include")],
                                   ["-L" + lib, "-Wl,-rpath," + lib, "-lomp"]))
        candidates.append(("-Xpreprocessor -fopenmp -lomp", ["-Xpreprocessor", "-fopenmp"], ["-lomp"]))
    candidates.append(("-fopenmp", ["-fopenmp"], ["-fopenmp"]))
    return candidates


def _try_openmp(compiler, cflags, lflags):
    """Compile, link and run a tiny OpenMP program with these flags; True when all three work."""
    tmp = tempfile.mkdtemp(prefix="cnnx-omp-")
    try:
        src = os.path.join(tmp, "omp_test.c")
        with open(src, "w") as f:
            f.write(OMP_TEST)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
        compiler.link_executable(objs, "omp_test", output_dir=tmp, extra_postargs=lflags)
        exe = os.path.join(tmp, "omp_test" + (".exe" if sys.platform == "win32" else ""))
        if os.path.exists(exe):
            # Run it too: a libomp that links but cannot load (a missing dylib) would give an
            # extension that fails at import. (When cross-compiling, auto mode then drops OpenMP.)
            subprocess.run([exe], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=60)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compiler_version(compiler):
    """A one-line description of the C compiler, best effort."""
    if compiler.compiler_type == "msvc":
        return "MSVC " + (platform.python_compiler() or "")
    cc = getattr(compiler, "compiler_so", None) or getattr(compiler, "compiler", None) or ["cc"]
    try:
        out = subprocess.run([cc[0], "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0].strip() if out else cc[0]
    except Exception:
        return cc[0]


class BuildExt(build_ext):
    def build_extensions(self):
        mode = os.environ.get("CNNX_OPENMP", "auto").strip().lower()
        if mode not in ("auto", "on", "off"):
            raise SystemExit(f"cnnx: CNNX_OPENMP must be auto, on or off, got {mode!r}")
        openmp = None
        if mode != "off":
            for label, cflags, lflags in _openmp_candidates(self.compiler):
                if _try_openmp(self.compiler, cflags, lflags):
                    openmp = (label, cflags, lflags)
                    break
        if mode == "on" and openmp is None:
            raise SystemExit(f"cnnx: CNNX_OPENMP=on but the C compiler cannot build and run an OpenMP >= "
                             f"{OPENMP_MIN} program (Linux: install gcc's libgomp; macOS: brew install "
                             "libomp or set CNNX_LIBOMP_PREFIX; Windows: MSVC /openmp is OpenMP 2.0)")

        is_msvc = self.compiler.compiler_type == "msvc"
        if is_msvc:
            # /std:c11: MSVC's C mode knows the C99 `restrict` keyword only in C11/C17 mode (VS 2019 16.8+).
            cflags, lflags = ["/O2", "/std:c11"], []
        else:
            # -fno-math-errno: sqrt need not set errno, so the optimizer loops vectorise (results unchanged;
            # unlike -ffast-math it alters no rounding and no floating-point flags).
            cflags = ["-O3", "-std=c99", "-fno-strict-aliasing", "-fno-math-errno", "-fvisibility=hidden"]
            lflags = ["-s"] if sys.platform.startswith("linux") else []
        macros = [("CNNX_HAVE_OPENMP", "1")] if openmp else []
        if openmp:
            cflags += openmp[1]
            lflags += openmp[2]
        for ext in self.extensions:
            ext.extra_compile_args += cflags
            ext.extra_link_args += lflags
            ext.define_macros += macros
        print(f"cnnx: OpenMP {'enabled (' + openmp[0] + ')' if openmp else 'disabled'} "
              f"(CNNX_OPENMP={mode}); cflags {' '.join(cflags)}; ldflags {' '.join(lflags)}")
        super().build_extensions()
        self._write_build_info(mode, openmp, cflags, lflags)

    def _write_build_info(self, mode, openmp, cflags, lflags):
        info = {
            "compiler": _compiler_version(self.compiler),
            "compiler_type": self.compiler.compiler_type,
            "cflags": " ".join(cflags),
            "ldflags": " ".join(lflags),
            "openmp": bool(openmp),
            "openmp_via": openmp[0] if openmp else "",
            "openmp_request": mode,
            "platform": sysconfig.get_platform(),
            "python": platform.python_version(),
            "numpy_headers": np.__version__,
            "cython": Cython.__version__,
        }
        target = os.path.join(os.path.dirname(self.get_ext_fullpath("cnnx._kernels")), "_build_info.py")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write('"""How cnnx._kernels was built. Generated by setup.py at build time; not in git."""\n')
            f.write("BUILD_INFO = {\n")
            for key, value in info.items():
                f.write(f"    {key!r}: {value!r},\n")
            f.write("}\n")
        print(f"cnnx: wrote {target}")

    def run(self):
        super().run()
        if self.inplace:
            # setuptools builds into build_lib and then copies the extension into the source tree;
            # the build info has to follow it.
            built = os.path.join(self.build_lib, "cnnx", "_build_info.py")
            target = os.path.join(os.path.dirname(self.get_ext_fullpath("cnnx._kernels")), "_build_info.py")
            if os.path.exists(built) and os.path.abspath(built) != os.path.abspath(target):
                shutil.copyfile(built, target)
                print(f"cnnx: copied the build info to {target}")

    def get_outputs(self):
        # Declare the generated module so that install/bdist_wheel record it.
        outputs = super().get_outputs()
        if self.extensions:
            ext_dir = os.path.dirname(self.get_ext_fullpath("cnnx._kernels"))
            outputs.append(os.path.join(ext_dir, "_build_info.py"))
        return outputs


extensions = [
    Extension(
        "cnnx._kernels",
        sources=["cnnx/_kernels.pyx"] + sorted(glob.glob("csrc/*.c")),
        depends=sorted(glob.glob("csrc/*.h")) + sorted(glob.glob("cnnx/*.pxi")) + sorted(glob.glob("cnnx/*.pxd")),
        include_dirs=["csrc", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(extensions, language_level=3,
                          compiler_directives={"boundscheck": False, "wraparound": False,
                                               "cdivision": True, "initializedcheck": False}),
    cmdclass={"build_ext": BuildExt},
)
