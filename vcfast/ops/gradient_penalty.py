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
calls only ordinary conv forward / input-grad / weight-grad kernels (and, for wide conv
weights, GEMMs on the unfolded tangent). Biases do not change g: their gradient is zero or
None, as autograd's double backward gives them (see _connected_biases).

How the weight gradients reach autograd: each penalised linear layer is an autograd node,
chained from gp inwards (_LeanLayerNode); node k's backward returns d gp / d W_k and hands
the next tangent on. So ``.backward()``, ``torch.autograd.grad``, ``backward(inputs=...)``,
gradient accumulation, ``GradScaler``, hooks and DDP's reducer all see the penalty's
gradients like any other term of the D loss, and autograd accumulates each W_k's gradient
(or adopts it as ``.grad`` when there was none) before the next one is made. Each b_k is
freed as soon as its weight gradient is done.

Order in a combined loss: autograd's engine runs, of the nodes ready, the one made last
first, and a weight's gradient is accumulated only once every term of the loss has delivered
its part. Computing the penalty *before* the critic's other forward passes of the same loss
(``gp = gradient_penalty(...); loss = -D(real) + D(fake) + gp``) makes autograd run the
penalty after the real/fake backward, when little else is alive, so the penalty's weight
gradients are not held while that backward runs (paper-size D, batch 16: 2.14 GB D-step peak
on the meta device against 2.26 GB the other way round; 2.09 GB when the penalty wrote .grad
behind autograd's back). Both orders give the same gradients.

Under ``torch.compile`` the same forward and tangent pass run as the torch.library op
``vcfast::lean_gradient_penalty`` (opaque forward, registered backward), so a whole D loss
compiles with ``fullgraph=True``; the compiled backward returns every weight gradient at
once. Eager mode runs the passes in plain ``torch.autograd.Function`` nodes, so that the
live-bytes tracker of vcfast/tracking.py sees every tensor they allocate.

Use :func:`gradient_penalty`; ``mode="autograd"`` is the reference (official StarGAN).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

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


# --- which critic, which layers ----------------------------------------------------------


def _unwrap_critic(critic: nn.Module):
    """(the module whose layers are penalised, the DistributedDataParallel wrapper or None).

    DistributedDataParallel and DataParallel keep the real module in ``.module``, and
    ``torch.compile`` in ``._orig_mod``; their parameters are the wrapped module's, so
    differentiating the wrapped module's layers gives gradients to the same tensors.
    """
    from torch._dynamo.eval_frame import OptimizedModule  # torch.compile's module wrapper

    ddp = None
    while True:
        if isinstance(critic, nn.parallel.DistributedDataParallel):
            ddp = ddp if ddp is not None else critic
            critic = critic.module
        elif isinstance(critic, nn.DataParallel):
            critic = critic.module
        elif isinstance(critic, OptimizedModule):
            critic = critic._orig_mod
        else:
            return critic, ddp


def gradient_penalty_layers(critic: nn.Module) -> list[nn.Module]:
    """The ordered layers whose composition is the critic output the penalty uses.

    A critic declares them by defining ``gradient_penalty_layers()`` (StarGAN's D returns its
    trunk plus the src head, leaving the classifier head out); an ``nn.Sequential`` is taken
    as it is, nested Sequentials flattened. DistributedDataParallel, DataParallel and
    ``torch.compile`` wrappers are looked through. Anything else raises
    UnsupportedCriticError.
    """
    critic, _ = _unwrap_critic(critic)
    declared = getattr(critic, "gradient_penalty_layers", None)
    if callable(declared):
        layers = list(declared())
    elif isinstance(critic, nn.Sequential):
        layers = list(critic)
    else:
        raise UnsupportedCriticError(
            f"gradient_penalty: cannot see inside {type(critic).__name__}; pass an nn.Sequential, "
            "or give the critic a gradient_penalty_layers() method returning its layers in order "
            "(see vcfast.nn.PiecewiseLinearCritic)"
        )
    flat: list[nn.Module] = []
    for layer in layers:
        flat.extend(gradient_penalty_layers(layer) if isinstance(layer, nn.Sequential) else [layer])
    return flat


# --- the layer plan: what the passes need to know of each layer, as plain numbers -------------

_CONV, _CONV_TRANSPOSE, _DENSE, _ACTIVATION, _FLATTEN = range(5)
_LINEAR_KINDS = (_CONV, _CONV_TRANSPOSE, _DENSE)
_CODE_WIDTH = 10  # ints per step in the op's ``plan_codes``


class _Step(NamedTuple):
    kind: int
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    output_padding: tuple = (0, 0)
    negative_slope: float = 0.0
    start_dim: int = 1  # Flatten
    end_dim: int = -1


def _explicit_padding(index: int, layer: nn.Conv2d) -> tuple:
    """Conv2d padding as two ints; 'valid' and symmetric 'same' are converted."""
    if not isinstance(layer.padding, str):
        return tuple(layer.padding)
    if layer.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
    if any(t % 2 for t in total):
        raise UnsupportedCriticError(
            f"gradient_penalty(mode='lean'): layer {index} ({layer}) uses padding='same' with an "
            "even effective kernel, which pads asymmetrically; give explicit padding instead"
        )
    return tuple(t // 2 for t in total)


def _plan(layers: Sequence[nn.Module]) -> tuple:
    """The critic as a tuple of _Step (Identity layers dropped); raises for what it cannot do."""
    if not any(isinstance(layer, _LINEAR) for layer in layers):
        raise UnsupportedCriticError(
            "gradient_penalty: the critic has no Conv2d/ConvTranspose2d/Linear layer"
        )
    steps = []
    for index, layer in enumerate(layers):
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and layer.padding_mode != "zeros":
            raise UnsupportedCriticError(
                f"gradient_penalty(mode='lean'): layer {index} ({layer}) uses padding_mode="
                f"{layer.padding_mode!r}; only 'zeros' is supported"
            )
        if isinstance(layer, nn.Conv2d):
            steps.append(
                _Step(
                    _CONV,
                    tuple(layer.stride),
                    _explicit_padding(index, layer),
                    tuple(layer.dilation),
                    layer.groups,
                )
            )
        elif isinstance(layer, nn.ConvTranspose2d):
            steps.append(
                _Step(
                    _CONV_TRANSPOSE,
                    tuple(layer.stride),
                    tuple(layer.padding),
                    tuple(layer.dilation),
                    layer.groups,
                    tuple(layer.output_padding),
                )
            )
        elif isinstance(layer, nn.Linear):
            steps.append(_Step(_DENSE))
        elif isinstance(layer, nn.LeakyReLU):
            steps.append(_Step(_ACTIVATION, negative_slope=float(layer.negative_slope)))
        elif isinstance(layer, nn.ReLU):
            steps.append(_Step(_ACTIVATION, negative_slope=0.0))
        elif isinstance(layer, nn.Flatten):
            steps.append(_Step(_FLATTEN, start_dim=layer.start_dim, end_dim=layer.end_dim))
        elif not isinstance(layer, nn.Identity):
            raise UnsupportedCriticError(
                f"gradient_penalty(mode='lean'): layer {index} ({type(layer).__name__}: {layer}) "
                "is not piecewise-linear (supported: Conv2d, ConvTranspose2d, Linear, LeakyReLU, "
                "ReLU, Flatten, Identity); use mode='autograd' or mode='auto'"
            )
    return tuple(steps)


def _encode(plan: tuple) -> tuple[list, list]:
    codes: list = []
    for s in plan:
        codes += [s.kind, *s.stride, *s.padding, *s.dilation, s.groups, *s.output_padding]
        if s.kind == _FLATTEN:
            codes[-9:-7] = [s.start_dim, s.end_dim]
    return codes, [s.negative_slope for s in plan]


def _decode(codes: Sequence[int], negative_slopes: Sequence[float]) -> tuple:
    if len(codes) != _CODE_WIDTH * len(negative_slopes):
        raise ValueError(
            f"lean_gradient_penalty: plan_codes must hold {_CODE_WIDTH} ints per step "
            f"({len(negative_slopes)} steps), got {len(codes)}"
        )
    plan = []
    for i, slope in enumerate(negative_slopes):
        c = [int(v) for v in codes[_CODE_WIDTH * i : _CODE_WIDTH * (i + 1)]]
        if c[0] == _FLATTEN:
            plan.append(_Step(_FLATTEN, start_dim=c[1], end_dim=c[2]))
        elif c[0] == _ACTIVATION:
            plan.append(_Step(_ACTIVATION, negative_slope=float(slope)))
        elif c[0] in _LINEAR_KINDS:
            plan.append(_Step(c[0], (c[1], c[2]), (c[3], c[4]), (c[5], c[6]), c[7], (c[8], c[9])))
        else:
            raise ValueError(f"lean_gradient_penalty: unknown step kind {c[0]} in plan_codes")
    return tuple(plan)


# --- the linear maps ---------------------------------------------------------------------


def _linear(
    step: _Step, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The layer applied to x with explicit weight and bias (None: the bias-free linear map).

    The weight is cast to x's dtype: under autocast the forward ran in bf16/fp16, and the
    backward-with-ones and tangent passes follow it in that precision.
    """
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if step.kind == _CONV:
        return F.conv2d(x, weight, bias, step.stride, step.padding, step.dilation, step.groups)
    if step.kind == _CONV_TRANSPOSE:
        return F.conv_transpose2d(
            x,
            weight,
            bias,
            step.stride,
            step.padding,
            step.output_padding,
            step.groups,
            step.dilation,
        )
    return F.linear(x, weight, bias)


def _adjoint(
    step: _Step, weight: torch.Tensor, grad_out: torch.Tensor, input_shape
) -> torch.Tensor:
    """W^T grad_out: the layer's input gradient, which does not depend on its input."""
    weight = weight.to(grad_out.dtype)
    if step.kind == _CONV:
        return torch.nn.grad.conv2d_input(
            input_shape, weight, grad_out, step.stride, step.padding, step.dilation, step.groups
        )
    if step.kind == _CONV_TRANSPOSE:
        # conv_transpose2d is the adjoint of conv2d with the same weight, so its adjoint is conv2d.
        return F.conv2d(
            grad_out, weight, None, step.stride, step.padding, step.dilation, step.groups
        )
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
        out[start : start + step] = fn(x[start : start + step])
    return out


# Weight gradients larger than this are computed in slices of output channels, so the
# correlation's transient for the largest paper-size D layer (128 MiB) shrinks to this size.
# 8 MiB keeps the penalty's peak (paper-size D, batch 8) where accumulating straight into
# .grad in 16 MiB slices had it, now that the finished gradient is one buffer handed to autograd.
_WEIGHT_GRAD_SLICE_BYTES = 8 * 2**20


def _weight_grad_rows(
    step: _Step, weight_shape, t: torch.Tensor, b: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """Rows [lo, hi) of d<b, W t>/dW: the weight-gradient correlation of input t with b."""
    if step.kind == _CONV:
        return torch.nn.grad.conv2d_weight(
            t,
            (hi - lo, *weight_shape[1:]),
            b[:, lo:hi],
            step.stride,
            step.padding,
            step.dilation,
            step.groups,
        )
    if step.kind == _CONV_TRANSPOSE:
        # <b, conv_transpose(t; W)> = <conv2d(b; W), t>: the roles of input and gradient swap.
        return torch.nn.grad.conv2d_weight(
            b, weight_shape, t, step.stride, step.padding, step.dilation, step.groups
        )
    return b[..., lo:hi].reshape(-1, hi - lo).t() @ t.reshape(-1, t.shape[-1])


def _weight_gradient(
    step: _Step, weight: torch.Tensor, t: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """d<b, W t>/dW in the weight's dtype, built in output-channel and batch slices.

    Slicing bounds the transients (the correlation's result and oneDNN's operand copies,
    b_1 being 64 MiB per 16 samples at paper size) to _WEIGHT_GRAD_SLICE_BYTES and
    _BATCH_SLICE_BYTES; the correlation sums over the batch, so batch slices add up.
    """
    sliceable = step.kind in (_CONV, _DENSE) and step.groups == 1
    n_slices = 1
    if sliceable:
        n_slices = min(
            weight.shape[0], -(-weight.numel() * weight.element_size() // _WEIGHT_GRAD_SLICE_BYTES)
        )
    if n_slices > 1 and step.kind == _CONV:
        return _conv_weight_gradient_by_gemm(step, weight, t, b)
    per_sample = b[:1].numel() * b.element_size()
    batch_step = max(1, _BATCH_SLICE_BYTES // max(per_sample, 1))
    if n_slices == 1 and batch_step >= b.shape[0]:  # one piece: no buffer to assemble it in
        return _weight_grad_rows(step, weight.shape, t, b, 0, weight.shape[0]).to(weight.dtype)
    grad = torch.zeros_like(weight)
    # Row ranges as torch.tensor_split makes them, in plain ints (traceable by torch.compile).
    n_rows = weight.shape[0]
    bounds = [i * (n_rows // n_slices) + min(i, n_rows % n_slices) for i in range(n_slices + 1)]
    rows = list(zip(bounds[:-1], bounds[1:]))
    for start in range(0, b.shape[0], batch_step):
        t_part, b_part = t[start : start + batch_step], b[start : start + batch_step]
        for lo, hi in rows:
            grad[lo:hi].add_(_weight_grad_rows(step, weight.shape, t_part, b_part, lo, hi))
    return grad


def _conv_weight_gradient_by_gemm(
    step: _Step, weight: torch.Tensor, t: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """A large Conv2d weight gradient accumulated by GEMMs straight into its buffer.

    dW[o, (c, i, j)] = sum over samples n and output positions l of b[n, o, l] * U[n, (c, i, j), l],
    U = unfold(t): each batch slice is one ``addmm_`` into the [O, C*kh*kw] view of dW. Unlike
    row slices of a convolution's weight gradient, nothing weight-sized is made besides dW
    itself: the wide layers are deep ones, whose unfolded inputs are small (paper-size D's
    2048-channel layer: 1 MiB per sample against a 128 MiB weight).
    """
    out_channels = weight.shape[0]
    grad = torch.empty_like(weight)  # the first slice's mm writes all of it
    grad_matrix = grad.view(out_channels, -1)
    positions = b.shape[2] * b.shape[3]
    # U and its transposed copy per sample; half of the batch-slice budget each.
    per_sample = grad_matrix.shape[1] * positions * weight.element_size() * 2
    batch_step = max(1, _BATCH_SLICE_BYTES // max(per_sample, 1))
    for start in range(0, b.shape[0], batch_step):
        t_part = t[start : start + batch_step].to(weight.dtype)
        b_part = b[start : start + batch_step].to(weight.dtype)
        columns = F.unfold(t_part, weight.shape[2:], step.dilation, step.padding, step.stride)
        columns = columns.transpose(1, 2).reshape(-1, columns.shape[1])  # [n * L, C * kh * kw]
        rows = b_part.transpose(0, 1).reshape(out_channels, -1)  # [O, n * L]
        if start == 0:
            torch.mm(rows, columns, out=grad_matrix)
        else:
            grad_matrix.addmm_(rows, columns)
    return grad


# --- the two passes ------------------------------------------------------------------------


class _Saved:
    """What the tangent pass needs from the forward; entries are dropped as they are used."""

    def __init__(self, u, output_grads, slope_bits):
        self.u = u
        self.output_grads = output_grads  # b_k, one per linear step, in order
        self.slope_bits = slope_bits  # packed bits, one per activation step, in order


def _lean_forward(
    plan: tuple,
    x_hat: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    target: float,
    weight: float,
):
    """(gp, _Saved): the critic forward, the backward from its output with ones, the penalty."""
    shapes, slope_bits = [], []
    with torch.no_grad():
        a, linear_index = x_hat, 0
        for step in plan:
            shapes.append(a.shape)
            if step.kind == _ACTIVATION:
                a, bits = leaky_relu_with_bits(a, step.negative_slope)
                slope_bits.append(bits)
            elif step.kind in _LINEAR_KINDS:
                w, bias = weights[linear_index], biases[linear_index]
                a = _in_batch_slices(
                    lambda x, step=step, w=w, bias=bias: _linear(step, x, w, bias), a
                )
                linear_index += 1
            else:
                a = a.flatten(step.start_dim, step.end_dim)
        # backward from the output with ones: b_k kept, g = grad_x D
        grad = torch.ones_like(a)
        del a
        output_grads = [None] * len(weights)
        bits_index = len(slope_bits)
        for index in range(len(plan) - 1, -1, -1):
            step = plan[index]
            if step.kind == _ACTIVATION:
                # In place: grad is always a fresh tensor here (ones or an adjoint's output),
                # never one of the stored b_k.
                bits_index -= 1
                grad = scale_by_slope_bits_(grad, slope_bits[bits_index], step.negative_slope)
            elif step.kind in _LINEAR_KINDS:
                linear_index -= 1
                output_grads[linear_index] = grad
                w, shape = weights[linear_index], shapes[index]
                grad = _in_batch_slices(
                    lambda g, step=step, w=w, shape=shape: _adjoint(
                        step, w, g, (g.shape[0], *shape[1:])
                    ),
                    grad,
                )
            else:  # Flatten: a reshape
                grad = grad.reshape(shapes[index])
        gp, u = penalty_terms(grad, target, weight)
    return gp, _Saved(u, output_grads, slope_bits)


_FREED = (
    "gradient_penalty(mode='lean'): backward through the penalty a second time; the lean "
    "penalty frees what its backward needs as it goes, even with retain_graph=True. "
    "Compute the penalty again, or use mode='autograd' to backward through it twice."
)


_NOT_TWICE = (
    "gradient_penalty(mode='lean') cannot be differentiated twice (create_graph=True): "
    "its backward is the hand-written tangent pass; use mode='autograd' for that."
)


class _TangentPass:
    """The tangent pass, one linear layer at a time.

    ``step(k, incoming, weight)`` takes the tangent arriving at linear layer k (for k = 0, the
    gradient of gp), applies the activation / flatten steps before layer k, and returns
    (the tangent leaving layer k's linear map, d gp / d W_k). Layer k's b_k and slope bits
    are dropped as they are used.
    """

    def __init__(self, plan: tuple, saved: _Saved):
        self.plan, self.saved = plan, saved
        self.linear_steps = [i for i, s in enumerate(plan) if s.kind in _LINEAR_KINDS]
        # slope-bit index of each activation step
        self.bits_index = {}
        for i, s in enumerate(plan):
            if s.kind == _ACTIVATION:
                self.bits_index[i] = len(self.bits_index)

    def step(
        self,
        k: int,
        incoming: torch.Tensor,
        weight: torch.Tensor,
        need_weight_grad: bool,
        need_next: bool,
    ):
        saved = self.saved
        if saved.output_grads[k] is None or (k == 0 and saved.u is None):
            raise RuntimeError(_FREED)
        with torch.no_grad():
            if k == 0:
                # The pass runs in the forward's precision (u is g's dtype: bf16 under autocast).
                tangent = saved.u * incoming.to(saved.u.dtype)
                saved.u = None
                first = 0
            else:
                tangent = incoming  # a fresh tensor made by step k - 1: scaled in place below
                first = self.linear_steps[k - 1] + 1
            index = self.linear_steps[k]
            for i in range(first, index):
                step = self.plan[i]
                if step.kind == _ACTIVATION:
                    j = self.bits_index[i]
                    tangent = scale_by_slope_bits_(
                        tangent, saved.slope_bits[j], step.negative_slope
                    )
                    saved.slope_bits[j] = None
                else:
                    tangent = tangent.flatten(step.start_dim, step.end_dim)
            step = self.plan[index]
            b = saved.output_grads[k]
            saved.output_grads[k] = None
            # Of the next tangent and this weight's gradient, the larger is made last. Wide
            # deep layers: the convolution's transients (oneDNN reorders a copy of W, 128 MiB
            # for paper-size D's 2048-channel layer) then never coexist with the finished dW.
            # Early layers, with small weights and large activations: dW first lets b_k go
            # before the next tangent (which has b_k's size) is made.
            need_next = need_next and k + 1 < len(self.linear_steps)
            next_first = weight.numel() * weight.element_size() > b.numel() * b.element_size()
            next_tangent = weight_grad = None
            if need_next and next_first:
                next_tangent = _in_batch_slices(lambda t: _linear(step, t, weight, None), tangent)
            if need_weight_grad:
                weight_grad = _weight_gradient(step, weight, tangent, b)
            del b
            if need_next and not next_first:
                next_tangent = _in_batch_slices(lambda t: _linear(step, t, weight, None), tangent)
        return next_tangent, weight_grad

    def run(
        self, grad_gp: torch.Tensor, weights: Sequence[torch.Tensor], needs_grad: Sequence[bool]
    ) -> list:
        """Every layer in turn: d gp / d W_k for each weight (None where not needed)."""
        grads, tangent = [], grad_gp
        last_needed = max((k for k, need in enumerate(needs_grad) if need), default=-1)
        for k, weight in enumerate(weights):
            if k > last_needed:
                grads.append(None)
                continue
            tangent, weight_grad = self.step(k, tangent, weight, needs_grad[k], k < last_needed)
            grads.append(weight_grad)
        return grads


class _LeanLayerNode(torch.autograd.Function):
    """Eager mode: one autograd node per penalised linear layer, chained from the output in.

    Node 0 returns gp; node k > 0 returns a zero-cost token (an expanded scalar) shaped like
    the tangent that node k - 1 hands back as the token's gradient. Autograd therefore runs
    node 0 first, then node 1, ..., and accumulates each d gp / d W_k into ``W_k.grad`` (an
    AccumulateGrad runs as soon as it is ready) before the next layer's gradient is computed:
    the pass holds one layer's weight gradient at a time, as a hand-written accumulation
    would, while autograd sees every gradient.
    """

    @staticmethod
    def forward(ctx, token, tangent_pass, k, weight, connected_bias):
        ctx.tangent_pass, ctx.k = tangent_pass, k
        ctx.save_for_backward(weight)  # version-checked: an optimizer step in between is an error
        ctx.bias_shape = None if connected_bias is None else connected_bias.shape
        if k == 0:
            return tangent_pass.gp
        # The tangent leaving linear layer k - 1 has that layer's output shape, b_{k-1}'s.
        shape = tangent_pass.saved.output_grads[k - 1].shape
        return torch.zeros((), dtype=tangent_pass.dtype, device=weight.device).expand(shape)

    @staticmethod
    def backward(ctx, incoming):
        if torch.is_grad_enabled():  # create_graph=True: a gradient of the gradient is wanted
            raise RuntimeError(_NOT_TWICE)
        (weight,) = ctx.saved_tensors
        next_tangent, weight_grad = ctx.tangent_pass.step(
            ctx.k, incoming, weight, ctx.needs_input_grad[3], ctx.needs_input_grad[0]
        )
        bias_grad = None
        if ctx.needs_input_grad[4]:
            bias_grad = torch.zeros(ctx.bias_shape, dtype=weight.dtype, device=weight.device)
        return next_tangent, None, None, weight_grad, bias_grad


def _connected_biases(plan: tuple, biases: Sequence[torch.Tensor | None]) -> list:
    """The biases autograd's double backward connects to gp: those followed by an activation.

    An activation's derivative is read from its input, which the biases before it shift, so
    autograd's graph of g reaches those biases (with a gradient of exactly zero, the slopes
    being piecewise constant); biases after the last activation are not in that graph at all.
    The lean penalty gives the same: zeros for the first kind, None for the second.
    """
    last_activation = max((i for i, s in enumerate(plan) if s.kind == _ACTIVATION), default=-1)
    linear_steps = [i for i, s in enumerate(plan) if s.kind in _LINEAR_KINDS]
    return [bias if index < last_activation else None for index, bias in zip(linear_steps, biases)]


def _lean_penalty_eager(plan, x_hat, weights, biases, target, weight):
    gp, saved = _lean_forward(plan, x_hat, weights, biases, target, weight)
    if not torch.is_grad_enabled() or not any(w.requires_grad for w in weights):
        return gp
    tangent_pass = _TangentPass(plan, saved)
    tangent_pass.gp = gp
    tangent_pass.dtype = saved.u.dtype  # the tangent's (see _TangentPass.step)
    connected = _connected_biases(plan, biases)
    token = None
    for k in range(len(weights) - 1, -1, -1):
        token = _LeanLayerNode.apply(token, tangent_pass, k, weights[k], connected[k])
    tangent_pass.gp = None  # node 0 returned it; the pass must not keep it alive
    return token


# --- torch.compile: the same passes as one torch.library op --------------------------------


@torch.library.custom_op("vcfast::lean_gradient_penalty", mutates_args=())
def _lean_gradient_penalty_op(
    x_hat: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    bias_layers: list[int],
    plan_codes: list[int],
    negative_slopes: list[float],
    target: float,
    weight: float,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(gp, u, b_k per linear step, slope bits per activation step); see the module doc.

    ``weights``: one per linear step; ``biases[i]`` belongs to linear step ``bias_layers[i]``
    (layers without a bias are left out).
    """
    return _lean_op_outputs(
        x_hat, weights, biases, bias_layers, plan_codes, negative_slopes, target, weight
    )


def _lean_op_outputs(
    x_hat, weights, biases, bias_layers, plan_codes, negative_slopes, target, weight
):
    plan = _decode(plan_codes, negative_slopes)
    gp, saved = _lean_forward(
        plan, x_hat, weights, _per_layer(biases, bias_layers, len(weights)), target, weight
    )
    return gp, saved.u, list(saved.output_grads), list(saved.slope_bits)


def _per_layer(biases, bias_layers, n_layers) -> list:
    if len(biases) != len(bias_layers) or any(not 0 <= k < n_layers for k in bias_layers):
        raise ValueError(
            f"lean_gradient_penalty: bias_layers {list(bias_layers)} must give a linear "
            f"step (0..{n_layers - 1}) for each of the {len(biases)} biases"
        )
    per_layer = [None] * n_layers
    for bias, k in zip(biases, bias_layers):
        per_layer[k] = bias
    return per_layer


@_lean_gradient_penalty_op.register_fake
def _lean_gradient_penalty_fake(
    x_hat, weights, biases, bias_layers, plan_codes, negative_slopes, target, weight
):
    # Every op the passes call has a fake, so the passes themselves size the outputs.
    return _lean_op_outputs(
        x_hat, weights, biases, bias_layers, plan_codes, negative_slopes, target, weight
    )


def _op_setup_context(ctx, inputs, output):
    x_hat, weights, biases, bias_layers, plan_codes, negative_slopes, target, weight = inputs
    _, u, output_grads, slope_bits = output
    ctx.plan = _decode(plan_codes, negative_slopes)
    ctx.counts = (len(weights), len(output_grads))
    ctx.needs_grad = [w.requires_grad for w in weights]
    connected = _connected_biases(ctx.plan, _per_layer(biases, bias_layers, len(weights)))
    ctx.zero_bias_grads = [
        (b.shape, b.dtype, b.device) if b.requires_grad and connected[k] is not None else None
        for b, k in zip(biases, bias_layers)
    ]
    ctx.save_for_backward(*weights, u, *output_grads, *slope_bits)


def _op_backward(ctx, grad_gp, grad_u, grad_output_grads, grad_slope_bits):
    n_weights, n_linear = ctx.counts
    tensors = list(ctx.saved_tensors)
    weights, u = tensors[:n_weights], tensors[n_weights]
    saved = _Saved(
        u, tensors[n_weights + 1 : n_weights + 1 + n_linear], tensors[n_weights + 1 + n_linear :]
    )
    del tensors
    grads = _TangentPass(ctx.plan, saved).run(grad_gp, weights, ctx.needs_grad)
    bias_grads = [
        None if meta is None else torch.zeros(meta[0], dtype=meta[1], device=meta[2])
        for meta in ctx.zero_bias_grads
    ]
    return None, grads, bias_grads, None, None, None, None, None


_lean_gradient_penalty_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _lean_penalty(
    plan: tuple, layers: Sequence[nn.Module], x_hat: torch.Tensor, target: float, weight: float
):
    linear_layers = [layer for layer in layers if isinstance(layer, _LINEAR)]
    weights = [layer.weight for layer in linear_layers]
    # Biases shape the forward's slopes but not g: their gradient is zero or None, as
    # autograd's (see _connected_biases).
    biases = [layer.bias for layer in linear_layers]
    if torch.compiler.is_compiling():
        codes, slopes = _encode(plan)
        bias_layers = [k for k, bias in enumerate(biases) if bias is not None]
        gp, *_ = torch.ops.vcfast.lean_gradient_penalty(
            x_hat,
            weights,
            [biases[k] for k in bias_layers],
            bias_layers,
            codes,
            slopes,
            float(target),
            float(weight),
        )
        return gp
    return _lean_penalty_eager(plan, x_hat, weights, biases, float(target), float(weight))


def interpolate(
    x_real: torch.Tensor,
    x_fake: torch.Tensor,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_hat = eps * x_real + (1 - eps) * x_fake with eps ~ U(0, 1) per sample (detached)."""
    if x_real.shape != x_fake.shape:
        raise ValueError(
            f"gradient_penalty: x_real {tuple(x_real.shape)} and x_fake "
            f"{tuple(x_fake.shape)} must have the same shape"
        )
    n = x_real.shape[0]
    if eps is None:
        eps = torch.rand(
            n,
            generator=generator,
            device="cpu" if generator is not None else x_real.device,
            dtype=x_real.dtype,
        ).to(x_real.device)
    eps = torch.as_tensor(eps, dtype=x_real.dtype, device=x_real.device)
    if eps.numel() == 1:
        eps = eps.reshape(1).expand(n)
    if eps.numel() != n:
        raise ValueError(
            f"gradient_penalty: eps must have one value per sample ({n}), got {eps.numel()}"
        )
    eps = eps.reshape(n, *([1] * (x_real.dim() - 1)))
    return eps * x_real.detach() + (1 - eps) * x_fake.detach()


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


def _through_ddp(ddp, compute):
    """compute(), bracketed like a forward of the DDP wrapper so that its reducer all-reduces
    the penalty's gradients in the coming backward, also when the penalty is the only loss.

    With find_unused_parameters=True DDP would mark every parameter the penalty does not use
    (the classifier head) as unused for the whole backward, wrongly when the D loss also uses
    them; there the penalty relies on the D loss's own forward through the wrapper (every
    WGAN-GP D loss has one) and the bracket is left out.
    """
    if ddp is None or ddp.find_unused_parameters or torch.compiler.is_compiling():
        return compute()
    ddp._pre_forward()
    return ddp._post_forward(compute())


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
    eps ~ U(0, 1) per sample unless given. Its gradients with respect to the critic's weights
    reach autograd like any other loss term's: ``(d_loss + gp).backward()``,
    ``torch.autograd.grad(gp, weights)``, ``backward(inputs=...)``, gradient accumulation,
    ``GradScaler`` and ``torch.compile(fullgraph=True)`` give what ``mode="autograd"`` gives
    (biases get none from the penalty). No gradient flows to x_real or x_fake (x_hat is
    detached, as in StarGAN). The lean penalty can be back-propagated once, and not twice
    (``create_graph=True`` is not supported): use ``mode="autograd"`` for that. In a D loss,
    compute it before the critic's other forwards: its backward then runs last and the D
    step's peak memory stays lower (module doc, "Order in a combined loss").

    Args:
        critic: an ``nn.Sequential`` of Conv2d / ConvTranspose2d / Linear / LeakyReLU / ReLU /
            Flatten / Identity, or a module with ``gradient_penalty_layers()`` (StarGAN's D:
            trunk + src head), optionally wrapped in DistributedDataParallel, DataParallel or
            ``torch.compile``. ``D(x_hat)`` here is the composition of those layers. Under
            DistributedDataParallel the penalty's gradients are all-reduced with the rest of
            the backward (with ``find_unused_parameters=True`` only when the same backward
            also goes through a forward of the wrapper, as a D loss does).
        mode: ``"lean"`` (no double backward, see module doc), ``"autograd"`` (official
            StarGAN double backward; the reference) or ``"auto"`` (lean when every layer is
            supported, otherwise autograd with one warning).
    """
    if mode not in _MODES:
        raise ValueError(f"gradient_penalty: mode must be one of {_MODES}, got {mode!r}")
    if not isinstance(critic, nn.Module):
        raise TypeError(
            f"gradient_penalty: critic must be an nn.Module, got {type(critic).__name__}"
        )
    module, ddp = _unwrap_critic(critic)
    x_hat = interpolate(x_real, x_fake, eps, generator)
    if mode == "autograd":
        return _through_ddp(
            ddp, lambda: _autograd_penalty(_penalised_function(module), x_hat, target, weight)
        )
    try:
        layers = gradient_penalty_layers(module)
        plan = _plan(layers)
    except UnsupportedCriticError as exc:
        if mode == "lean":
            raise
        global _warned_auto
        if not _warned_auto:
            warnings.warn(
                f"{exc}; gradient_penalty(mode='auto') falls back to autograd", stacklevel=2
            )
            _warned_auto = True
        return _through_ddp(
            ddp, lambda: _autograd_penalty(_penalised_function(module), x_hat, target, weight)
        )
    return _through_ddp(ddp, lambda: _lean_penalty(plan, layers, x_hat, target, weight))
