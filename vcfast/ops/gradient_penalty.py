"""Exact WGAN-GP gradient penalty without double backward, for piecewise-linear critics.

WGAN-GP needs g = grad_x D(x_hat) and then the gradient of gp = mean_i (||g_i|| - 1)^2 with
respect to D's weights. ``torch.autograd.grad(..., create_graph=True)`` (the official StarGAN
code) keeps every layer input, every activation input, every backward signal and the graph
of the backward itself, then runs a double backward. For a critic made of linear layers
(Conv2d, ConvTranspose2d, Linear) and LeakyReLU/ReLU, with the slopes fixed by the forward:

    z_k = W_k a_{k-1} + c_k,  a_k = s_k * z_k   (s_k = 1 where z_k > 0, else the negative slope)
    b_k = dD/dz_k: b_K = 1, b_k = s_k * (W_{k+1}^T b_{k+1});   g = W_1^T b_1
    u = d gp / d g = 2 (n_i - 1) / n_i * g_i / N
    t_0 = u,  t_k = s_k * (W_k t_{k-1})                          (tangent pass, no bias)
    d gp / d W_k = weight-gradient correlation of input t_{k-1} with output gradient b_k

which equals autograd's double backward exactly (the slopes' own derivative is zero almost
everywhere, and PyTorch uses the same convention at 0). It keeps one activation-sized b_k
per linear layer plus one bit per activation element, frees t and b layer by layer, and
calls only ordinary conv forward / input-grad / weight-grad kernels. Biases get no gradient
from the penalty (they do not change g).

Use :func:`gradient_penalty`; ``mode="autograd"`` is the reference (official StarGAN).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vcfast.ops.slope_bits import leaky_relu_with_bits, penalty_terms, scale_by_slope_bits_

__all__ = [
    "gradient_penalty",
    "gradient_penalty_layers",
    "UnsupportedCriticError",
    "interpolate",
]

_LINEAR = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_ACTIVATIONS = (nn.LeakyReLU, nn.ReLU)
_RESHAPES = (nn.Flatten, nn.Identity)
_MODES = ("lean", "autograd", "auto")


class UnsupportedCriticError(TypeError):
    """The critic has a layer the lean penalty cannot differentiate exactly."""


def gradient_penalty_layers(critic: nn.Module) -> list[nn.Module]:
    """The ordered layers whose composition is the critic output the penalty uses.

    A critic declares them by defining ``gradient_penalty_layers()`` (StarGAN's D returns its
    trunk plus the src head, leaving the classifier head out); an ``nn.Sequential`` is taken
    as it is, nested Sequentials flattened. Anything else raises UnsupportedCriticError.
    """
    declared = getattr(critic, "gradient_penalty_layers", None)
    if callable(declared):
        layers = list(declared())
    elif isinstance(critic, nn.Sequential):
        layers = list(critic)
    else:
        raise UnsupportedCriticError(
            f"gradient_penalty: cannot see inside {type(critic).__name__}; pass an nn.Sequential, "
            "or give the critic a gradient_penalty_layers() method returning its layers in order "
            "(see vcfast.nn.PiecewiseLinearCritic)")
    flat: list[nn.Module] = []
    for layer in layers:
        flat.extend(gradient_penalty_layers(layer) if isinstance(layer, nn.Sequential) else [layer])
    return flat


def _check_supported(layers: Sequence[nn.Module]) -> None:
    if not any(isinstance(layer, _LINEAR) for layer in layers):
        raise UnsupportedCriticError("gradient_penalty: the critic has no Conv2d/ConvTranspose2d/Linear layer")
    for index, layer in enumerate(layers):
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and layer.padding_mode != "zeros":
            raise UnsupportedCriticError(
                f"gradient_penalty(mode='lean'): layer {index} ({layer}) uses padding_mode="
                f"{layer.padding_mode!r}; only 'zeros' is supported")
        if not isinstance(layer, _LINEAR + _ACTIVATIONS + _RESHAPES):
            raise UnsupportedCriticError(
                f"gradient_penalty(mode='lean'): layer {index} ({type(layer).__name__}: {layer}) is not "
                "piecewise-linear (supported: Conv2d, ConvTranspose2d, Linear, LeakyReLU, ReLU, "
                "Flatten, Identity); use mode='autograd' or mode='auto'")


def _negative_slope(layer: nn.Module) -> float:
    return float(layer.negative_slope) if isinstance(layer, nn.LeakyReLU) else 0.0


def _linear_no_bias(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's linear map (its bias left out) applied to x, with an explicit weight.

    The weight is cast to x's dtype: under autocast the forward ran in bf16/fp16, and the
    backward-with-ones and tangent passes follow it in that precision.
    """
    weight = weight.to(x.dtype)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, None, layer.stride, layer.padding, layer.output_padding,
                                  layer.groups, layer.dilation)
    return F.linear(x, weight)


