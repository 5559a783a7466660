"""Build: the pure-Python package, plus the CUDA module ``lora_kernels._C`` when nvcc is found.

The CUDA module is torch-free (pybind11 + the CUDA runtime, linked statically) and is built by
CMake from ``CMakeLists.txt`` / ``csrc/``. Environment variables:

* ``LORA_KERNELS_CUDA_ARCHS``   SM list, e.g. ``"80;90"`` (default) or ``"80,86,90"``.
* ``LORA_KERNELS_NO_CUDA=1``    skip the CUDA module even if nvcc exists.
* ``CUDA_HOME`` / ``CUDA_PATH`` where to look for ``bin/nvcc`` (after ``PATH``, before
  ``/usr/local/cuda``).
* ``CMAKE_BUILD_PARALLEL_LEVEL`` parallel compile jobs (default: the CPUs available).
* ``LORA_KERNELS_BUILD_DIR``    CMake build directory (default ``build/cmake-<config hash>`` in the
  source tree, reused by later builds with the same configuration, so a rebuild is incremental).

When nvcc is absent the build prints one line and installs the pure-Python package; when nvcc is
present a failing CUDA build fails the install (it is never silently dropped).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90"


def find_nvcc() -> str | None:
    """nvcc from PATH, then $CUDA_HOME / $CUDA_PATH, then /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return os.path.realpath(found)
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home:
            cand = Path(home) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand.resolve())
    return None


def cuda_archs() -> str:
    """``LORA_KERNELS_CUDA_ARCHS`` normalised to CMake's form ("80;90")."""
    raw = os.environ.get("LORA_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = []
    for tok in raw.replace(",", ";").replace(" ", ";").split(";"):
        tok = tok.strip().lower().removeprefix("sm_").removeprefix("compute_")
        if not tok:
            continue
        if "." in tok:  # "8.0" -> "80"
            tok = tok.replace(".", "")
        base = tok.removesuffix("-real").removesuffix("-virtual").removesuffix("a")
        if not base.isdigit():
            raise SystemExit(f"LORA_KERNELS_CUDA_ARCHS: cannot parse {tok!r} in {raw!r}; "
                             "expected e.g. '80;90'")
        archs.append(tok)
    if not archs:
        raise SystemExit(f"LORA_KERNELS_CUDA_ARCHS={raw!r} names no architecture")
    return ";".join(archs)


def find_cmake() -> str:
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:  # the 'cmake' wheel from the build requirements
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError as e:
        raise SystemExit("lora_kernels: building the CUDA module needs cmake >= 3.24 "
                         "(pip install cmake)") from e


def parallel_level() -> str:
    env = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL")
    if env:
        return env
    try:
        return str(max(1, len(os.sched_getaffinity(0))))
    except AttributeError:
        return str(os.cpu_count() or 1)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds ``CMakeLists.txt`` into the path setuptools expects for the ext
    (``inplace`` / editable installs then copy it next to ``lora_kernels/__init__.py``)."""

    def build_extension(self, ext: Extension) -> None:
        try:
            import pybind11
        except ImportError as e:
            raise SystemExit("lora_kernels: building the CUDA module needs pybind11 "
                             "(pip install pybind11)") from e

        nvcc = find_nvcc()
        archs = cuda_archs()
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_type = "Debug" if self.debug else "Release"

        key = "|".join([sys.executable, sys.version, pybind11.__version__, nvcc, archs,
                        build_type, sysconfig.get_config_var("EXT_SUFFIX") or ""])
        default_dir = ROOT / "build" / f"cmake-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        build_dir = Path(os.environ.get("LORA_KERNELS_BUILD_DIR", default_dir)).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        cmake = find_cmake()
        cfg = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCUDAToolkit_ROOT={Path(nvcc).parent.parent}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLORA_KERNELS_OUTPUT_DIR={out_dir}",
        ]
        if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        jobs = parallel_level()
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=jobs)
        print(f"lora_kernels: building the CUDA module lora_kernels._C (nvcc {nvcc}, "
              f"archs {archs}, {jobs} jobs, {build_dir})", flush=True)
        with _build_lock(build_dir):
            subprocess.run(cfg, check=True, env=env)
            subprocess.run([cmake, "--build", str(build_dir), "--target", "_C"], check=True,
                           env=env)
        if not out_path.exists():
            built = sorted(p.name for p in out_dir.glob("_C*"))
            raise SystemExit(f"lora_kernels: CMake did not produce {out_path} (found {built})")


class _build_lock:
    """An exclusive lock on the build directory, so concurrent installs do not interleave."""

    def __init__(self, build_dir: Path):
        self.path = build_dir / ".build.lock"

    def __enter__(self):
        self.fh = open(self.path, "w")
        try:
            import fcntl

            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no locking
            pass
        return self

    def __exit__(self, *exc):
        self.fh.close()
        return False


def extensions() -> list[Extension]:
    if os.environ.get("LORA_KERNELS_NO_CUDA", "0") not in ("", "0"):
        print("lora_kernels: LORA_KERNELS_NO_CUDA is set; skipping the CUDA module "
              "lora_kernels._C (pure-Python install)", flush=True)
        return []
    if find_nvcc() is None:
        print("lora_kernels: nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda); skipping the "
              "CUDA module lora_kernels._C (pure-Python install)", flush=True)
        return []
    return [CMakeExtension("lora_kernels._C")]


setup(ext_modules=extensions(), cmdclass={"build_ext": CMakeBuild})
