"""Every GPU kernel compiled for real GPUs and checked against their limits, without a GPU.

The Triton kernels are compiled ahead of time (vcfast.aot) in every configuration their
launchers can pick, for sm_86 (the tightest shared memory: 99 KB per block) and sm_90 (the
newest); sm_80 and sm_89 get each kernel's largest configurations, which keeps the cold run
(empty Triton cache) within a few minutes on two cores. The CUDA kernels are read from the
built extension. The launch-side limits (grid size, tl.dot tiles) are tested on CPU.
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from vcfast import aot  # noqa: E402
from vcfast.ops import _triton  # noqa: E402

FULL_TARGETS = ("sm_86", "sm_90")
REPO = Path(__file__).resolve().parents[1]

# Per-block shared memory (static + dynamic) each architecture admits, in bytes.
SHARED_LIMITS = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024,
                 "sm_90": 227 * 1024}

# Kernels allowed some local memory per thread: (bytes at most, why it is acceptable).
ALLOWED_LOCAL_BYTES = {
    # sm_80 only, bfloat16 logits at BLOCK 1024 (8 warps): ptxas keeps one 4-byte value in
    # local memory inside the first chunk loop (one store and one load per 1024-column chunk)
    # at 48 registers: not register pressure, and a tiny cost next to the chunk's loads.
    "classification._masked_softmax_ce_bwd_kernel": (8, "one value per chunk on sm_80"),
    # The float64 instantiations (48 registers: not register pressure) keep a value in an
    # 8-byte stack frame around calls of the double-precision slow-path subroutines (division,
    # log); in the BCE forward that is a double updated once per column-loop iteration. The
    # float64 path is the reference-accuracy one, not the training one; csrc/cuda would need a
    # change to drop it.
    "_C._masked_multigroup_bce_fwd_kernel<double>": (8, "saved across fp64 slow-path calls"),
    "_C._masked_multigroup_softmax_ce_fwd_kernel<double>": (8, "saved across fp64 slow-path "
                                                               "calls"),
}


def _extension_has_cuda() -> bool:
    from vcfast import _extension

    return _extension.EXTENSION_LOADED and _extension.extension_has_cuda()


@pytest.fixture(scope="module")
def report():
    # A CPU-only build of vcfast._C has no CUDA kernels to check (see the test skipped below).
    return aot.kernel_report(aot.TARGETS, include_cuda=_extension_has_cuda(),
                             full_targets=FULL_TARGETS)


def _triton_rows(report):
    return [r for r in report if r["source"] == "triton"]


def test_limits_are_the_architectures():
    assert aot.SHARED_PER_BLOCK == SHARED_LIMITS
    assert SHARED_LIMITS["sm_86"] == 101376 and SHARED_LIMITS["sm_80"] == 166912
    assert SHARED_LIMITS["sm_90"] == 232448


def test_every_triton_kernel_has_launch_configs():
    """Each @triton.jit entry point of vcfast.kernels is enumerated by its launcher."""
    enumerated = {c["kernel"] for c in aot.triton_configs()}
    for op in aot.TRITON_OPS:
        source = (REPO / "kernels" / f"{op}.py").read_text()
        entry_points = re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", source)
        assert entry_points, op
        for name in entry_points:
            assert f"{op}.{name}" in enumerated, f"{op}.{name} has no aot_launch_configs entry"


def test_every_kernel_compiles_for_every_target(report):
    rows = _triton_rows(report)
    expected = {(c["kernel"], c["config"], t) for c in aot.triton_configs() for t in aot.TARGETS
                if t in FULL_TARGETS or c["largest"]}
    assert {(r["kernel"], r["config"], r["target"]) for r in rows} == expected
    kernels = {c["kernel"] for c in aot.triton_configs()}
    for target in aot.TARGETS:  # every kernel, not just some, reaches every target
        assert {r["kernel"] for r in rows if r["target"] == target} == kernels
    failed = [f"{r['kernel']} [{r['config']}] {r['target']}: {r['why']}" for r in report
              if r["registers"] is None]
    assert not failed, "\n".join(failed)


def test_shared_memory_fits_every_target(report):
    over = [f"{r['kernel']} [{r['config']}] {r['target']}: {r['shared_static']} static + "
            f"{r['shared_dynamic']} dynamic B" for r in report
            if r["shared_bytes"] is None
            or r["shared_static"] + r["shared_dynamic"] > SHARED_LIMITS[r["target"]]]
    assert not over, "\n".join(over)


def test_registers_admit_the_launch_block(report):
    over = [f"{r['kernel']} [{r['config']}] {r['target']}: {r['threads']} threads x "
            f"{r['registers']} registers" for r in report
            if r["registers"] is None or r["registers"] > 255
            or r["threads"] * math.ceil(r["registers"] * 32 / 256) * 256 // 32 > 65536]
    assert not over, "\n".join(over)
    assert all(r["ok"] for r in report), [r["why"] for r in report if not r["ok"]]


def test_no_local_memory_spills(report):
    spills = []
    for r in report:
        allowed = ALLOWED_LOCAL_BYTES.get(r["kernel"], (0, ""))[0]
        if r["local_bytes"] is None or r["local_bytes"] > allowed:
            spills.append(f"{r['kernel']} [{r['config']}] {r['target']}: {r['registers']} "
                          f"registers, {r['local_bytes']} B local (allowed {allowed})")
    assert not spills, "\n".join(spills)


def test_allow_list_is_current(report):
    """An allow-list entry names a kernel that exists (a rename must not silence it)."""
    kernels = {r["kernel"] for r in report}
    listed = {k for k in ALLOWED_LOCAL_BYTES if _extension_has_cuda() or not k.startswith("_C.")}
    assert listed <= kernels


def test_cuda_extension_ships_every_target(report):
    if not _extension_has_cuda():
        pytest.skip("vcfast._C was built without its CUDA kernels (or is not built)")
    contents = aot.cuda_binary_contents()
    assert set(aot.TARGETS) <= set(contents["elf"]), contents
    cuda = [r for r in report if r["source"] == "cuda"]
    names = {r["kernel"] for r in cuda}
    assert any("logspec_fwd_epilogue_kernel" in n for n in names), names
    assert any("_masked_multigroup_bce_fwd_kernel" in n for n in names), names
    for target in aot.TARGETS:
        assert {r["kernel"] for r in cuda if r["target"] == target} == names


def test_cuda_launch_constants_match_the_sources():
    """aot assumes 256-thread launches without dynamic shared memory: the sources say so."""
    sources = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        pytest.skip("no CUDA sources in this checkout")
    for path in sources:
        text = path.read_text()
        launches = re.findall(r"<<<([^>]*)>>>", text)
        if not launches:
            continue
        threads = re.search(r"constexpr int kThreads = (\d+);", text)
        assert threads and int(threads.group(1)) == aot.CUDA_LAUNCH_THREADS, path.name
        for launch in launches:
            parts = [p.strip() for p in launch.split(",")]
            assert parts[1] == "kThreads", (path.name, launch)
            assert parts[2] == str(aot.CUDA_DYNAMIC_SHARED), (path.name, launch)


def test_sm89_ptx_is_sm86_ptx_retargeted():
    """The premise of reusing sm_86's PTX for sm_89, on an elementwise and a tl.dot kernel."""
    script = textwrap.dedent("""
        import re
        import torch, triton
        from triton.backends.compiler import GPUTarget
        from vcfast import aot
        picks = [c for c in aot.triton_configs()
                 if (c["kernel"] == "norm_act._norm_relu_bwd_kernel"
                     and c["entry"]["args"]["z_ptr"] == torch.bfloat16)
                 or (c["kernel"] == "spectrogram._log_spectrogram_bwd_overlap_add_kernel"
                     and c["entry"]["constexprs"]["BLOCK_M"] == 16
                     and c["entry"]["constexprs"]["PRECISION"] == 2)]
        assert len(picks) == 3, len(picks)
        for c in picks:
            src = aot._ast_source(c["op"], c["entry"])
            ptx = [re.sub(r"\\.target sm_\\d+", "", triton.compile(
                       src, target=GPUTarget("cuda", cap, 32),
                       options={"num_warps": c["entry"]["num_warps"]}).asm["ptx"])
                   for cap in (86, 89)]
            print(c["kernel"], ptx[0] == ptx[1])
    """)
    out = subprocess.run([sys.executable, "-c", script], env=aot._worker_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.endswith(" True") for line in lines), out.stdout


