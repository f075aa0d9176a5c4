"""Memory-lean "InstanceNorm -> ReLU -> conv" units (one activation-sized tensor per block).

In the reference layout ``Conv -> InstanceNorm2d -> ReLU -> Conv`` autograd keeps two
activation-sized tensors per block for backward: the norm's input ``z`` and the ReLU output
``a`` (saved by the next conv). ReLU is not invertible, so ``z`` cannot be recovered from
``a``; instead :class:`InstanceNormReLUConv2d` runs "IN -> ReLU -> conv" as one autograd
function that saves only ``z`` and the per-(sample, channel) statistics (mean, rstd) and
recomputes ``a = relu(gamma * (z - mean) * rstd + beta)`` -- cheap elementwise work, never a
convolution -- when the conv's backward needs it.

Exact against ``nn.InstanceNorm2d(affine=True, track_running_stats=True)`` + ``nn.ReLU`` +
``nn.Conv2d`` / ``nn.ConvTranspose2d``: same statistics (biased variance for normalising,
``eps``), same running-stat update in train mode (``momentum``; unbiased variance; momentum
None leaves them unchanged, like ``F.instance_norm`` with momentum 0; ``num_batches_tracked``
is not touched, like nn.InstanceNorm2d), running statistics in eval mode when tracked.
Not double-differentiable (a second derivative through the unit raises RuntimeError); convs
must use ``padding_mode='zeros'`` and numeric padding.

Autocast (``torch.autocast(device_type="cpu" | "cuda", dtype=torch.bfloat16 / float16)``): the
unit behaves like the layers it replaces under autocast. The statistics and the norm-ReLU
arithmetic run in float32 (``acc_dtype``) whatever z's dtype; the activation is rounded once
to the autocast dtype and the convolution runs in it with weight and bias cast to it, as
``nn.Conv2d`` does under autocast (float64 tensors are left alone, as autocast leaves them).
The casts are explicit: the autocast dtype is captured when the forward runs and the backward
uses it whatever autocast state ``backward()`` is called in (the role of
``torch.amp.custom_fwd`` / ``custom_bwd``, but for either device type); the gradients of
weight / bias come back in the parameters' dtype, grad_z in z's dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from vcfast.ops.norm_act import (
    acc_dtype,
    instance_norm_stats,
    norm_relu_backward,
    norm_relu_forward,
)

__all__ = ["InstanceNormReLUConv2d", "LeanResidualBlock", "instance_norm_relu_conv",
           "residual_block_main"]


def _conv_config(conv: nn.Module):
    if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
        raise TypeError(f"expected nn.Conv2d or nn.ConvTranspose2d, got {type(conv).__name__}")
    if conv.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode={conv.padding_mode!r}: only 'zeros' is supported")
    if isinstance(conv.padding, str):
        raise NotImplementedError(f"padding={conv.padding!r}: give numeric padding")
    transposed = isinstance(conv, nn.ConvTranspose2d)
    output_padding = list(conv.output_padding) if transposed else [0, 0]
    return (list(conv.stride), list(conv.padding), list(conv.dilation), transposed,
            output_padding, conv.groups)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` would run a convolution on ``t`` in, or None (autocast off,
    a device type autocast does not support, or a float64 tensor, which autocast never casts)."""
    device_type = t.device.type
    if device_type not in _AUTOCAST_DEVICES or t.dtype == torch.float64:
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_off(device_type: str):
    """Disables autocast for explicitly cast code (a no-op where autocast is off)."""
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    if t is None or dtype is None or t.dtype == torch.float64:
        return t
    return t.to(dtype)


_DOUBLE_BACKWARD_ERROR = (
    "InstanceNormReLUConv2d / LeanResidualBlock / instance_norm_relu_conv: second derivatives "
    "(double backward, e.g. a gradient penalty through this unit) are not supported: the "
    "lean unit recomputes its activation without a graph. Use nn.InstanceNorm2d, nn.ReLU and "
    "the convolution as separate modules where a double backward is needed")


def _refuse_double_backward(grads: tuple, sources: tuple) -> tuple:
    """``grads`` with a graph that raises ``_DOUBLE_BACKWARD_ERROR`` if differentiated.

    The graph must lead to ``sources`` (the tensors the gradients depend on), or a second
    ``torch.autograd.grad(..., inputs=[z])`` would prune the raising node and silently see
    no dependence: one element of each source joins the error node as an extra input.
    """
    present = [g for g in grads if g is not None]
    anchors = [t.reshape(-1)[:1] for t in sources if t is not None and t.requires_grad]
    if not present or not anchors:
        return grads  # nothing a second derivative could reach
    anchor = torch.cat([a.to(present[0].dtype) for a in anchors])
    refuse = torch._C._functions.DelayedError(_DOUBLE_BACKWARD_ERROR, len(present) + 1)
    wrapped = iter(refuse(*present, anchor)[:len(present)])
    return tuple(None if g is None else next(wrapped) for g in grads)


