"""Builds vcfast._C, the C++ (always) and CUDA (when possible) extension.

CUDA sources compile whenever torch is a CUDA build and a CUDA toolkit (nvcc) is found,
with or without a GPU present, so a GPU-less CI still proves every .cu file compiles.
Environment knobs:
  VCFAST_BUILD_CUDA=0      force a CPU-only build
  CUDA_HOME                toolkit location (defaults to /usr/local/cuda when nvcc is there)
  TORCH_CUDA_ARCH_LIST     GPU architectures (defaults to common consumer + datacenter GPUs)
  MAX_JOBS                 parallel compile jobs (defaults to what CPU count and free memory allow)
"""

import glob
import os
import sys

from setuptools import setup

# torch.utils.cpp_extension reads CUDA_HOME at import time; without it, it may pick a
# pip-installed CUDA runtime that has no libcudart.so to link against.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised only on a broken install
    sys.exit("vcfast: install PyTorch first (pip install torch==2.14.1), then "
             "pip install --no-build-isolation -e .")


def _default_max_jobs() -> str:
    # Each nvcc/g++ job on a torch header set peaks around 1.5-2 GB.
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free_gb = int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        free_gb = 4.0
    return str(max(1, min(os.cpu_count() or 1, int(free_gb // 2))))


os.environ.setdefault("MAX_JOBS", _default_max_jobs())


def _cuda_build_reason() -> str | None:
    """None when CUDA sources should be built, else why not (printed once)."""
    if os.environ.get("VCFAST_BUILD_CUDA", "1") == "0":
        return "VCFAST_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME to a directory with bin/nvcc)"
    return None


root = os.path.dirname(os.path.abspath(__file__))
include_dirs = [os.path.join(root, "csrc", "include"), os.path.join(root, "csrc")]
# No errno or FP-trap semantics are needed; without these GCC will not vectorise sqrt and
# the guarded divisions of the per-bin loops. torch adds the C++ standard it needs (C++20).
cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
# at::parallel_for is an inline `#pragma omp parallel` (ATen/ParallelOpenMP.h) when torch's
# parallel backend is OpenMP: compiled without -fopenmp, every C++ CPU kernel ran on one
# thread whatever torch.set_num_threads said. Linked as libgomp.so.1, it resolves to the copy
# torch already loaded (same soname), so the kernels share torch's thread pool.
openmp = sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info()
if openmp:
    cxx_flags.append("-fopenmp")
# Link the shared libstdc++ by name: a toolchain whose g++ finds only libstdc++.a (seen on
# the first GPU machine: a /opt/gcc wrapper) otherwise copies libstdc++ into vcfast._C, and
# that second copy's uninitialised locale crashes (SIGSEGV) on the first number a failing
# check formats into its error message. scripts/unwind_probe/ reproduces it.
link_flags = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []
if openmp:
    # By soname first (torch's own copy when its wheel bundles one: -L torch/lib comes before
    # the system directories), so a compiler that finds only libgomp.a cannot copy a second
    # OpenMP runtime into the extension, as happened with libstdc++ above.
    if os.path.exists(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")):
        link_flags.append("-l:libgomp.so.1")
    link_flags.append("-fopenmp")
sources = (["csrc/ops.cpp"] + sorted(glob.glob("csrc/checks/*.cpp"))
           + sorted(glob.glob("csrc/cpu/*.cpp")))

reason = _cuda_build_reason()
if reason is None:
    # Consumer GPUs (Turing, Ampere, Ada, Blackwell) plus A100/H100 as SASS. PTX for the
    # lowest (compute_75) and the highest (compute_120): the driver JIT-compiles PTX only for
    # an architecture at or above the PTX's, so with compute_120 alone sm_100 (B200) and any
    # other GPU between 9.0 and 12.0 would find no kernel at all; compute_75 runs on each.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5+PTX;8.0;8.6;8.9;9.0;12.0+PTX")
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    extension = cpp_extension.CUDAExtension(
        "vcfast._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("VCFAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )
    print(f"vcfast: building C++ and CUDA kernels (CUDA {torch.version.cuda}, "
          f"toolkit {cpp_extension.CUDA_HOME}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})")
else:
    extension = cpp_extension.CppExtension(
        "vcfast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
    print(f"vcfast: building CPU-only extension: CUDA kernels skipped because {reason}")

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
