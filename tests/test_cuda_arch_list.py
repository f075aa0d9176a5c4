"""The CUDA extension runs on every GPU from its lowest target up, Blackwell (sm_100) included.

The driver JIT-compiles PTX only for an architecture at or above the PTX's own, so a build
with SASS for a list of targets plus PTX for the newest alone (compute_120) has nothing to
run on sm_100 or any other GPU between its SASS targets and 12.0. setup.py's default
TORCH_CUDA_ARCH_LIST therefore also ships PTX for its lowest architecture.
"""

import os
import pathlib
import re

import pytest

from vcfast import aot

SETUP = pathlib.Path(__file__).resolve().parents[1] / "setup.py"


def _default_arch_list() -> str:
    m = re.search(r'setdefault\("TORCH_CUDA_ARCH_LIST", "([^"]+)"\)', SETUP.read_text())
    assert m, "setup.py no longer sets a default TORCH_CUDA_ARCH_LIST"
    return m.group(1)


def _arch_flags(arch_list: str) -> tuple[set[int], set[int]]:
    """(SASS architectures, PTX architectures) nvcc gets for ``arch_list``, as torch parses it."""
    from torch.utils import cpp_extension

    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    sass = {int(a) for a in re.findall(r"code=sm_(\d+)", " ".join(flags))}
    ptx = {int(a) for a in re.findall(r"code=compute_(\d+)", " ".join(flags))}
    return sass, ptx


def test_default_arch_list_ships_ptx_for_its_lowest_target():
    sass, ptx = _arch_flags(_default_arch_list())
    assert min(ptx) <= min(sass), (sorted(sass), sorted(ptx))
    assert max(ptx) == max(sass)  # and for the newest, so it does not fall back to old PTX
    assert 90 in sass  # H100 keeps its SASS


def test_built_extension_has_ptx_for_its_lowest_target():
    from vcfast import _extension

    if not _extension.extension_has_cuda():
        pytest.skip("vcfast._C was built without its CUDA kernels (or is not built)")
    if aot._tool("cuobjdump") is None:
        pytest.skip("no cuobjdump (Triton's or the CUDA toolkit's)")
    contents = aot.cuda_binary_contents()
    elf = {int(a.removeprefix("sm_")) for a in contents["elf"]}
    ptx = {int(a.removeprefix("sm_")) for a in contents["ptx"]}
    default_sass, default_ptx = _arch_flags(_default_arch_list())
    if elf != default_sass:
        pytest.skip(f"vcfast._C was built for TORCH_CUDA_ARCH_LIST other than the default "
                    f"(SASS {sorted(elf)}), e.g. the single-architecture build of a GPU check")
    assert ptx == default_ptx, contents