class _NormReLUConvFn(torch.autograd.Function):
    """out = conv(relu(gamma * (z - mean) * rstd + beta)); saves z (not the activation)."""

    @staticmethod
    def forward(ctx, z, mean, rstd, gamma, beta, weight, bias, conv_cfg, batch_stats,
                conv_dtype=None):
        # conv_dtype: the autocast dtype captured by the caller (None: no autocast; optional,
        # so callers of the earlier 9-argument form keep working).
        with _autocast_off(z.device.type):
            a = _cast(norm_relu_forward(z, mean, rstd, gamma, beta), conv_dtype)
            out = torch.ops.aten.convolution(a, _cast(weight, conv_dtype), _cast(bias, conv_dtype),
                                             *conv_cfg)
        del a
        ctx.save_for_backward(z, mean, rstd, gamma, beta, weight)
        ctx.conv_cfg = conv_cfg
        ctx.batch_stats = batch_stats
        ctx.conv_dtype = conv_dtype
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Under create_graph=True (a double backward) the gradients must carry a graph, and
        # this backward, which recomputes the activation under no_grad, cannot give one: they
        # get a graph that raises when differentiated. once_differentiable does that only when
        # grad_out requires grad; otherwise (e.g. after ``.sum()``) it returns gradients
        # without a graph, silently dropping the second-order terms through z and weight.
        create_graph = torch.is_grad_enabled() and not torch.compiler.is_compiling()
        saved = ctx.saved_tensors  # once: checkpointing allows one unpack per backward
        with torch.no_grad():
            grads = _NormReLUConvFn._gradients(ctx, grad_out, *saved)
        if not create_graph:
            return grads
        z, _, _, gamma, beta, weight = saved
        return _refuse_double_backward(grads, (grad_out, z, gamma, beta, weight))

    @staticmethod
    def _gradients(ctx, grad_out, z, mean, rstd, gamma, beta, weight):
        need_z, _, _, need_gamma, need_beta, need_w, need_b = ctx.needs_input_grad[:7]
        need_a = need_z or need_gamma or need_beta
        conv_dtype = ctx.conv_dtype
        # The same explicit casts as the forward, whatever autocast state backward() runs in.
        with _autocast_off(z.device.type):
            a = _cast(norm_relu_forward(z, mean, rstd, gamma, beta), conv_dtype)  # the recompute
            grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
                _cast(grad_out, conv_dtype), a,
                _cast(weight, conv_dtype), ctx.bias_sizes, *ctx.conv_cfg, [need_a, need_w, need_b])
            del a
            grad_z = grad_gamma = grad_beta = None
            if need_a:
                grad_z, grad_gamma, grad_beta = norm_relu_backward(
                    grad_a, z, mean, rstd, gamma, beta, ctx.batch_stats)
                del grad_a
                if grad_gamma is not None:
                    grad_gamma = grad_gamma.to(gamma.dtype)
                if grad_beta is not None:
                    grad_beta = grad_beta.to(beta.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        grads = (grad_z if need_z else None, None, None,
                 grad_gamma if need_gamma else None, grad_beta if need_beta else None,
                 grad_w, grad_b if need_b else None, None, None, None)
        return grads[:len(ctx.needs_input_grad)]  # one per input given to apply()


def instance_norm_relu_conv(z: Tensor, norm: nn.InstanceNorm2d, conv: nn.Module) -> Tensor:
    """``conv(relu(norm(z)))`` keeping only ``z`` and [N, C] statistics for backward.

    ``norm``'s running statistics are updated in place exactly as ``norm(z)`` would. Under
    ``torch.autocast`` the convolution runs in the autocast dtype (see the module doc).
    """
    if z.dim() != 4:
        raise ValueError(f"instance_norm_relu_conv: expected a 4-D input, got {z.dim()}-D")
    if z.shape[1] != norm.num_features:
        raise ValueError(f"expected {norm.num_features} channels, got {z.shape[1]}")
    conv_cfg = _conv_config(conv)
    batch_stats = norm.training or not norm.track_running_stats
    conv_dtype = _autocast_dtype(z)
    if conv_dtype is not None and conv.weight.dtype == torch.float64:
        conv_dtype = None  # autocast leaves float64 alone
    if batch_stats:
        with torch.no_grad(), _autocast_off(z.device.type):
            mean, rstd, var_unbiased = instance_norm_stats(z.detach(), norm.eps)
            if norm.track_running_stats and norm.running_mean is not None:
                m = norm.momentum if norm.momentum is not None else 0.0
                rm, rv = norm.running_mean, norm.running_var
                rm.copy_(rm * (1 - m) + mean.mean(0).to(rm.dtype) * m)
                rv.copy_(rv * (1 - m) + var_unbiased.mean(0).to(rv.dtype) * m)
    else:
        dt = acc_dtype(z)
        n = z.shape[0]
        with torch.no_grad(), _autocast_off(z.device.type):
            mean = norm.running_mean.to(dt).expand(n, -1).contiguous()
            rstd = torch.rsqrt(norm.running_var.to(dt) + norm.eps).expand(n, -1).contiguous()
    return _NormReLUConvFn.apply(z, mean, rstd, norm.weight, norm.bias, conv.weight, conv.bias,
                                 conv_cfg, batch_stats, conv_dtype)


class InstanceNormReLUConv2d(nn.Module):
    """``conv(relu(norm(z)))`` as one unit that saves ``z`` but not the ReLU output.

    Wraps existing modules (parameters shared): ``InstanceNormReLUConv2d(norm, conv)`` with
    ``norm`` an ``nn.InstanceNorm2d`` (affine or not, tracked running stats or not) and
    ``conv`` an ``nn.Conv2d`` or ``nn.ConvTranspose2d`` (padding_mode 'zeros'). State-dict keys
    are ``norm.*`` and ``conv.*``.
    """

    def __init__(self, norm: nn.InstanceNorm2d, conv: nn.Module):
        super().__init__()
        if not isinstance(norm, nn.InstanceNorm2d):
            raise TypeError(f"expected nn.InstanceNorm2d, got {type(norm).__name__}")
        _conv_config(conv)
        self.norm = norm
        self.conv = conv

    @classmethod
    def from_sizes(cls, channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                   bias: bool = True, eps: float = 1e-5, momentum: float | None = 0.1,
                   **conv_kwargs) -> "InstanceNormReLUConv2d":
        norm = nn.InstanceNorm2d(channels, eps=eps, momentum=momentum, affine=True,
                                 track_running_stats=True)
        conv = nn.Conv2d(channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias=bias, **conv_kwargs)
        return cls(norm, conv)

    def forward(self, z: Tensor) -> Tensor:
        return instance_norm_relu_conv(z, self.norm, self.conv)


def residual_block_main(dim_in: int, dim_out: int) -> nn.Sequential:
    """The ``main`` branch of the official StarGAN ``ResidualBlock``, module for module (the
    lean and the official block both hold exactly this, so their state dicts match)."""
    return nn.Sequential(
        nn.Conv2d(dim_in, dim_out, kernel_size=3, stride=1, padding=1, bias=False),
        nn.InstanceNorm2d(dim_out, affine=True, track_running_stats=True),
        nn.ReLU(inplace=True),
        nn.Conv2d(dim_out, dim_out, kernel_size=3, stride=1, padding=1, bias=False),
        nn.InstanceNorm2d(dim_out, affine=True, track_running_stats=True),
    )


class LeanResidualBlock(nn.Module):
    """StarGAN's residual block, ``x + main(x)``, with the IN -> ReLU -> conv middle lean.

    Same modules and state-dict keys as the official code's
    ``main = nn.Sequential(Conv2d(3x3, bias=False), InstanceNorm2d(affine, tracked), ReLU,
    Conv2d(3x3, bias=False), InstanceNorm2d(affine, tracked))``, so official checkpoints load
    both ways; :meth:`from_official` shares an existing block's ``main``.
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.main = residual_block_main(dim_in, dim_out)

    @classmethod
    def from_official(cls, block: nn.Module) -> "LeanResidualBlock":
        """A lean block sharing ``block.main``'s modules (parameters and buffers)."""
        main = block.main
        lean = cls.__new__(cls)
        nn.Module.__init__(lean)
        lean.main = main
        return lean

    def forward(self, x: Tensor) -> Tensor:
        conv1, norm1, _, conv2, norm2 = self.main
        h = instance_norm_relu_conv(conv1(x), norm1, conv2)
        return x + norm2(h)
