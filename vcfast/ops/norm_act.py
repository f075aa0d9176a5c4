"""Fused instance-norm + ReLU ops for the memory-lean "IN -> ReLU -> conv" blocks.

The lean blocks (``vcfast.nn.norm_act``) keep only the norm's input ``z`` [N, C, *spatial]
and per-(sample, channel) statistics for backward, and recompute the normalised-activated
tensor when the following convolution's backward needs it. Three ops do the elementwise work:

* ``instance_norm_stats(z, eps) -> (mean, rstd, var_unbiased)``, each [N, C]: batch
  statistics over the spatial dims (biased variance for normalising, rstd = 1/sqrt(var + eps);
  the unbiased variance feeds the running stats, like ``nn.InstanceNorm2d``).
* ``norm_relu_forward(z, mean, rstd, gamma, beta) -> a``:
  ``a = relu(((z - mean) * rstd) * gamma + beta)`` in z's dtype.
* ``norm_relu_backward(grad_a, z, mean, rstd, gamma, beta, batch_stats)
  -> (grad_z, grad_gamma, grad_beta)``: with ``xhat = (z - mean) * rstd``,
  ``g = grad_a * (a > 0)`` (ReLU's derivative at 0 is 0, PyTorch's convention),
  ``grad_beta[c] = sum_{n, hw} g``, ``grad_gamma[c] = sum_{n, hw} g * xhat`` and
  ``grad_z = gamma * rstd * (g - mean_hw(g) - xhat * mean_hw(g * xhat))`` when the
  statistics are the sample's own (``batch_stats``: train mode), else (eval mode, running
  statistics are constants) ``grad_z = gamma * rstd * g``.

dtypes: z / grad_a float16, bfloat16, float32 or float64. Statistics, gamma, beta and the
arithmetic are float32 (float64 for float64 z) -- the "accumulation dtype" ``acc_dtype(z)``;
``a`` and ``grad_z`` come back in z's dtype, grad_gamma / grad_beta [C] in the accumulation
dtype. ``gamma`` / ``beta`` may be None (non-affine norm: 1 and 0; their grads are then None).

Backends, picked by z's device:

* CPU: the C++ ops ``vcfast::instance_norm_stats``, ``vcfast::norm_relu_forward`` and
  ``vcfast::norm_relu_backward`` (csrc/cpu/norm_act_cpu.cpp, per-element math in
  csrc/include/vcfast/norm_act_math.h): one pass (forward, stats per pass, eval backward) or
  two (train backward) over each (n, c) plane, plane sums in double, parallel over planes.
  They take any spatial rank and any strides; gamma / beta are optional (``Tensor?``) and the
  backward always returns grad_gamma / grad_beta (the Python wrapper drops them for None).
  Fake (meta) implementations are registered here, so the meta-device estimator traces them.
* CUDA: Triton kernels (``vcfast.ops.norm_act_triton``, ``kernels/norm_act.py``).
* Anything else, or a build without the C++ ops: the plain-PyTorch references
  (``instance_norm_stats_reference``, ``norm_relu_forward_reference``,
  ``norm_relu_backward_reference``), which stay public for tests and benchmarks.

The C++ and reference results agree to rounding: float64 to ~1e-15, float32 to ~1e-6 (the
C++ plane sums are double, the reference's float32), half types to one rounding of the
output dtype. The ops are not differentiable themselves (the lean unit's autograd function
calls the backward op).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vcfast import _extension

__all__ = [
    "acc_dtype",
    "instance_norm_stats",
    "instance_norm_stats_reference",
    "norm_relu_forward",
    "norm_relu_backward",
    "norm_relu_forward_reference",
    "norm_relu_backward_reference",
]

_HALF = (torch.float16, torch.bfloat16)


def acc_dtype(z: Tensor) -> torch.dtype:
    """Statistics / arithmetic dtype for activations of z's dtype."""
    return torch.float32 if z.dtype in _HALF else z.dtype


def _bcast(v: Tensor, ndim: int) -> Tensor:
    """[N, C] or [C] -> broadcastable against [N, C, *spatial]."""
    return v.reshape(v.shape + (1,) * (ndim - 2))