def test_format_kernel_report(report):
    text = aot.format_kernel_report(report)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["kernel", "config", "target"]
    for r in report[:: max(1, len(report) // 50)]:
        assert r["kernel"] in text
    assert "Worst case per kernel and target:" in text
    assert len(lines) > len(report)


# ---------------------------------------------------------------------------------------------
# Launch-side limits, on CPU


def test_check_grid_accepts_the_limits_and_rejects_past_them():
    _triton.check_grid("op", (2**31 - 1, 65535, 65535))
    for grid, axis in (((2**31,), "x"), ((1, 65536), "y"), ((1, 1, 65536), "z")):
        with pytest.raises(ValueError, match=rf"vcfast::op: .* along {axis}"):
            _triton.check_grid("vcfast::op", grid)


def test_check_dot_tiles():
    _triton.check_dot_tiles("op", BLOCK_M=16, BLOCK_N=64)
    with pytest.raises(ValueError, match="BLOCK_K=8"):
        _triton.check_dot_tiles("op", BLOCK_M=16, BLOCK_K=8)


def test_dot_tiles_are_at_least_16():
    from vcfast.ops import spectrogram_triton as st

    if st._kernels is None:
        pytest.skip(st.TRITON_IMPORT_ERROR)
    assert st._fit(64, 1) == 16 and st._fit(32, 3) == 16
    for cfg in st.aot_launch_configs():
        tiles = [v for k, v in cfg["constexprs"].items() if k.startswith("BLOCK_")]
        assert tiles and min(tiles) >= 16, cfg


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_launchers_reject_grids_past_the_limits():
    """Shapes past CUDA's grid limits raise in every launcher before any launch (meta tensors:
    no memory)."""
    from vcfast.ops import classification_triton as ct
    from vcfast.ops import gradient_penalty_triton as sbt
    from vcfast.ops import label_conv_triton as lt
    from vcfast.ops import norm_act_triton as nt
    from vcfast.ops import spectrogram_triton as st

    if st._kernels is None:
        pytest.skip(st.TRITON_IMPORT_ERROR)
    too_wide = 65535 * 1024 + 1  # one 1024-element block past 65535 along y
    with pytest.raises(ValueError, match="norm_relu_forward_triton.*along y"):
        nt._forward_impl(_meta(1, 1, too_wide), _meta(1), _meta(1), _meta(1), _meta(1))
    ids = torch.zeros(1, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="label_table_add_triton.*along y"):
        lt._label_table_add_impl(_meta(1, 1, 1, too_wide), _meta(1, 1, 1, 1), ids,
                                 torch.zeros(too_wide, dtype=torch.int64, device="meta"))
    n = 8 * 256 * 2**31  # 2**31 programs of 256 bytes of bits
    with pytest.raises(ValueError, match="leaky_relu_with_bits_triton.*along x"):
        sbt._leaky_relu_with_bits_impl(_meta(n), 0.2)
    with pytest.raises(ValueError, match="penalty_terms_triton.*along x"):
        sbt._penalty_terms_impl(_meta(2**31, 1), 1.0, 10.0)
    with pytest.raises(ValueError, match="masked_multigroup_bce_triton.*along x"):
        ct._bce_forward_impl(_meta(2**31, 2), _meta(2**31, 2), [2], None, 1)
    with pytest.raises(ValueError, match="log_spectrogram_triton.*along x"):
        st._forward_impl(_meta(1, 2**37), _meta(16), _meta(8), _meta(8), 16, 1, 0, 8,
                         1.0, 1.0, 0.0, 1e-5, -math.inf, math.inf, "ieee")


# ---------------------------------------------------------------------------------------------
# The configurations listed for aot are the ones the launchers use


_INTERPRETER_ONLY = {"EMULATE_BF16_RNE": False, "USE_LIBDEVICE": True}


def _gpu_constexprs(kernel_name: str, constexprs: dict) -> dict:
    """A recorded interpreter launch's constexprs as a GPU launch would pass them."""
    out = dict(constexprs)
    for name, gpu_value in _INTERPRETER_ONLY.items():
        if name in out:
            out[name] = gpu_value
    if "spectrogram" in kernel_name and out.get("PRECISION") == 3:  # PRECISION_BF16_EMULATED
        out["PRECISION"] = 2
    return out


@pytest.fixture
def recorded_launches(monkeypatch):
    """Records (op, kernel, constexprs, num_warps) of every Triton launch, then runs it."""
    launches = []
    real = torch.library.wrap_triton

    def recording(kernel):
        launcher = real(kernel)

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    module = kernel.fn.__module__.rsplit(".", 1)[-1]
                    name = f"{module}.{kernel.fn.__name__}"
                    constexprs = {k: v for k, v in kwargs.items()
                                  if k not in ("num_warps", "num_stages", "enable_fp_fusion")}
                    launches.append((name, _gpu_constexprs(name, constexprs),
                                     kwargs.get("num_warps", 4)))
                    return launcher[grid](*args, **kwargs)
                return launch
        return Grid()

    monkeypatch.setattr(torch.library, "wrap_triton", recording)
    return launches


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) in masked lanes
def test_recorded_launches_are_enumerated(recorded_launches):
    from vcfast.ops import classification_triton as ct
    from vcfast.ops import gradient_penalty_triton as sbt
    from vcfast.ops import label_conv_triton as lt
    from vcfast.ops import norm_act_triton as nt
    from vcfast.ops import spectrogram_triton as st

    if not st._kernels_interpreted():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1 before the kernels load)")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        # Default tiles (>= 64 frames, 64 bins) with every power / clip kind, and the all-16
        # tiles of a tiny problem (listed with a general power and a clip only).
        for n_fft, hop, bins, samples, flags in (
                (128, 32, 64, 128 + 63 * 32, ((1.0, math.inf), (2.0, 5.0), (1.5, 5.0),
                                              (1.5, math.inf))),
                (16, 8, 8, 40, ((1.5, 5.0),))):
            wave = torch.randn(1, samples, dtype=dtype, generator=gen, requires_grad=True)
            window = torch.hann_window(n_fft, dtype=dtype)
            shift, scale = torch.zeros(bins, dtype=dtype), torch.ones(bins, dtype=dtype)
            for precision, (power, clip) in itertools.product(("ieee", "tf32", "bf16"), flags):
                out = st.log_spectrogram_triton(
                    wave, window, shift, scale, n_fft=n_fft, hop=hop, bin_lo=1,
                    bin_hi=1 + bins, magnitude_scale=1.0, power=power, log_offset=0.0,
                    log_floor=1e-5, clip_lo=-clip, clip_hi=clip, precision=precision)
                out.sum().backward()
        logits = torch.randn(3, 43, dtype=dtype, generator=gen, requires_grad=True)
        targets = torch.zeros(3, 43, dtype=dtype)
        targets[:, 0] = 1
        targets[:, 3] = 1
        loss, _ = ct.masked_multigroup_bce_triton(logits, targets, [3, 40], None, 2)
        loss.backward()
        loss, _ = ct.masked_multigroup_bce_triton(logits, targets, [3, 40],
                                                  torch.ones(43, dtype=dtype), 2)
        loss.backward()
        loss, _ = ct.masked_multigroup_softmax_ce_triton(logits, targets, [3, 40], 2)
        loss.backward()
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        z = torch.randn(2, 3, 4, 5, dtype=dtype, generator=gen)
        stats = torch.zeros(6), torch.ones(6)
        a = nt.norm_relu_forward_triton(z, *stats, None, None)
        for batch_stats in (True, False):
            nt.norm_relu_backward_triton(a, z, *stats, None, None, batch_stats)
        out, bits = sbt.leaky_relu_with_bits_triton(z, 0.2)
        sbt.scale_by_slope_bits_triton(z, bits, 0.2)
        sbt.penalty_terms_triton(z, 1.0, 10.0)
        # The generator's 7x7 stem: 7 x 7 pattern tables (BLOCK_R = BLOCK_S = 8).
        rows = torch.tensor([0, 1, 2, 3, 3, 3, 4, 5, 6])
        conv = torch.randn(1, 2, 9, 9, dtype=dtype, generator=gen)
        table = torch.randn(1, 2, 7, 7, dtype=dtype, generator=gen)
        lt.label_table_add_triton(conv, table, rows, rows)
        lt.label_table_grad_triton(conv, rows, rows, 7, 7)

    listed = {(c["kernel"], tuple(sorted(c["entry"]["constexprs"].items())),
               c["entry"]["num_warps"]) for c in aot.triton_configs()}
    assert {name for name, _, _ in recorded_launches} == {name for name, _, _ in listed}
    missing = {(name, tuple(sorted(cx.items())), nw) for name, cx, nw in recorded_launches}
    missing -= listed
    assert not missing, "launched but not in aot_launch_configs:\n" + "\n".join(map(str, missing))
