"""Loads the compiled extension vcfast._C and reports which backends can run.

`import vcfast` must work without the extension (for example on a machine where the
build was skipped or failed): the reference and Triton backends need only PyTorch.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import struct
import sys
import warnings

import torch

_load_error: str | None = None

try:
    importlib.import_module("vcfast._C")
    EXTENSION_LOADED = True
except ImportError as exc:  # the build was skipped, failed, or is for another torch
    EXTENSION_LOADED = False
    _load_error = str(exc)
    warnings.warn(
        "vcfast: the compiled extension vcfast._C could not be loaded "
        f"({exc}); the 'cpu' and 'cuda' backends are unavailable, 'reference' (and 'triton' "
        "where Triton runs) remain. Rebuild with: pip install --no-build-isolation -e .",
        RuntimeWarning,
        stacklevel=2,
    )


def elf_needed_libraries(path: str) -> list[str] | None:
    """The DT_NEEDED entries (shared libraries it links) of a 64-bit little-endian ELF file.

    None when ``path`` is not such a file (another OS or architecture, or not a binary).
    Pure Python so that it works where binutils' ``readelf`` is not installed.
    """
    try:
        with open(path, "rb") as f:
            return _read_needed(f)
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return None


def _read_needed(f) -> list[str] | None:
    # Only the headers, the dynamic table and the names are read: vcfast._C is tens of MB.
    def read(offset: int, size: int) -> bytes:
        f.seek(offset)
        return f.read(size)

    header = read(0, 64)
    if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:  # ELFCLASS64, LSB
        return None
    (phoff,) = struct.unpack_from("<Q", header, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
    table = read(phoff, phentsize * phnum)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", table, i * phentsize)
        if p_type == 1:  # PT_LOAD: maps file offsets to the addresses DT_STRTAB uses
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []
    entries = read(*dynamic)
    needed, strtab = [], None
    for off in range(0, len(entries) - 15, 16):
        tag, value = struct.unpack_from("<qQ", entries, off)
        if tag == 0:  # DT_NULL ends the table
            break
        if tag == 1:  # DT_NEEDED: an offset into the string table
            needed.append(value)
        elif tag == 5:  # DT_STRTAB: the string table's address
            strtab = next((value - vaddr + offset for vaddr, offset, size in loads
                           if vaddr <= value < vaddr + size), None)
    if strtab is None:
        return None
    names = []
    for n in needed:
        raw = b""
        while b"\0" not in raw:  # one 256-byte read for any real soname
            chunk = read(strtab + n + len(raw), 256)
            if not chunk:
                raise ValueError("unterminated string in the ELF string table")
            raw += chunk
        names.append(raw.split(b"\0", 1)[0].decode())
    return names


@functools.cache
def extension_cxx_runtime() -> str:
    """How vcfast._C links the C++ runtime: ``"shared"``, ``"static"`` or ``"unknown"``.

    ``"static"`` (no libstdc++/libc++ among the libraries it links) means the compiler copied
    libstdc++ into the extension: that second copy's locale is never initialised, and the
    first C++ check that formats a number into its error message crashes the process
    (SIGSEGV) instead of raising. setup.py links the shared one by name to prevent it.
    """
    if not EXTENSION_LOADED or not sys.platform.startswith("linux"):
        return "unknown"
    return cxx_runtime_linkage(sys.modules["vcfast._C"].__file__)


def cxx_runtime_linkage(path: str) -> str:
    """``"shared"`` when the ELF shared object at ``path`` links libstdc++/libc++,
    ``"static"`` when it links neither, ``"unknown"`` when it is not a 64-bit ELF file."""
    needed = elf_needed_libraries(path)
    if needed is None:
        return "unknown"
    links_runtime = any(n.startswith(("libstdc++.so", "libc++.so")) for n in needed)
    return "shared" if links_runtime else "static"


if extension_cxx_runtime() == "static":
    warnings.warn(
        "vcfast: the compiled extension vcfast._C carries its own static copy of libstdc++ "
        "(the compiler that built it found only libstdc++.a): an error raised by a C++ kernel "
        "would crash the process instead of raising. Rebuild with this version's setup.py, "
        "which links the shared libstdc++: pip install --no-build-isolation -e .",
        RuntimeWarning,
        stacklevel=2,
    )


def cpu_isa() -> str | None:
    """The instruction-set level the C++ CPU kernels run their hot loops at now:
    ``"baseline"`` (x86-64 SSE2), ``"avx2"`` (AVX2 + FMA) or ``"avx512"``; None without
    vcfast._C.

    The best level the CPU executes, capped by ``ATEN_CPU_CAPABILITY`` (forcing PyTorch's AVX2
    path forces this one too), by ``VCFAST_CPU_ISA`` or by :func:`set_cpu_isa`
    (docs/architecture.md#cpu-instruction-sets).
    """
    return sys.modules["vcfast._C"].cpu_isa() if EXTENSION_LOADED else None


def cpu_isa_supported() -> str | None:
    """The best instruction-set level this CPU executes (None without vcfast._C)."""
    return sys.modules["vcfast._C"].cpu_isa_supported() if EXTENSION_LOADED else None


def set_cpu_isa(isa: str) -> str:
    """Run the C++ CPU kernels at ``isa`` (``"baseline"``, ``"avx2"``, ``"avx512"``, or
    ``"auto"`` for the default); returns the previous level, so it can be restored.

    Raises ValueError for an unknown level or one this CPU cannot execute, RuntimeError
    without vcfast._C. Process-wide: meant for benchmarks and tests of every path.
    """
    if not EXTENSION_LOADED:
        raise RuntimeError(f"vcfast.set_cpu_isa: the compiled extension vcfast._C is not loaded "
                           f"({_load_error})")
    if not isinstance(isa, str):
        raise TypeError(f"vcfast.set_cpu_isa: isa must be a str, got {type(isa).__name__}")
    return sys.modules["vcfast._C"].set_cpu_isa(isa)


def extension_has_cuda() -> bool:
    """True when vcfast._C was compiled with the CUDA kernels."""
    return EXTENSION_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
        "vcfast::log_spectrogram", "CUDA"
    )


# Checked once at import: a plain bool is also what torch.compile can trace without a cache.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the triton package is installed (GPU launch or TRITON_INTERPRET=1 on CPU)."""
    return _TRITON_AVAILABLE


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends() -> dict[str, bool]:
    """Which backends can run here.

    - ``reference``: plain PyTorch, always.
    - ``cpu``: the C++ kernels in vcfast._C.
    - ``cuda``: the CUDA C++ kernels (compiled in and a GPU visible).
    - ``triton``: Triton kernels on a GPU, or on CPU tensors under TRITON_INTERPRET=1.
    """
    gpu = torch.cuda.is_available()
    return {
        "reference": True,
        "cpu": EXTENSION_LOADED,
        "cuda": extension_has_cuda() and gpu,
        "triton": triton_available() and (gpu or triton_interpret()),
    }


def build_info() -> dict[str, object]:
    """What was compiled and why a backend is missing, for bug reports."""
    return {
        "extension_loaded": EXTENSION_LOADED,
        "extension_error": _load_error,
        "extension_has_cuda": extension_has_cuda(),
        "extension_cxx_runtime": extension_cxx_runtime(),
        "cpu_isa": cpu_isa(),
        "cpu_isa_supported": cpu_isa_supported(),
        "cuda_available": torch.cuda.is_available(),
        "triton_available": triton_available(),
        "triton_interpret": triton_interpret(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


_HAS_OP: dict[str, bool] = {}


def has_op(name: str) -> bool:
    """True when vcfast._C registered ``vcfast::<name>`` (builds may predate newer ops)."""
    if name not in _HAS_OP:
        try:
            getattr(torch.ops.vcfast, name)
            _HAS_OP[name] = EXTENSION_LOADED
        except (AttributeError, RuntimeError):
            _HAS_OP[name] = False
    return _HAS_OP[name]
