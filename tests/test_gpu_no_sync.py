"""No op makes the host wait for the GPU on its hot path (GPU only; skipped without CUDA).

``torch.cuda.set_sync_debug_mode("error")`` raises on every synchronising CUDA call (a copy
from pageable memory, ``.item()``, ``.cpu()``, a data-dependent check read on the host), so
each op runs once to warm its caches and compile its kernels, then forward and backward again
in that mode. Known, documented exceptions: ``log_spectrogram(nan_policy="raise")`` on CUDA
(opt-in, checked below to still sync) and the classification forwards, which validate the
targets in the kernel and read the verdict back to raise a ValueError.
"""

import contextlib
import os

import pytest
import torch

import vcfast
from vcfast import _extension

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

needs_cuda_ext = pytest.mark.skipif(not _extension.extension_has_cuda(),
                                    reason="vcfast._C was built without CUDA")
needs_compiled_triton = pytest.mark.skipif(
    not _extension.triton_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs Triton kernels compiled for the GPU: run with TRITON_INTERPRET=0")


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _twice(step):
    """Warm-up (caches, Triton compiles), then the checked call."""
    step()
    with no_sync():
        step()
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", [
    pytest.param("cuda", marks=needs_cuda_ext),
    pytest.param("triton", marks=needs_compiled_triton),
])
def test_log_spectrogram_forward_backward(backend):
    wave = torch.randn(2, 66304, device="cuda", requires_grad=True)

    def step():
        vcfast.log_spectrogram(wave, backend=backend).sum().backward()

    _twice(step)
    wave.grad = None
    with pytest.raises(RuntimeError), no_sync():  # the opt-in check does sync
        vcfast.log_spectrogram(wave.detach(), backend=backend, nan_policy="raise")


@needs_compiled_triton
def test_norm_act_triton():
    from vcfast.ops import norm_act as ops
    from vcfast.ops import norm_act_triton as nat

    z = torch.randn(2, 8, 16, 16, device="cuda")
    mean, rstd, _ = ops.instance_norm_stats_reference(z, 1e-5)
    gamma, beta = torch.ones(8, device="cuda"), torch.zeros(8, device="cuda")

    def step():
        nat.norm_relu_forward_triton(z, mean, rstd, gamma, beta)
        nat.norm_relu_backward_triton(torch.ones_like(z), z, mean, rstd, gamma, beta, True)

    _twice(step)


@needs_compiled_triton
def test_gradient_penalty_triton():
    from vcfast.ops import gradient_penalty_triton as sbt

    z = torch.randn(4, 3, 16, 16, device="cuda")

    def step():
        out, bits = sbt.leaky_relu_with_bits_triton(z, 0.2)
        sbt.scale_by_slope_bits_triton(out, bits, 0.2)
        sbt.penalty_terms_triton(z, 1.0, 10.0)

    _twice(step)


@needs_compiled_triton
def test_label_conv_triton():
    from vcfast.ops import label_conv_triton as lt

    conv = torch.randn(2, 4, 8, 8, device="cuda")
    table = torch.randn(2, 4, 3, 3, device="cuda")
    ids = torch.randint(0, 3, (8,), device="cuda")

    def step():
        lt.label_table_add_triton(conv, table, ids, ids)
        lt.label_table_grad_triton(conv, ids, ids, 3, 3)

    _twice(step)


@pytest.mark.parametrize("backend", [
    pytest.param("cuda", marks=needs_cuda_ext),
    pytest.param("triton", marks=needs_compiled_triton),
])
def test_classification_backward(backend):
    """The backward (the forward validates targets and reads the verdict: one sync)."""
    groups = [3, 5]
    logits = torch.randn(16, 8, device="cuda", requires_grad=True)
    targets = torch.randint(-1, 2, (16, 8), device="cuda", dtype=torch.int8)
    loss = vcfast.masked_multigroup_bce(logits, targets, groups, backend=backend)
    loss.backward(retain_graph=True)
    with no_sync():
        loss.backward()
    torch.cuda.synchronize()