def _adjoint(layer: nn.Module, grad_out: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
    """W^T grad_out: the layer's input gradient, which does not depend on its input."""
    weight = layer.weight.to(grad_out.dtype)
    if isinstance(layer, nn.Conv2d):
        return torch.nn.grad.conv2d_input(input_shape, weight, grad_out, layer.stride,
                                          layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, nn.ConvTranspose2d):
        # conv_transpose2d is the adjoint of conv2d with the same weight, so its adjoint is conv2d.
        return F.conv2d(grad_out, weight, None, layer.stride, layer.padding, layer.dilation,
                        layer.groups)
    return grad_out @ weight


# Convolutions whose output would exceed this run over slices of the batch: oneDNN's CPU
# convolutions allocate format-conversion copies about the size of their operands, and at
# paper size those transients, not the kept tensors, set the penalty's peak.
_BATCH_SLICE_BYTES = 16 * 2**20


def _in_batch_slices(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a per-sample map fn, computed over batch slices into one output.

    The first slice is sized from the input (a guess); the output it returns fixes the step
    for the rest. Nothing is computed twice, and a batch that fits runs as one call.
    """
    in_per_sample = x[:1].numel() * x.element_size()
    first_step = max(1, _BATCH_SLICE_BYTES // max(in_per_sample, 1))
    first = fn(x[:first_step])
    if first_step >= x.shape[0]:
        return first
    per_sample = first[:1].numel() * first.element_size()
    step = max(1, _BATCH_SLICE_BYTES // max(per_sample, 1))
    out = first.new_empty((x.shape[0], *first.shape[1:]))
    out[:first_step] = first
    del first
    for start in range(first_step, x.shape[0], step):
        out[start:start + step] = fn(x[start:start + step])
    return out


@dataclass
class _LeanState:
    output_grads: list  # b_k per linear layer (None where not a linear layer)
    slope_bits: list  # packed bits per activation (None elsewhere)
    input_shapes: list
    u: torch.Tensor


def _lean_forward(layers, x_hat: torch.Tensor, target: float, weight: float):
    """gp and what the tangent pass needs; runs without autograd."""
    bits: list = [None] * len(layers)
    shapes: list = [None] * len(layers)
    with torch.no_grad():
        a = x_hat
        for index, layer in enumerate(layers):
            shapes[index] = a.shape
            if isinstance(layer, _ACTIVATIONS):
                a, bits[index] = leaky_relu_with_bits(a, _negative_slope(layer))
            elif isinstance(layer, _LINEAR):
                a = _in_batch_slices(layer, a)
            else:
                a = layer(a)
        # backward from the output with ones: b_k kept, g = grad_x D
        grad = torch.ones_like(a)
        del a
        output_grads: list = [None] * len(layers)
        for index in range(len(layers) - 1, -1, -1):
            layer = layers[index]
            if isinstance(layer, _ACTIVATIONS):
                # In place: grad is always a fresh tensor here (ones or an adjoint's output),
                # never one of the stored b_k.
                grad = scale_by_slope_bits_(grad, bits[index], _negative_slope(layer))
            elif isinstance(layer, _LINEAR):
                output_grads[index] = grad
                shape = shapes[index]
                grad = _in_batch_slices(lambda g, layer=layer, shape=shape: _adjoint(layer, g, (g.shape[0], *shape[1:])), grad)
            else:  # Flatten / Identity: a reshape
                grad = grad.reshape(shapes[index])
        gp, u = penalty_terms(grad, target, weight)
    return gp, _LeanState(output_grads, bits, shapes, u)


# Weight gradients larger than this are computed in slices of output channels, so the
# transient of the largest paper-size D layer (128 MiB) shrinks to this size.
_WEIGHT_GRAD_SLICE_BYTES = 16 * 2**20


def _weight_grad(layer: nn.Module, t: torch.Tensor, b: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of d<b, W t>/dW: the weight-gradient correlation of input t with b."""
    weight = layer.weight
    if isinstance(layer, nn.Conv2d):
        return torch.nn.grad.conv2d_weight(t, (hi - lo, *weight.shape[1:]), b[:, lo:hi], layer.stride,
                                           layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, nn.ConvTranspose2d):
        # <b, conv_transpose(t; W)> = <conv2d(b; W), t>: the roles of input and gradient swap.
        return torch.nn.grad.conv2d_weight(b, weight.shape, t, layer.stride, layer.padding,
                                           layer.dilation, layer.groups)
    return b[..., lo:hi].reshape(-1, hi - lo).t() @ t.reshape(-1, t.shape[-1])


def _accumulate_weight_grad(layer: nn.Module, t: torch.Tensor, b: torch.Tensor) -> None:
    """weight.grad += d<b, W t>/dW, in output-channel slices when the gradient is large."""
    weight = layer.weight
    sliceable = isinstance(layer, (nn.Conv2d, nn.Linear)) and getattr(layer, "groups", 1) == 1
    n_slices = 1
    if sliceable:
        n_slices = min(weight.shape[0], -(-weight.numel() * weight.element_size() // _WEIGHT_GRAD_SLICE_BYTES))
    # The correlation sums over the batch, so it can also run over batch slices, bounding
    # the operand copies oneDNN makes (b_1 is 64 MiB per 16 samples at paper size).
    per_sample = b[:1].numel() * b.element_size()
    batch_step = max(1, _BATCH_SLICE_BYTES // max(per_sample, 1))
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    for start in range(0, b.shape[0], batch_step):
        t_part, b_part = t[start:start + batch_step], b[start:start + batch_step]
        for rows in torch.arange(weight.shape[0]).tensor_split(n_slices):
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            weight.grad[lo:hi].add_(_weight_grad(layer, t_part, b_part, lo, hi))


def _lean_backward(layers, state: _LeanState, scale: torch.Tensor) -> None:
    """Tangent pass: accumulates d gp / d W_k into each linear layer's ``weight.grad``.

    Accumulating as the pass goes (rather than returning every weight gradient from the
    autograd Function at once) keeps one slice of one layer's weight gradient alive at a
    time, and each b_k is freed before the layer's next tangent is computed, so the pass
    never holds more than the remaining b's plus one tangent.
    """
    tangent = state.u * scale
    last_linear = max(i for i, layer in enumerate(layers) if isinstance(layer, _LINEAR))
    with torch.no_grad():
        for index, layer in enumerate(layers):
            if isinstance(layer, _ACTIVATIONS):
                tangent = scale_by_slope_bits_(tangent, state.slope_bits[index], _negative_slope(layer))
                state.slope_bits[index] = None
            elif isinstance(layer, _LINEAR):
                b = state.output_grads[index]
                state.output_grads[index] = None
                if layer.weight.requires_grad:
                    _accumulate_weight_grad(layer, tangent, b)
                del b
                if index == last_linear:
                    break
                tangent = _in_batch_slices(lambda t, layer=layer: _linear_no_bias(layer, t, layer.weight), tangent)
            else:
                tangent = layer(tangent)


class _LeanGradientPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat, layers, target, weight, *weights):
        gp, state = _lean_forward(layers, x_hat, target, weight)
        ctx.layers = layers
        ctx.state = state
        ctx.n_weights = len(weights)
        return gp

    @staticmethod
    def backward(ctx, grad_gp):
        _lean_backward(ctx.layers, ctx.state, grad_gp)
        ctx.state = None
        # The weight gradients were accumulated into .grad during the pass (see
        # _lean_backward); x_hat is a detached interpolation and the rest is configuration.
        return (None,) * (4 + ctx.n_weights)


def interpolate(x_real: torch.Tensor, x_fake: torch.Tensor, eps: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """x_hat = eps * x_real + (1 - eps) * x_fake with eps ~ U(0, 1) per sample (detached)."""
    if x_real.shape != x_fake.shape:
        raise ValueError(f"gradient_penalty: x_real {tuple(x_real.shape)} and x_fake "
                         f"{tuple(x_fake.shape)} must have the same shape")
    n = x_real.shape[0]
    if eps is None:
        eps = torch.rand(n, generator=generator, device="cpu" if generator is not None else x_real.device,
                         dtype=x_real.dtype).to(x_real.device)
    eps = torch.as_tensor(eps, dtype=x_real.dtype, device=x_real.device)
    if eps.numel() == 1:
        eps = eps.reshape(1).expand(n)
    if eps.numel() != n:
        raise ValueError(f"gradient_penalty: eps must have one value per sample ({n}), got {eps.numel()}")
    eps = eps.reshape(n, *([1] * (x_real.dim() - 1)))
    return (eps * x_real.detach() + (1 - eps) * x_fake.detach())


def _autograd_penalty(critic_fn, x_hat: torch.Tensor, target: float, weight: float) -> torch.Tensor:
    """The official StarGAN penalty: double backward through autograd."""
    x_hat = x_hat.detach().requires_grad_(True)
    out = critic_fn(x_hat)
    (grad,) = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True)
    grad = grad.reshape(grad.shape[0], -1)
    norms = torch.sqrt(torch.sum(grad**2, dim=1))
    return weight * torch.mean((norms - target) ** 2)


def _penalised_function(critic: nn.Module):
    """What D(x) means for the penalty: the declared layers (e.g. trunk + src head) if any."""
    if callable(getattr(critic, "gradient_penalty_layers", None)):
        return nn.Sequential(*gradient_penalty_layers(critic))
    return critic


_warned_auto = False


def gradient_penalty(
    critic: nn.Module,
    x_real: torch.Tensor,
    x_fake: torch.Tensor,
    weight: float = 10.0,
    target: float = 1.0,
    eps: torch.Tensor | None = None,
    mode: str = "lean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The weighted WGAN-GP penalty, a scalar that composes with the rest of the D loss.

    ``weight * mean_i (||grad_x D(x_hat)_i|| - target)^2`` with x_hat = eps x_real + (1-eps) x_fake,
    eps ~ U(0, 1) per sample unless given. ``(d_loss + gp).backward()`` accumulates the exact
    penalty gradients into the critic's weights (biases get none from the penalty).

    Args:
        critic: an ``nn.Sequential`` of Conv2d / ConvTranspose2d / Linear / LeakyReLU / ReLU /
            Flatten, or a module with ``gradient_penalty_layers()`` (StarGAN's D: trunk + src
            head). ``D(x_hat)`` here is the composition of those layers.
        mode: ``"lean"`` (no double backward, see module doc), ``"autograd"`` (official
            StarGAN double backward; the reference) or ``"auto"`` (lean when every layer is
            supported, otherwise autograd with one warning).
    """
    if mode not in _MODES:
        raise ValueError(f"gradient_penalty: mode must be one of {_MODES}, got {mode!r}")
    x_hat = interpolate(x_real, x_fake, eps, generator)
    if mode == "autograd":
        return _autograd_penalty(_penalised_function(critic), x_hat, target, weight)
    try:
        layers = gradient_penalty_layers(critic)
        _check_supported(layers)
    except UnsupportedCriticError as exc:
        if mode == "lean":
            raise
        global _warned_auto
        if not _warned_auto:
            warnings.warn(f"{exc}; gradient_penalty(mode='auto') falls back to autograd", stacklevel=2)
            _warned_auto = True
        return _autograd_penalty(_penalised_function(critic), x_hat, target, weight)
    weights = [layer.weight for layer in layers if isinstance(layer, _LINEAR)]
    return _LeanGradientPenalty.apply(x_hat, layers, float(target), float(weight), *weights)
