"""Numerics a GPU would see, checked in the sm_90 PTX that Triton compiles without a GPU.

The CPU interpreter computes every float operation rounded on its own, so it cannot show what
the compiled kernels do differently: FMA contraction (one rounding instead of two),
approximate and flush-to-zero square roots and divisions. Each kernel is compiled here as its
launcher compiles it (the configuration and options its ``aot_launch_configs`` lists, which
tests/test_aot_kernels.py ties to the real launches), in a subprocess without
TRITON_INTERPRET, as vcfast.aot does, and the PTX is searched for the instructions that
must not be there.
"""

import json
import re
import subprocess
import sys

import pytest

from vcfast import aot

pytest.importorskip("triton")

_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from vcfast import aot
out = []
for op, index, options in json.loads(sys.argv[1]):
    cfg = aot._launch_configs(op)[index]
    kernel = triton.compile(aot._ast_source(op, cfg), target=GPUTarget("cuda", 90, 32),
                            options=options)
    out.append(kernel.asm["ptx"])
sys.stdout.write(json.dumps(out))
"""


def _index(op: str, kernel: str, dtype: str, **constexprs) -> int:
    for i, cfg in enumerate(aot._launch_configs(op)):
        if (cfg["kernel"] == kernel and str(next(iter(cfg["args"].values()))) == dtype
                and all(cfg["constexprs"].get(k) == v for k, v in constexprs.items())):
            return i
    raise LookupError(f"{op}.{kernel} {dtype} {constexprs}: no such launch configuration")


def _options(cfg: dict, **override) -> dict:
    options = {k: cfg[k] for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in cfg}
    return {**options, **override}


def _ptx(jobs: list[tuple[str, int, dict]]) -> list[str]:
    """sm_90 PTX of each (op, configuration index, compile options)."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(jobs)],
                          env=aot._worker_env(), capture_output=True, text=True, timeout=900,
                          check=False)
    if done.returncode != 0:
        pytest.fail(f"compile failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def _instructions(ptx: str, pattern: str) -> list[str]:
    return re.findall(rf"^\s*({pattern})\b", ptx, flags=re.MULTILINE)


@pytest.mark.parametrize("dtype,suffix", [("torch.float32", "f32"), ("torch.float64", "f64")])
def test_norm_act_kernels_have_no_fma(dtype, suffix):
    """y = xhat * gamma + beta decides the ReLU mask and must be rounded twice, as in the
    reference; the same kernel compiled with fusion on does contract it (the check sees it)."""
    configs = aot._launch_configs("norm_act")
    fwd = _index("norm_act", "_norm_relu_fwd_kernel", dtype)
    bwd_train = _index("norm_act", "_norm_relu_bwd_kernel", dtype, BATCH_STATS=True)
    bwd_eval = _index("norm_act", "_norm_relu_bwd_kernel", dtype, BATCH_STATS=False)
    for i in (fwd, bwd_train, bwd_eval):
        assert configs[i].get("enable_fp_fusion") is False
    jobs = [("norm_act", i, _options(configs[i])) for i in (fwd, bwd_train, bwd_eval)]
    jobs.append(("norm_act", fwd, _options(configs[fwd], enable_fp_fusion=True)))
    *as_launched, fused = _ptx(jobs)
    for ptx in as_launched:
        assert _instructions(ptx, rf"fma\.rn\.{suffix}") == []
    assert _instructions(fused, rf"fma\.rn\.{suffix}"), "the fused control shows no FMA"


@pytest.mark.parametrize("dtype,suffix", [("torch.float32", "f32"), ("torch.float64", "f64")])
def test_spectrogram_sqrt_and_div_round_to_nearest(dtype, suffix):
    """|X| = sqrt(re^2 + im^2) and the divisions of the epilogues are IEEE round-to-nearest:
    no sqrt.approx / div.approx / div.full, nothing flushing subnormals to zero."""
    configs = aot._launch_configs("spectrogram")
    indices = [_index("spectrogram", "_log_spectrogram_fwd_kernel", dtype, POWER_MODE=0,
                      PRECISION=0),
               _index("spectrogram", "_log_spectrogram_bwd_spec_kernel", dtype, POWER_MODE=0,
                      PRECISION=0, HAS_CLIP=True)]
    for ptx in _ptx([("spectrogram", i, _options(configs[i])) for i in indices]):
        sqrt = _instructions(ptx, r"sqrt(?:\.\w+)+")
        div = _instructions(ptx, rf"div(?:\.\w+)*\.{suffix}")
        assert sqrt and set(sqrt) == {f"sqrt.rn.{suffix}"}
        assert div and set(div) == {f"div.rn.{suffix}"}
