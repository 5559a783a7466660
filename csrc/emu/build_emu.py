"""Build the CPU-emulation variant of ``lora_kernels._C`` (see emu.h) with the host C++ compiler.

    python csrc/emu/build_emu.py [OUT_DIR]      # prints the path of the built module

The module has the same Python API as the real one but runs every kernel on host memory, so
tests can pass ``tensor.data_ptr()`` of CPU tensors. Needs g++ (C++20), the CUDA headers (for
cuda_fp16.h / cuda_bf16.h / vector types; no CUDA library is linked) and pybind11. The result is
cached under OUT_DIR by a hash of the sources and flags.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent
ROOT = CSRC.parent


def cuda_include() -> Path | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.insert(0, str(Path(os.path.realpath(nvcc)).parent.parent))
    homes.append("/usr/local/cuda")
    for home in homes:
        if home and (Path(home) / "include" / "cuda_fp16.h").is_file():
            return Path(home) / "include"
    return None


def build(out_dir: str | os.PathLike | None = None, *, jobs: int = 2) -> Path:
    import pybind11

    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"{cxx} not found")
    inc = cuda_include()
    if inc is None:
        raise RuntimeError("CUDA headers (cuda_fp16.h) not found")
    sources = sorted(CSRC.glob("*.cu")) + [CSRC / "bindings.cpp", CSRC / "emu" / "emu.cpp"]
    headers = sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")) + [CSRC / "emu" / "emu.h"]
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-DLK_EMULATE", "-DNDEBUG",
             "-include", str(CSRC / "emu" / "emu.h"), f"-I{CSRC}", f"-I{inc}",
             f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
             "-fvisibility=hidden", "-w"]
    h = hashlib.sha1()
    for p in sources + headers:
        h.update(p.read_bytes())
    h.update(" ".join([cxx, *flags, sys.version]).encode())
    out_dir = Path(out_dir or ROOT / "build" / "emu")
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = out_dir / f"{h.hexdigest()[:16]}" / f"_C{suffix}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:  # concurrent test workers build once
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:
            pass
        if target.exists():
            return target
        _compile(cxx, flags, sources, target, jobs)
    return target


def _compile(cxx, flags, sources, target: Path, jobs: int) -> None:
    objdir = target.parent / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    procs, objs = [], []
    for src in sources:
        obj = objdir / (src.name + ".o")
        log = open(objdir / (src.name + ".log"), "w")  # noqa: SIM115 (closed below)
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        cmd = [cxx, *flags, "-c", *lang, str(src), "-o", str(obj)]
        procs.append((src, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        objs.append(obj)
        while sum(p.poll() is None for _, _, p in procs) >= jobs:
            next(p for _, _, p in procs if p.poll() is None).wait()
    errors = []
    for src, log, p in procs:
        p.wait()
        log.close()
        if p.returncode != 0:
            errors.append(f"{src.name}:\n" + (objdir / (src.name + ".log")).read_text()[-8000:])
    if errors:
        raise RuntimeError("emulation build failed:\n" + "\n".join(errors))
    tmp = target.with_suffix(".tmp")
    subprocess.run([cxx, "-shared", "-pthread", *map(str, objs), "-o", str(tmp)], check=True)
    tmp.replace(target)


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else None))
