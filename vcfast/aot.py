"""Ahead-of-time compile of every GPU kernel for real GPUs, without a GPU: resources per arch.

``kernel_report()`` compiles each Triton kernel of ``vcfast.kernels`` in every configuration
its launcher can pick (``aot_launch_configs()`` of each ``vcfast.ops.*_triton`` module, kept
next to the launch code) for each target architecture, and reads the CUDA kernels of the
built extension ``vcfast._C``; for every (kernel, configuration, target) it reports the
registers, shared memory (static, plus the dynamic amount the launch asks for), local memory
(register spills, and any stack the code needs) and threads, and whether the launch fits the
architecture's limits. ``format_kernel_report()`` prints it as a table.

How, with no GPU and no driver:

* Triton: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the
  whole pipeline to a cubin; the dynamic shared memory a launch asks for is the compiled
  kernel's ``metadata.shared`` (Triton allocates all of its shared memory dynamically).
  Registers, static shared and local bytes come from ``cuobjdump --dump-resource-usage`` on
  the cubin (the kernel object's n_regs / n_spills need a driver). Pointer arguments are
  compiled as 16-byte aligned (fresh allocations and the contiguous copies the launchers
  make), integer arguments as plain i32 (any value, any stride: no specialisation on 1 or
  on divisibility by 16).
* sm_89 reuses sm_86's PTX: Triton's passes branch on ``capability // 10`` and on sm_80
  alone, and the only sm_89 addition (fp8) is not used by these kernels, so the two PTX
  texts differ only in their ``.target`` line (tests/test_aot_kernels.py checks this); the
  sm_86 PTX is retargeted and assembled by Triton's own ptxas step for sm_89.
* CUDA: ``cuobjdump --list-elf --list-ptx`` and ``--dump-resource-usage`` on ``vcfast/_C*.so``
  list the architectures it ships and every kernel per architecture; every launch in
  ``csrc/cuda/*.cu`` is ``<<<grid, kThreads = 256, 0, stream>>>`` (no dynamic shared memory).

Not covered: the tiles between a kernel's default and its smallest (the launchers shrink
tiles for small problems; those need less than the default), label-table grad kernels for
pattern tables over 16 x 16, integer arguments specialised by Triton (value 1, multiples of
16) and the interpreter-only constexpr values (EMULATE_BF16_RNE, PRECISION_BF16_EMULATED,
USE_LIBDEVICE=False), which no GPU compiles.

Triton reads ``TRITON_INTERPRET`` when a kernel module is imported, and the test suite sets it
for CPU tests, so the compiles run in worker subprocesses without it (also a small process
pool). Nothing is cached on disk outside Triton's own cache (the retargeted sm_89 cubins are
stored there too, under a key derived from the sm_86 kernel's hash).
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence

__all__ = ["TARGETS", "SHARED_PER_BLOCK", "kernel_report", "format_kernel_report",
           "triton_configs", "cuda_binary_contents"]

TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90")

# Most shared memory one block may use (static + dynamic, the opt-in maximum) per arch.
SHARED_PER_BLOCK = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}
# The same on every arch above: registers per block and per SM, threads per block, and the
# granularity registers are allocated in (per warp).
REGISTERS_PER_BLOCK = 65536
MAX_THREADS_PER_BLOCK = 1024
REGISTER_ALLOCATION_UNIT = 256

# vcfast.ops.<name>_triton launches the kernels of vcfast.kernels.<name>.
TRITON_OPS = ("classification", "gradient_penalty", "label_conv", "norm_act", "spectrogram")

# Every CUDA launch in csrc/cuda/*.cu uses kThreads = 256 threads and no dynamic shared memory
# (tests/test_aot_kernels.py reads the sources to keep these true).
CUDA_LAUNCH_THREADS = 256
CUDA_DYNAMIC_SHARED = 0

# Targets whose Triton PTX is another target's with a different .target line (see above).
_SAME_PTX_AS = {"sm_89": "sm_86"}

# Relative compile cost, to spread the jobs over the workers (the tl.dot kernels are ~4x).
_HEAVY_OPS = {"spectrogram": 4}

_TRITON_TYPES = {
    "float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1",
}


# ---------------------------------------------------------------------------------------------
# Configurations


def _launch_configs(op: str) -> list[dict]:
    return importlib.import_module(f"vcfast.ops.{op}_triton").aot_launch_configs()


def _type_name(dtype) -> str:
    return _TRITON_TYPES[str(dtype).removeprefix("torch.")]


def _config_label(cfg: dict) -> str:
    flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                     for k, v in cfg["constexprs"].items())
    pointers = {name: _type_name(t) for name, t in cfg["args"].items() if t not in (float, int)}
    data = sorted(set(pointers.values()), key=list(_TRITON_TYPES.values()).index)
    stages = f" stages={cfg['num_stages']}" if "num_stages" in cfg else ""
    return f"{flags} warps={cfg['num_warps']}{stages} [{','.join(data)}]"


def triton_configs() -> list[dict]:
    """Every Triton kernel configuration the launchers can pick, as listed by the launchers.

    One dict per configuration: ``op``, ``index`` (in that op's list), ``kernel``
    (``<op>.<kernel name>``), ``config`` (a label), ``largest`` and the launcher's entry.
    """
    out = []
    for op in TRITON_OPS:
        for index, cfg in enumerate(_launch_configs(op)):
            out.append({"op": op, "index": index, "kernel": f"{op}.{cfg['kernel']}",
                        "config": _config_label(cfg), "largest": bool(cfg.get("largest")),
                        "entry": cfg})
    return out


# ---------------------------------------------------------------------------------------------
# Resource usage


def _tool(name: str) -> str | None:
    """A CUDA binary tool: the one shipped with Triton, else one on PATH / in CUDA_HOME."""
    try:
        import triton

        shipped = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.access(shipped, os.X_OK):
            return shipped
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(home, "bin", name)
    return candidate if os.access(candidate, os.X_OK) else None


_USAGE_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _parse_resource_usage(text: str) -> dict[str, dict[str, dict[str, int]]]:
    """``cuobjdump --dump-resource-usage`` output -> {arch: {mangled function: usage}}."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    arch, function = "", None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function "):
            function = line[len("Function "):].rstrip(":")
        elif function is not None and (m := _USAGE_RE.search(line)):
            reg, stack, shared, local = (int(v) for v in m.groups())
            out.setdefault(arch, {})[function] = {"registers": reg, "stack": stack,
                                                  "shared_static": shared, "local": local}
            function = None
    return out


