"""Triton backend of the fused instance-norm + ReLU ops (GPU tensors).

Same contracts as the plain-PyTorch references in ``vcfast.ops.norm_act``; kernels and their
math: ``vcfast/kernels/norm_act.py`` (repository path ``kernels/norm_act.py``).

Public functions (z / grad_a of any strides are made contiguous; float16, bfloat16, float32,
float64; statistics, gamma and beta are cast to the accumulation dtype, float32 or float64 for
float64 z; gamma / beta may be None = 1 / 0, and their grads are then None):

* ``norm_relu_forward_triton(z, mean, rstd, gamma, beta) -> a``
* ``norm_relu_backward_triton(grad_a, z, mean, rstd, gamma, beta, batch_stats)
  -> (grad_z, grad_gamma, grad_beta)``; the per-row sums are reduced over the batch on the
  host in a fixed order (deterministic), in a different order from the reference's
  ``torch.sum``, so float results agree with it to rounding.

Registered ops (not differentiable; the lean module's autograd function calls them):

* ``vcfast::norm_relu_forward_triton(Tensor z, Tensor mean, Tensor rstd, Tensor gamma,
  Tensor beta) -> Tensor``
* ``vcfast::norm_relu_backward_triton(Tensor grad_a, Tensor z, Tensor mean, Tensor rstd,
  Tensor gamma, Tensor beta, bool batch_stats) -> (Tensor, Tensor, Tensor)``

Registration as in ``vcfast.ops.gradient_penalty_triton``: ``torch.library.triton_op`` with
compiled kernels, ``custom_op`` + ``register_fake`` under ``TRITON_INTERPRET=1``.
Without triton the module still imports; calling a function raises RuntimeError.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vcfast.ops._triton import (
    check_grid,
    define_op,
    is_interpreted,
    launch_device,
    load_kernels,
    require_runnable,
    triton,
)

__all__ = [
    "norm_relu_forward_triton",
    "norm_relu_backward_triton",
    "TRITON_IMPORT_ERROR",
    "USES_TRITON_OP",
]

_kernels, TRITON_IMPORT_ERROR = load_kernels("norm_act")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
_BLOCK = 1024
_NUM_WARPS = 4
# No FMA contraction: the ReLU mask must be computed from y = xhat * gamma + beta rounded twice,
# as the reference does (see vcfast/kernels/norm_act.py); the interpreter ignores the option.
_FP_FUSION = False


def _kernels_interpreted() -> bool:
    return _kernels is not None and is_interpreted(_kernels._norm_relu_fwd_kernel)


USES_TRITON_OP = _kernels is not None and not _kernels_interpreted()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _emulate_bf16_rne(out: Tensor) -> bool:
    return out.dtype == torch.bfloat16 and _kernels_interpreted()


def _check(name: str, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor,
           grad_a: Tensor | None = None) -> None:
    torch._check_type(z.dtype in _DTYPES,
                      lambda: f"vcfast::{name}: z must be float16, bfloat16, float32 or float64, "
                              f"got {z.dtype}")
    torch._check_value(z.dim() >= 3, lambda: f"vcfast::{name}: z must be [N, C, *spatial], got "
                                             f"{tuple(z.shape)}")
    n, c = z.shape[0], z.shape[1]
    for arg, t in (("mean", mean), ("rstd", rstd)):
        torch._check_value(t.numel() == n * c,
                           lambda: f"vcfast::{name}: {arg} must have N * C = {n * c} elements")
    for arg, t in (("gamma", gamma), ("beta", beta)):
        torch._check_value(t.numel() == c,
                           lambda: f"vcfast::{name}: {arg} must have C = {c} elements")
    if grad_a is not None:
        torch._check_value(grad_a.shape == z.shape,
                           lambda: f"vcfast::{name}: grad_a {tuple(grad_a.shape)} must have z's "
                                   f"shape {tuple(z.shape)}")


def _prep(z, mean, rstd, gamma, beta):
    acc = _acc(z.dtype)
    return (z.contiguous(), mean.to(acc).contiguous(), rstd.to(acc).contiguous(),
            gamma.to(acc).contiguous(), beta.to(acc).contiguous())


def _forward_impl(z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    _check("norm_relu_forward_triton", z, mean, rstd, gamma, beta)
    z, mean, rstd, gamma, beta = _prep(z, mean, rstd, gamma, beta)
    a = torch.empty_like(z)
    n, c = z.shape[0], z.shape[1]
    if z.numel() > 0:
        hw = z.numel() // (n * c)
        grid = (n * c, triton.cdiv(hw, _BLOCK))
        check_grid(_FWD_NAME, grid)
        with launch_device(z):
            torch.library.wrap_triton(_kernels._norm_relu_fwd_kernel)[grid](
                z, mean, rstd, gamma, beta, a, c, hw,
                EMULATE_BF16_RNE=_emulate_bf16_rne(a), BLOCK=_BLOCK, num_warps=_NUM_WARPS,
                enable_fp_fusion=_FP_FUSION,
            )
    return a


def _backward_impl(grad_a: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor,
                   beta: Tensor, batch_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check("norm_relu_backward_triton", z, mean, rstd, gamma, beta, grad_a)
    z, mean, rstd, gamma, beta = _prep(z, mean, rstd, gamma, beta)
    grad_a = grad_a.to(z.dtype).contiguous()
    acc = mean.dtype
    n, c = z.shape[0], z.shape[1]
    grad_z = torch.empty_like(z)
    sum_g = torch.zeros((n, c), dtype=acc, device=z.device)
    sum_gx = torch.zeros((n, c), dtype=acc, device=z.device)
    if z.numel() > 0:
        hw = z.numel() // (n * c)
        check_grid(_BWD_NAME, (n * c,))
        with launch_device(z):
            torch.library.wrap_triton(_kernels._norm_relu_bwd_kernel)[(n * c,)](
                grad_a, z, mean, rstd, gamma, beta, grad_z, sum_g, sum_gx, c, hw,
                BATCH_STATS=batch_stats, EMULATE_BF16_RNE=_emulate_bf16_rne(grad_z), BLOCK=_BLOCK,
                num_warps=_NUM_WARPS, enable_fp_fusion=_FP_FUSION,
            )
    return grad_z, sum_gx.sum(0), sum_g.sum(0)


def aot_launch_configs() -> list[dict]:
    """The compiled-kernel configurations the launchers above pick (read by vcfast.aot).

    Kept next to the launch code so the two change together; tests/test_aot_kernels.py checks
    that recorded launches use only configurations listed here. Entries as in
    ``vcfast.ops.spectrogram_triton.aot_launch_configs``, plus ``enable_fp_fusion``. Every
    dtype; EMULATE_BF16_RNE is True only under the interpreter.
    """
    if _kernels is None:
        return []
    configs = []
    for dtype in _DTYPES:
        acc = _acc(dtype)
        stats = {"mean_ptr": acc, "rstd_ptr": acc, "gamma_ptr": acc, "beta_ptr": acc}
        configs.append({
            "kernel": "_norm_relu_fwd_kernel", "num_warps": _NUM_WARPS, "largest": True,
            "enable_fp_fusion": _FP_FUSION,
            "constexprs": {"EMULATE_BF16_RNE": False, "BLOCK": _BLOCK},
            "args": {"z_ptr": dtype, **stats, "a_ptr": dtype}})
        for batch_stats in (True, False):
            configs.append({
                "kernel": "_norm_relu_bwd_kernel", "num_warps": _NUM_WARPS, "largest": batch_stats,
                "enable_fp_fusion": _FP_FUSION,
                "constexprs": {"BATCH_STATS": batch_stats, "EMULATE_BF16_RNE": False,
                               "BLOCK": _BLOCK},
                "args": {"grad_a_ptr": dtype, "z_ptr": dtype, **stats, "grad_z_ptr": dtype,
                         "sum_g_ptr": acc, "sum_gx_ptr": acc}})
    return configs


_FWD_NAME = "vcfast::norm_relu_forward_triton"
_BWD_NAME = "vcfast::norm_relu_backward_triton"

if _kernels is not None:
    _fwd_op = define_op(_FWD_NAME, _forward_impl, use_triton_op=USES_TRITON_OP)
    _bwd_op = define_op(_BWD_NAME, _backward_impl, use_triton_op=USES_TRITON_OP)
    if not USES_TRITON_OP:  # interpreter: custom ops need explicit fakes

        @_fwd_op.register_fake
        def _forward_fake(z, mean, rstd, gamma, beta):
            _check("norm_relu_forward_triton", z, mean, rstd, gamma, beta)
            return torch.empty_like(z, memory_format=torch.contiguous_format)

        @_bwd_op.register_fake
        def _backward_fake(grad_a, z, mean, rstd, gamma, beta, batch_stats):
            _check("norm_relu_backward_triton", z, mean, rstd, gamma, beta, grad_a)
            acc = _acc(z.dtype)
            c = z.shape[1]
            return (torch.empty_like(z, memory_format=torch.contiguous_format),
                    z.new_empty((c,), dtype=acc), z.new_empty((c,), dtype=acc))


def _require_triton(name: str, t: Tensor) -> None:
    require_runnable(name, t, kernels=_kernels, import_error=TRITON_IMPORT_ERROR,
                     interpreted=_kernels_interpreted(), module="norm_act",
                     fallback=f"vcfast.ops.norm_act.{name.removesuffix('_triton')} (reference)")


def _affine(gamma, beta, z):
    c = z.shape[1]
    acc = _acc(z.dtype)
    g = z.new_ones((c,), dtype=acc) if gamma is None else gamma
    b = z.new_zeros((c,), dtype=acc) if beta is None else beta
    return g, b


def norm_relu_forward_triton(z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor | None,
                             beta: Tensor | None) -> Tensor:
    """``relu(((z - mean) * rstd) * gamma + beta)`` in z's dtype."""
    _require_triton("norm_relu_forward_triton", z)
    g, b = _affine(gamma, beta, z)
    return _fwd_op(z, mean, rstd, g, b)


def norm_relu_backward_triton(grad_a: Tensor, z: Tensor, mean: Tensor, rstd: Tensor,
                              gamma: Tensor | None, beta: Tensor | None, batch_stats: bool):
    """(grad_z, grad_gamma, grad_beta) of :func:`norm_relu_forward_triton`."""
    _require_triton("norm_relu_backward_triton", z)
    g, b = _affine(gamma, beta, z)
    grad_z, grad_gamma, grad_beta = _bwd_op(grad_a, z, mean, rstd, g, b, bool(batch_stats))
    return (grad_z, None if gamma is None else grad_gamma, None if beta is None else grad_beta)
