"""vcfast._C must link the shared C++ runtime (see cxx_runtime_linkage in vcfast/_extension.py).

On the first GPU machine the compiler found only libstdc++.a and copied it into the
extension; the copy's uninitialised locale crashed (SIGSEGV) on the first number a failing
C++ check formatted. setup.py now links libstdc++.so.6 by name; these tests keep it so and
check the ELF reader the import-time warning relies on.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from vcfast import _extension

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF: Linux only")


def _readelf_needed(path: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True)
    return [line.split("[", 1)[1].rstrip("]") for line in out.stdout.splitlines()
            if "(NEEDED)" in line]


@linux_only
def test_extension_links_the_shared_cxx_runtime():
    if not _extension.EXTENSION_LOADED:
        pytest.skip("vcfast._C not built")
    assert _extension.extension_cxx_runtime() == "shared"
    assert _extension.build_info()["extension_cxx_runtime"] == "shared"


@linux_only
@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils' readelf")
def test_elf_reader_agrees_with_readelf():
    import os

    paths = [os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")]
    if _extension.EXTENSION_LOADED:
        paths.append(sys.modules["vcfast._C"].__file__)
    for path in paths:
        assert _extension.elf_needed_libraries(path) == _readelf_needed(path), path


def test_elf_reader_rejects_other_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a binary")
    assert _extension.elf_needed_libraries(str(text)) is None
    assert _extension.elf_needed_libraries(str(tmp_path / "missing.so")) is None
    assert _extension.cxx_runtime_linkage(str(text)) == "unknown"


@linux_only
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("static", [False, True], ids=["shared", "static"])
def test_a_static_libstdcxx_copy_is_detected(tmp_path, static):
    """What the GPU machine's compiler did, made here with -static-libstdc++."""
    source = tmp_path / "format_number.cpp"
    source.write_text("#include <sstream>\n"
                      "std::string format_number(long x) { std::ostringstream s; s << x; "
                      "return s.str(); }\n")
    library = tmp_path / "format_number.so"
    flags = ["-static-libstdc++"] if static else []
    subprocess.run(["g++", "-shared", "-fPIC", *flags, str(source), "-o", str(library)],
                   check=True, capture_output=True)
    assert _extension.cxx_runtime_linkage(str(library)) == ("static" if static else "shared")


@linux_only
def test_extension_shares_torchs_openmp_runtime():
    """at::parallel_for is an inline `#pragma omp parallel` under torch's OpenMP backend: an
    extension built without -fopenmp (as vcfast._C was until setup.py added it) runs every
    C++ CPU kernel on one thread whatever torch.set_num_threads says. Built with it, the
    extension links libgomp.so.1, which resolves to the copy torch loaded."""
    if not _extension.EXTENSION_LOADED:
        pytest.skip("vcfast._C not built")
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend is not OpenMP")
    needed = _extension.elf_needed_libraries(sys.modules["vcfast._C"].__file__)
    assert any(n.startswith(("libgomp", "libomp", "libiomp")) for n in needed), needed
