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

Backends: plain-PyTorch references here (CPU and anything else), Triton kernels
(``vcfast.ops.norm_act_triton``, ``kernels/norm_act.py``) for CUDA tensors. A C++ CPU
kernel is future work: CPU tensors use the references.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vcfast import _extension

__all__ = [
    "acc_dtype",
    "instance_norm_stats",
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


def instance_norm_stats(z: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, rstd, unbiased var) over the spatial dims of z [N, C, *spatial], each [N, C]."""
    if z.dim() < 3:
        raise ValueError(f"instance_norm_stats: z must be [N, C, *spatial], got {tuple(z.shape)}")
    n, c = z.shape[:2]
    flat = z.reshape(n, c, -1).to(acc_dtype(z))
    hw = flat.shape[2]
    if hw <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size "
                         f"{list(z.shape)}")
    var, mean = torch.var_mean(flat, dim=2, correction=0)
    rstd = torch.rsqrt(var + eps)
    return mean, rstd, var * (hw / (hw - 1))


def _affine(gamma: Tensor | None, beta: Tensor | None, c: int, like: Tensor, dtype):
    g = like.new_ones((c,), dtype=dtype) if gamma is None else gamma.to(dtype)
    b = like.new_zeros((c,), dtype=dtype) if beta is None else beta.to(dtype)
    return g, b


def norm_relu_forward_reference(z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor | None,
                                beta: Tensor | None) -> Tensor:
    dt = acc_dtype(z)
    nd = z.dim()
    g, b = _affine(gamma, beta, z.shape[1], z, dt)
    xhat = (z.to(dt) - _bcast(mean.to(dt), nd)) * _bcast(rstd.to(dt), nd)
    return torch.relu(xhat * _bcast(g, nd) + _bcast(b, nd)).to(z.dtype)


def norm_relu_backward_reference(grad_a: Tensor, z: Tensor, mean: Tensor, rstd: Tensor,
                                 gamma: Tensor | None, beta: Tensor | None, batch_stats: bool):
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


def _use_triton(t: Tensor) -> bool:
    if t.device.type != "cuda" or not _extension.triton_available():
        return False
    from vcfast.ops import norm_act_triton  # lazy: Triton kernels decorate at first import

    return norm_act_triton.TRITON_IMPORT_ERROR is None


def norm_relu_forward(z: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor | None,
                      beta: Tensor | None) -> Tensor:
    """``relu(((z - mean) * rstd) * gamma + beta)``; Triton on CUDA, else the reference."""
    if _use_triton(z):
        from vcfast.ops.norm_act_triton import norm_relu_forward_triton

        return norm_relu_forward_triton(z, mean, rstd, gamma, beta)
    return norm_relu_forward_reference(z, mean, rstd, gamma, beta)


def norm_relu_backward(grad_a: Tensor, z: Tensor, mean: Tensor, rstd: Tensor,
                       gamma: Tensor | None, beta: Tensor | None, batch_stats: bool):
    """(grad_z, grad_gamma, grad_beta) of :func:`norm_relu_forward` (see the module doc)."""
    if _use_triton(z):
        from vcfast.ops.norm_act_triton import norm_relu_backward_triton

        return norm_relu_backward_triton(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    return norm_relu_backward_reference(grad_a, z, mean, rstd, gamma, beta, batch_stats)