def _cubin_usage(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    functions = [u for per_arch in _parse_resource_usage(text).values() for u in per_arch.values()]
    if len(functions) != 1:
        raise RuntimeError(f"expected one kernel in the cubin, cuobjdump printed:\n{text}")
    return functions[0]


def _max_threads(registers: int) -> int:
    """Largest block the register file admits for a kernel using ``registers`` per thread."""
    per_warp = -(-max(registers, 1) * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    return min(MAX_THREADS_PER_BLOCK, REGISTERS_PER_BLOCK // per_warp * 32)


def _finish_row(row: dict) -> dict:
    """Adds the derived columns and the verdict to a row that has its raw usage."""
    target = row["target"]
    row["shared_bytes"] = row["shared_static"] + row["shared_dynamic"]
    row["shared_limit"] = SHARED_PER_BLOCK.get(target)
    row["max_threads"] = _max_threads(row["registers"])
    why = []
    if row["shared_limit"] is not None and row["shared_bytes"] > row["shared_limit"]:
        why.append(f"shared memory {row['shared_bytes']} B > {row['shared_limit']} B per block")
    if row["threads"] > row["max_threads"]:
        why.append(f"{row['threads']} threads x {row['registers']} registers exceed the "
                   f"{REGISTERS_PER_BLOCK} registers of a block")
    row["ok"] = not why
    row["why"] = "; ".join(why)
    return row


def _failed_row(base: dict, why: str) -> dict:
    return {**base, "registers": None, "shared_static": None, "shared_dynamic": None,
            "shared_bytes": None, "shared_limit": SHARED_PER_BLOCK.get(base["target"]),
            "local_bytes": None, "max_threads": None, "ok": False, "why": why}


# ---------------------------------------------------------------------------------------------
# Triton compiles (run in the worker processes)


def _capability(target: str) -> int:
    return int(target.removeprefix("sm_"))


def _ast_source(op: str, cfg: dict):
    import triton

    kernels = importlib.import_module(f"vcfast.kernels.{op}")
    fn = getattr(kernels, cfg["kernel"])
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError(f"vcfast.kernels.{op} was imported for the Triton interpreter "
                           f"(TRITON_INTERPRET=1); compile in a process without it")
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        given = cfg["args"].get(param.name)
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif given is float:
            signature[param.name] = "fp32"
        elif given is None or given is int:
            signature[param.name] = "i32"
        else:
            signature[param.name] = "*" + _type_name(given)
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in fn.params if p.name.endswith("_ptr") and p.name not in cfg["args"]]
    if missing:
        raise RuntimeError(f"{op}.{cfg['kernel']}: no dtype given for pointer(s) {missing}")
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=cfg["constexprs"],
                                     attrs=attrs)


def _retargeted_cubin(ptx: str, from_target: str, target: str, options: dict,
                      source_hash: str) -> bytes:
    """The cubin for ``target`` assembled from ``from_target``'s PTX (cached in Triton's cache)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import Language, make_backend
    from triton.runtime.cache import get_cache_manager

    key = hashlib.sha256(f"vcfast.aot-{source_hash}-{target}".encode()).hexdigest()
    cache = get_cache_manager(key)
    name = f"retargeted_{target}.cubin"
    path = cache.get_file(name)
    if path is not None:
        with open(path, "rb") as f:
            return f.read()
    backend = make_backend(GPUTarget("cuda", _capability(target), 32))
    parsed = backend.parse_options(dict(options))
    stages: dict = {}
    backend.add_stages(stages, parsed, Language.TRITON)
    retargeted = re.sub(rf"\.target {from_target}\b", f".target {target}", ptx)
    cubin = stages["cubin"](retargeted, {})
    cache.put(cubin, name, binary=True)
    return cubin


def _compile_job(job: dict, cuobjdump: str) -> list[dict]:
    """Compiles one (op, configuration) for the job's targets; one row per target."""
    import triton
    from triton.backends.compiler import GPUTarget

    op, index, targets = job["op"], job["index"], job["targets"]
    cfg = _launch_configs(op)[index]
    base = {"source": "triton", "kernel": f"{op}.{cfg['kernel']}", "config": _config_label(cfg),
            "largest": bool(cfg.get("largest")), "threads": cfg["num_warps"] * 32}
    options = {"num_warps": cfg["num_warps"]}
    for option in ("num_stages", "enable_fp_fusion"):  # compile options a launcher may pass
        if option in cfg:
            options[option] = cfg[option]
    try:
        src = _ast_source(op, cfg)
    except Exception as exc:  # a broken configuration fails every target
        return [_failed_row({**base, "target": t}, f"{type(exc).__name__}: {exc}")
                for t in targets]
    # Targets whose PTX is reused come after the target that provides it.
    order = sorted(set(targets) | {_SAME_PTX_AS[t] for t in targets if t in _SAME_PTX_AS},
                   key=lambda t: t in _SAME_PTX_AS)
    compiled: dict[str, object] = {}
    rows = []
    for target in order:
        row = {**base, "target": target}
        started = time.perf_counter()
        try:
            donor = compiled.get(_SAME_PTX_AS.get(target, ""))
            if donor is not None:
                cubin = _retargeted_cubin(donor.asm["ptx"], _SAME_PTX_AS[target], target, options,
                                          donor.metadata.hash)
                shared_dynamic = donor.metadata.shared
                row["ptx_from"] = _SAME_PTX_AS[target]
            else:
                kernel = triton.compile(src, target=GPUTarget("cuda", _capability(target), 32),
                                        options=options)
                compiled[target] = kernel
                cubin, shared_dynamic = kernel.asm["cubin"], kernel.metadata.shared
            usage = _cubin_usage(cubin, cuobjdump)
        except Exception as exc:
            message = str(exc).strip().splitlines()
            rows.append(_failed_row(row, f"compile failed: {type(exc).__name__}: "
                                         f"{message[0] if message else ''}"))
            continue
        row.update(registers=usage["registers"], shared_static=usage["shared_static"],
                   shared_dynamic=shared_dynamic, local_bytes=usage["stack"] + usage["local"],
                   compile_s=round(time.perf_counter() - started, 3))
        if target in targets:
            rows.append(_finish_row(row))
    return rows


def _worker_main() -> None:
    """Reads a JSON list of jobs on stdin, writes the JSON list of rows on stdout."""
    jobs = json.load(sys.stdin)
    result = sys.stdout
    sys.stdout = sys.stderr  # Triton prints ptxas failures: keep stdout for the JSON
    cuobjdump = _tool("cuobjdump")
    rows = []
    for job in jobs:
        if cuobjdump is None:
            rows += [_failed_row({"source": "triton", "kernel": job["op"], "config": "",
                                  "largest": False, "threads": 0, "target": t},
                                 "cuobjdump not found") for t in job["targets"]]
        else:
            rows += _compile_job(job, cuobjdump)
    json.dump(rows, result)


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    # The workers must import this same vcfast, wherever the caller found it.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _split(jobs: list[dict], workers: int) -> list[list[dict]]:
    """Longest job first onto the least loaded worker."""
    def cost(job):
        return _HEAVY_OPS.get(job["op"], 1) * len(job["targets"])

    loads = [[0, []] for _ in range(workers)]
    for job in sorted(jobs, key=cost, reverse=True):
        slot = min(loads, key=lambda load: load[0])
        slot[0] += cost(job)
        slot[1].append(job)
    return [batch for _, batch in loads if batch]


def _run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    procs = []
    for batch in _split(jobs, workers):
        proc = subprocess.Popen([sys.executable, "-m", "vcfast.aot", "--worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_worker_env())
        procs.append((proc, json.dumps(batch)))
    rows = []
    for proc, payload in procs:
        out, err = proc.communicate(payload)
        if proc.returncode != 0:
            raise RuntimeError(f"vcfast.aot worker failed (exit {proc.returncode}):\n"
                               f"{err[-4000:]}")
        rows += json.loads(out)
    return rows


# ---------------------------------------------------------------------------------------------
# CUDA kernels of the extension


def _extension_path() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_C*.so")))
    return found[0] if found else None


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> short readable names (``kernel<T>``), via c++filt when there is one."""
    short = {}
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True,
                             text=True).stdout.splitlines()
        if len(out) == len(names):
            for name, full in zip(names, out):
                # "void ns::(anonymous namespace)::kernel<float>(float const*, ...)"
                # -> "kernel<float>"
                m = re.search(r"(\w+(?:<[^()]*>)?)\(", full)
                if m:
                    short[name] = m.group(1)
    return {name: short.get(name, name) for name in names}


def cuda_binary_contents(path: str | None = None) -> dict[str, list[str]]:
    """``{"elf": [...], "ptx": [...]}``: the architectures the extension ships code for."""
    path = path or _extension_path()
    cuobjdump = _tool("cuobjdump")
    if path is None or cuobjdump is None:
        return {"elf": [], "ptx": []}
    text = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", path], capture_output=True,
                          text=True).stdout
    elf = sorted({m for m in re.findall(r"ELF file\s+\d+:\s+\S+\.(sm_\w+)\.cubin", text)},
                 key=lambda a: int(re.sub(r"\D", "", a)))
    ptx = sorted({m for m in re.findall(r"PTX file\s+\d+:\s+\S+\.(sm_\w+)\.ptx", text)},
                 key=lambda a: int(re.sub(r"\D", "", a)))
    return {"elf": elf, "ptx": ptx}


def _cuda_rows(targets: Sequence[str]) -> list[dict]:
    base = {"source": "cuda", "config": "", "largest": True, "threads": CUDA_LAUNCH_THREADS}
    path = _extension_path()
    cuobjdump = _tool("cuobjdump")
    if path is None:
        return [_failed_row({**base, "kernel": "vcfast._C", "target": t},
                            "the extension vcfast._C is not built") for t in targets]
    if cuobjdump is None:
        return [_failed_row({**base, "kernel": "vcfast._C", "target": t}, "cuobjdump not found")
                for t in targets]
    text = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                          text=True).stdout
    usage = _parse_resource_usage(text)
    contents = cuda_binary_contents(path)
    shipped = (f"ELF {','.join(contents['elf']) or 'none'}; "
               f"PTX {','.join(contents['ptx']) or 'none'}")
    if not usage:
        return [_failed_row({**base, "kernel": "vcfast._C", "target": t, "shipped": shipped},
                            "vcfast._C has no CUDA kernels (a CPU-only build)") for t in targets]
    all_functions = sorted({f for per_arch in usage.values() for f in per_arch})
    names = _demangle(all_functions)
    rows = []
    for target in targets:
        per_arch = usage.get(target, {})
        for function in all_functions:
            row = {**base, "kernel": f"_C.{names[function]}", "target": target,
                   "shipped": shipped}
            if function not in per_arch:
                rows.append(_failed_row(row, f"no {target} code in vcfast._C ({shipped}); "
                                             f"rebuild with TORCH_CUDA_ARCH_LIST including "
                                             f"{target[3:-1]}.{target[-1]}"))
                continue
            u = per_arch[function]
            row.update(registers=u["registers"], shared_static=u["shared_static"],
                       shared_dynamic=CUDA_DYNAMIC_SHARED, local_bytes=u["stack"] + u["local"])
            rows.append(_finish_row(row))
    return rows


# ---------------------------------------------------------------------------------------------
# Public API


def kernel_report(targets: Sequence[str] = TARGETS, include_cuda: bool = True, *,
                  full_targets: Iterable[str] | None = None,
                  workers: int | None = None) -> list[dict]:
    """Compiles every GPU kernel for ``targets`` and reports its resources; no GPU needed.

    One row per (kernel, configuration, target), Triton kernels first, then (with
    ``include_cuda``) the CUDA kernels of vcfast._C. Row keys: ``source`` ("triton" /
    "cuda"), ``kernel``, ``config``, ``target``, ``registers`` (per thread),
    ``shared_static`` / ``shared_dynamic`` / ``shared_bytes`` (static + the dynamic amount the
    launch asks for) and ``shared_limit`` (bytes per block on that arch), ``local_bytes``
    (local memory per thread: register spills), ``threads`` (per block at launch),
    ``max_threads`` (the block size the register use admits), ``largest`` (the kernel's
    heaviest configuration), ``ok`` (compiles and fits) and ``why`` (what does not).

    ``full_targets``: the targets compiled in every configuration (default: all); the others
    get only each kernel's largest configurations, to bound the time. ``workers``: compile
    processes (default: up to 2, fewer CPUs permitting).
    """
    targets = tuple(targets)
    unknown = [t for t in targets if t not in SHARED_PER_BLOCK]
    if unknown:
        raise ValueError(f"kernel_report: unknown target(s) {unknown}; known: "
                         f"{tuple(SHARED_PER_BLOCK)}")
    full = set(targets if full_targets is None else full_targets)
    jobs = []
    for cfg in triton_configs():
        chosen = [t for t in targets if t in full or cfg["largest"]]
        if chosen:
            jobs.append({"op": cfg["op"], "index": cfg["index"], "targets": chosen})
    if workers is None:
        workers = max(1, min(2, os.cpu_count() or 1))
    rows = _run_jobs(jobs, workers) if jobs else []
    order = {t: i for i, t in enumerate(targets)}
    position = {(c["kernel"], c["config"]): i for i, c in enumerate(triton_configs())}
    rows.sort(key=lambda r: (position.get((r["kernel"], r["config"]), -1), order[r["target"]]))
    if include_cuda:
        rows += _cuda_rows(targets)
    return rows


def _fmt(value, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def format_kernel_report(rows: list[dict]) -> str:
    """A table of ``kernel_report`` rows, then the worst case of each kernel per target."""
    header = ("kernel", "config", "target", "regs", "shared B (static+dyn / limit)", "local B",
              "threads/max", "ok")
    body = []
    for r in rows:
        shared = ("-" if r["shared_bytes"] is None else
                  f"{r['shared_static']}+{r['shared_dynamic']} / {r['shared_limit']}")
        threads = f"{r['threads']}/{_fmt(r['max_threads'])}"
        verdict = "ok" if r["ok"] else f"NO: {r['why']}"
        if r["ok"] and r["local_bytes"]:
            verdict = f"ok, spills {r['local_bytes']} B"
        body.append((r["kernel"], r["config"], r["target"], _fmt(r["registers"]), shared,
                     _fmt(r["local_bytes"]), threads, verdict))
    lines = _table(header, body)

    summary = {}
    for r in rows:
        s = summary.setdefault((r["kernel"], r["target"]),
                               {"configs": 0, "regs": 0, "shared": 0, "local": 0, "bad": 0})
        s["configs"] += 1
        s["bad"] += not r["ok"]
        s["regs"] = max(s["regs"], r["registers"] or 0)
        s["shared"] = max(s["shared"], r["shared_bytes"] or 0)
        s["local"] = max(s["local"], r["local_bytes"] or 0)
    worst = [(kernel, target, str(s["configs"]), str(s["regs"]), str(s["shared"]),
              str(s["local"]), str(s["bad"])) for (kernel, target), s in summary.items()]
    lines += ["", "Worst case per kernel and target:"]
    lines += _table(("kernel", "target", "configs", "max regs", "max shared B", "max local B",
                     "failing"), worst)
    shipped = sorted({r["shipped"] for r in rows if r.get("shipped")})
    for s in shipped:
        lines.append(f"vcfast._C ships: {s}")
    return "\n".join(lines)


def _table(header: Sequence[str], body: list[Sequence[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    def line(row):
        return "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()
    return [line(header), line(["-" * w for w in widths]), *(line(row) for row in body)]


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        print(format_kernel_report(kernel_report()))