def instance_norm_stats_reference(z: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Plain-PyTorch (mean, rstd, unbiased var) over the spatial dims of z, each [N, C]."""
    if z.dim() < 3:
        raise ValueError(f"instance_norm_stats: z must be [N, C, *spatial], got {tuple(z.shape)}")
    n, c = z.shape[:2]
    hw = math.prod(z.shape[2:])
    # reshape(n, c, -1) cannot infer -1 for an empty batch; the plane size is known anyway.
    flat = z.reshape(n, c, hw).to(acc_dtype(z))
    if hw <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size "
                         f"{list(z.shape)}")
    if n * c == 0:  # nothing to reduce (var_mean would warn about degrees of freedom)
        empty = flat.new_empty((n, c))
        return empty, empty.clone(), empty.clone()
    var, mean = torch.var_mean(flat, dim=2, correction=0)
    rstd = torch.rsqrt(var + eps)
    return mean, rstd, var * (hw / (hw - 1))


def _affine(gamma: Tensor | None, beta: Tensor | None, c: int, like: Tensor, dtype):
    g = like.new_ones((c,), dtype=dtype) if gamma is None else gamma.to(dtype)
    b = like.new_zeros((c,), dtype=dtype) if beta is None else beta.to(dtype)
    return g, b


def norm_relu_forward_reference(z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor | None,
                                beta: Tensor | None) -> Tensor:
    """Plain-PyTorch ``relu(((z - mean) * rstd) * gamma + beta)`` in z's dtype."""
    dt = acc_dtype(z)
    nd = z.dim()
    g, b = _affine(gamma, beta, z.shape[1], z, dt)
    xhat = (z.to(dt) - _bcast(mean.to(dt), nd)) * _bcast(rstd.to(dt), nd)
    return torch.relu(xhat * _bcast(g, nd) + _bcast(b, nd)).to(z.dtype)


def norm_relu_backward_reference(grad_a: Tensor, z: Tensor, mean: Tensor, rstd: Tensor,
                                 gamma: Tensor | None, beta: Tensor | None, batch_stats: bool):
    """Plain-PyTorch (grad_z, grad_gamma, grad_beta) of :func:`norm_relu_forward_reference`."""
    dt = acc_dtype(z)
    nd = z.dim()
    g_, b_ = _affine(gamma, beta, z.shape[1], z, dt)
    rstd_b = _bcast(rstd.to(dt), nd)
    xhat = (z.to(dt) - _bcast(mean.to(dt), nd)) * rstd_b
    y = xhat * _bcast(g_, nd) + _bcast(b_, nd)
    g = torch.where(y > 0, grad_a.to(dt), 0.0)
    red = tuple(range(2, nd))
    sum_g = g.sum(red)  # [N, C]
    sum_gx = (g * xhat).sum(red)
    scale = _bcast(g_, nd) * rstd_b
    if batch_stats:
        hw = z[0, 0].numel()
        grad_z = scale * (g - _bcast(sum_g / hw, nd) - xhat * _bcast(sum_gx / hw, nd))
    else:
        grad_z = scale * g
    grad_gamma = None if gamma is None else sum_gx.sum(0)
    grad_beta = None if beta is None else sum_g.sum(0)
    return grad_z.to(z.dtype), grad_gamma, grad_beta


_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HAS_KERNEL = all(_extension.has_op(name) for name in
                  ("instance_norm_stats", "norm_relu_forward", "norm_relu_backward"))


def _check_inputs(name: str, z: Tensor, mean: Tensor | None = None, rstd: Tensor | None = None,
                  gamma: Tensor | None = None, beta: Tensor | None = None,
                  grad_a: Tensor | None = None) -> None:
    """Clear Python errors (dtype, shape, device) before any backend runs."""
    if not isinstance(z, Tensor):
        raise TypeError(f"{name}: z must be a Tensor, got {type(z).__name__}")
    if z.dtype not in _SUPPORTED:
        raise TypeError(f"{name}: z must be float16, bfloat16, float32 or float64, got {z.dtype}")
    if z.dim() < 3:
        raise ValueError(f"{name}: z must be [N, C, *spatial], got shape {tuple(z.shape)}")
    n, c = z.shape[:2]
    expected = {"mean": n * c, "rstd": n * c, "gamma": c, "beta": c}
    for arg, t in (("mean", mean), ("rstd", rstd), ("gamma", gamma), ("beta", beta)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{name}: {arg} must be floating point, got {t.dtype}")
        if t.numel() != expected[arg]:
            what = "N * C" if arg in ("mean", "rstd") else "C"
            raise ValueError(f"{name}: {arg} must have {expected[arg]} elements ({what}), "
                             f"got shape {tuple(t.shape)}")
        if t.device != z.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, z on {z.device}")
    if grad_a is not None:
        if grad_a.shape != z.shape:
            raise ValueError(f"{name}: grad_a {tuple(grad_a.shape)} must have z's shape "
                             f"{tuple(z.shape)}")
        if not grad_a.is_floating_point():
            raise TypeError(f"{name}: grad_a must be floating point, got {grad_a.dtype}")
        if grad_a.device != z.device:
            raise ValueError(f"{name}: grad_a is on {grad_a.device}, z on {z.device}")


def _use_kernel(t: Tensor) -> bool:
    # Meta tensors go through the op's fake implementation: the memory estimator then sizes
    # the fused op (outputs only), as the CPU kernel and the Triton kernels really run it,
    # rather than the reference's elementwise temporaries.
    return _HAS_KERNEL and t.device.type in ("cpu", "meta")


if _HAS_KERNEL:

    @torch.library.register_fake("vcfast::instance_norm_stats")
    def _instance_norm_stats_fake(z, eps):
        torch._check(z.dim() >= 3,
                     lambda: "vcfast::instance_norm_stats: z must be [N, C, *spatial]")
        shape = (z.shape[0], z.shape[1])
        dt = acc_dtype(z)
        return tuple(z.new_empty(shape, dtype=dt) for _ in range(3))

    @torch.library.register_fake("vcfast::norm_relu_forward")
    def _norm_relu_forward_fake(z, mean, rstd, gamma, beta):
        torch._check(z.dim() >= 3, lambda: "vcfast::norm_relu_forward: z must be [N, C, *spatial]")
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    @torch.library.register_fake("vcfast::norm_relu_backward")
    def _norm_relu_backward_fake(grad_a, z, mean, rstd, gamma, beta, batch_stats):
        torch._check(z.dim() >= 3, lambda: "vcfast::norm_relu_backward: z must be [N, C, *spatial]")
        torch._check(grad_a.shape == z.shape,
                     lambda: "vcfast::norm_relu_backward: grad_a must have z's shape")
        dt = acc_dtype(z)
        c = z.shape[1]
        return (torch.empty_like(z, memory_format=torch.contiguous_format),
                z.new_empty((c,), dtype=dt), z.new_empty((c,), dtype=dt))


def instance_norm_stats(z: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, rstd, unbiased var) over the spatial dims of z [N, C, *spatial], each [N, C]
    in ``acc_dtype(z)``; C++ on CPU, else the reference. Needs more than one spatial element."""
    _check_inputs("instance_norm_stats", z)
    if _use_kernel(z):
        return torch.ops.vcfast.instance_norm_stats(z, float(eps))
    return instance_norm_stats_reference(z, eps)


def _use_triton(t: Tensor) -> bool:
    if t.device.type != "cuda" or not _extension.triton_available():
        return False
    from vcfast.ops import norm_act_triton  # lazy: Triton kernels decorate at first import

    return norm_act_triton.TRITON_IMPORT_ERROR is None


def norm_relu_forward(z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor | None,
                      beta: Tensor | None) -> Tensor:
    """``relu(((z - mean) * rstd) * gamma + beta)`` in z's dtype; C++ on CPU, Triton on CUDA,
    else the reference."""
    _check_inputs("norm_relu_forward", z, mean, rstd, gamma, beta)
    if _use_kernel(z):
        return torch.ops.vcfast.norm_relu_forward(z, mean, rstd, gamma, beta)
    if _use_triton(z):
        from vcfast.ops.norm_act_triton import norm_relu_forward_triton

        return norm_relu_forward_triton(z, mean, rstd, gamma, beta)
    return norm_relu_forward_reference(z, mean, rstd, gamma, beta)


def norm_relu_backward(grad_a: Tensor, z: Tensor, mean: Tensor, rstd: Tensor,
                       gamma: Tensor | None, beta: Tensor | None, batch_stats: bool):
    """(grad_z, grad_gamma, grad_beta) of :func:`norm_relu_forward` (see the module doc);
    grad_gamma / grad_beta are None where gamma / beta are."""
    _check_inputs("norm_relu_backward", z, mean, rstd, gamma, beta, grad_a)
    if _use_kernel(z):
        grad_z, grad_gamma, grad_beta = torch.ops.vcfast.norm_relu_backward(
            grad_a.to(z.dtype), z, mean, rstd, gamma, beta, bool(batch_stats))
        return grad_z, None if gamma is None else grad_gamma, None if beta is None else grad_beta
    if _use_triton(z):
        from vcfast.ops.norm_act_triton import norm_relu_backward_triton

        return norm_relu_backward_triton(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    return norm_relu_backward_reference(grad_a, z, mean, rstd, gamma, beta, batch_stats)
