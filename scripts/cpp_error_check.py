"""Does an error raised inside vcfast's C++ kernels reach Python as an exception?

    python scripts/cpp_error_check.py [--json FILE]

Each case calls one registered C++ op (``torch.ops.vcfast.*``, CPU tensors) with an argument
its checks reject, in a child process, and expects a Python exception naming the op. A child
that dies on a signal instead is reported with the signal, and the script then gathers what
decides how C++ exceptions unwind on this machine: the compiler torch was built with and the
one that built vcfast._C, the extension's GNU property notes (CET: IBT / shadow stack), the
CPU's CET flags, the libraries it links, and whether the case passes with the glibc tunables
that turn shadow stacks and IBT off.

Why: on the first GPU machine (H200, Python 3.12, torch 2.11.0+cu130, extension built there)
every C++ check that formatted a number into its message killed the process with SIGSEGV.
Cause (found with scripts/unwind_probe/run.sh): that machine's g++ linked a static copy of
libstdc++ into vcfast._C; setup.py now links libstdc++.so.6 by name. ``extension_cxx_runtime``
in the diagnostics says which one a build has. Exit status 0 when every case raised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys

# (name, code run in the child after `import torch, vcfast`): each must raise.
CASES = [
    # Control: an error thrown by torch's own C++ (not vcfast's). If this one dies too, the
    # fault is in how this interpreter and torch unwind, not in how vcfast._C was built.
    ("control, torch's own check: view to a bad shape", "torch.zeros(2).view(3)"),
    ("masked_multigroup_bce: target 2",
     "torch.ops.vcfast.masked_multigroup_bce(torch.zeros(2, 3), torch.full((2, 3), 2.0), [3], "
     "None, 2)"),
    ("penalty_terms: integer g",
     "torch.ops.vcfast.penalty_terms(torch.zeros(2, 3, dtype=torch.int64), 1.0, 10.0)"),
    ("label_table_add: index out of range",
     "torch.ops.vcfast.label_table_add(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 2, 2), "
     "torch.tensor([0, 1, 9]), torch.tensor([0, 1, 1]))"),
    ("instance_norm_stats: 2-D z", "torch.ops.vcfast.instance_norm_stats(torch.zeros(2, 3), 1e-5)"),
]

CHILD = """
import sys, torch, vcfast
try:
    {code}
except Exception as exc:
    print(type(exc).__name__ + ": " + str(exc).splitlines()[0][:160])
    sys.exit(0)
print("no exception raised")
sys.exit(3)
"""

# glibc tunables that switch Intel CET (shadow stack, indirect-branch tracking) off.
CET_OFF = "glibc.cpu.x86_shstk=off:glibc.cpu.x86_ibt=off"


def run_case(code: str, extra_env: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, **(extra_env or {}))
    # -X faulthandler: a child that dies on a signal prints its Python stack in stderr.
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD.format(code=code)],
                          env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode < 0:
        outcome = f"killed by {signal.Signals(-proc.returncode).name}"
    elif proc.returncode == 0:
        outcome = "raised"
    else:
        outcome = f"exit {proc.returncode}"
    return {"outcome": outcome, "ok": proc.returncode == 0,
            "message": (proc.stdout.strip() or proc.stderr.strip()[-300:])}


def _command(*args: str) -> str:
    if shutil.which(args[0]) is None:
        return f"({args[0]} not found)"
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    return (proc.stdout + proc.stderr).strip()


def diagnostics() -> dict:
    import torch

    import vcfast

    so = None
    try:
        import vcfast._C as ext
        so = ext.__file__
    except ImportError:
        pass
    config = torch.__config__.show()
    # "PyTorch built with:" then "- GCC 13.3" (or clang) and "- C++ Version: 202002".
    compiler = "; ".join(line.strip(" -") for line in config.splitlines()[1:6]
                         if line.strip(" -").startswith(("GCC", "clang", "C++ Version")))
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
        flags = " ".join(sorted(words & {"ibt", "shstk", "user_shstk"})) or "none"
    except OSError:
        flags = "unreadable"
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vcfast": vcfast.__version__,
        "torch_compiler": compiler,
        "cxx_here": _command("c++", "--version").splitlines()[0] if shutil.which("c++") else
        "(no c++)",
        "cpu_cet_flags": flags,
        "extension": so,
        "extension_cxx_runtime": vcfast.build_info()["extension_cxx_runtime"],
    }
    if so:
        out["extension_gnu_properties"] = _command("readelf", "-n", so)[-1200:]
        out["extension_comment"] = _command("readelf", "-p", ".comment", so)[-400:]
        out["extension_links"] = _command("ldd", so)[-1500:]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)

    results = []
    for name, code in CASES:
        row = {"case": name, **run_case(code)}
        if not row["ok"]:
            row["with_cet_off"] = run_case(code, {"GLIBC_TUNABLES": CET_OFF})["outcome"]
        results.append(row)
        print(f"{name:40s} {row['outcome']:22s} {row['message'][:90]}"
              + (f"  [CET off: {row['with_cet_off']}]" if "with_cet_off" in row else ""))
    failed = [r for r in results if not r["ok"]]
    report = {"cases": results, "ok": not failed}
    if failed:
        report["diagnostics"] = diagnostics()
        for key, value in report["diagnostics"].items():
            print(f"--- {key}\n{value}")
    print(f"verdict: {len(results) - len(failed)} of {len(results)} C++ errors raised in Python")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
