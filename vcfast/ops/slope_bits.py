"""Slope-bit ops of the lean gradient penalty (see vcfast/ops/gradient_penalty.py).

A LeakyReLU's derivative is 1 where its input was > 0 and ``negative_slope`` elsewhere
(PyTorch's convention at exactly 0 is the negative slope), so one bit per element is all a
backward or tangent pass needs from the forward: 32x less than keeping the float input.

Bit layout: element ``e`` of the flattened (contiguous) tensor is bit ``e % 8`` of byte
``e // 8``; a tensor of ``n`` elements packs into ``ceil(n / 8)`` uint8 bytes.

Ops (plain-PyTorch references here, fused kernels in vcfast._C and vcfast.kernels):
* ``leaky_relu_with_bits(z, negative_slope) -> (a, bits)``
* ``scale_by_slope_bits(x, bits, negative_slope) -> x * slope`` (and ``scale_by_slope_bits_``,
  in place, with a bounded transient: what the gradient-penalty passes use)
* ``penalty_terms(g, target, weight) -> (gp, u)``: per-sample norms, the penalty and its
  gradient with respect to g in one pass.
"""

from __future__ import annotations

import torch

from vcfast import _extension

__all__ = [
    "leaky_relu_with_bits",
    "scale_by_slope_bits",
    "scale_by_slope_bits_",
    "penalty_terms",
    "pack_bits_reference",
    "unpack_bits_reference",
    "leaky_relu_with_bits_reference",
    "scale_by_slope_bits_reference",
    "penalty_terms_reference",
]

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits_reference(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 [ceil(numel / 8)] in the layout above."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = _BIT_WEIGHTS.to(flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits_reference(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bits -> bool [numel]."""
    weights = _BIT_WEIGHTS.to(bits.device)
    return ((bits[:, None] & weights) != 0).reshape(-1)[:numel]


def leaky_relu_with_bits_reference(z: torch.Tensor, negative_slope: float):
    positive = z > 0
    return torch.where(positive, z, z * negative_slope), pack_bits_reference(positive)


def scale_by_slope_bits_reference(x: torch.Tensor, bits: torch.Tensor, negative_slope: float):
    positive = unpack_bits_reference(bits, x.numel()).view(x.shape)
    return torch.where(positive, x, x * negative_slope)


def penalty_terms_reference(g: torch.Tensor, target: float, weight: float):
    """gp = weight * mean_i (||g_i|| - target)^2 and u = d gp / d g.

    u_i = weight * 2 (n_i - target) / n_i * g_i / N; where n_i = 0 the direction is undefined
    and u_i = 0 (autograd's sqrt would give NaN there).
    """
    # Low-precision g (autocast) is reduced in float32; u comes back in g's dtype.
    flat = g.reshape(g.shape[0], -1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    norms = flat.norm(dim=1)
    gp = weight * ((norms - target) ** 2).mean()
    coeff = torch.where(norms > 0, weight * 2 * (norms - target) / norms.clamp_min(1e-30), 0.0)
    u = (flat * (coeff / g.shape[0])[:, None]).view(g.shape).to(g.dtype)
    return gp, u


if _extension.has_op("leaky_relu_with_bits"):

    @torch.library.register_fake("vcfast::leaky_relu_with_bits")
    def _leaky_relu_with_bits_fake(z, negative_slope):
        return torch.empty_like(z), z.new_empty(((z.numel() + 7) // 8,), dtype=torch.uint8)

    @torch.library.register_fake("vcfast::scale_by_slope_bits")
    def _scale_by_slope_bits_fake(x, bits, negative_slope):
        return torch.empty_like(x)

    @torch.library.register_fake("vcfast::penalty_terms")
    def _penalty_terms_fake(g, target, weight):
        loss_dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
        return g.new_empty((), dtype=loss_dtype), torch.empty_like(g)


def _use_kernel(t: torch.Tensor) -> bool:
    return (_extension.EXTENSION_LOADED and t.device.type == "cpu"
            and _extension.has_op("leaky_relu_with_bits"))


def _use_triton(t: torch.Tensor) -> bool:
    if t.device.type != "cuda" or not _extension.triton_available():
        return False
    from vcfast.ops import gradient_penalty_triton  # lazy: Triton kernels decorate at first import

    return gradient_penalty_triton.TRITON_IMPORT_ERROR is None


def leaky_relu_with_bits(z: torch.Tensor, negative_slope: float):
    """LeakyReLU of ``z`` and its packed slope bits (z > 0), in one pass."""
    if _use_kernel(z):
        return torch.ops.vcfast.leaky_relu_with_bits(z.contiguous(), float(negative_slope))
    if _use_triton(z):
        from vcfast.ops.gradient_penalty_triton import leaky_relu_with_bits_triton

        return leaky_relu_with_bits_triton(z, float(negative_slope))
    return leaky_relu_with_bits_reference(z.contiguous(), negative_slope)


def scale_by_slope_bits(x: torch.Tensor, bits: torch.Tensor, negative_slope: float):
    """``x`` times the LeakyReLU derivative recorded in ``bits``."""
    if x.numel() > bits.numel() * 8:
        raise ValueError(f"scale_by_slope_bits: `bits` holds {bits.numel() * 8} flags, "
                         f"fewer than x's {x.numel()} elements")
    if _use_kernel(x):
        return torch.ops.vcfast.scale_by_slope_bits(x.contiguous(), bits, float(negative_slope))
    if _use_triton(x):
        from vcfast.ops.gradient_penalty_triton import scale_by_slope_bits_triton

        return scale_by_slope_bits_triton(x, bits, float(negative_slope))
    return scale_by_slope_bits_reference(x.contiguous(), bits, negative_slope)


# In-place scaling works through slices of this many elements (a multiple of 8, so slices
# start on whole bytes of `bits`): the transient is 16 MiB of float32 instead of a copy of x.
_INPLACE_SLICE = 1 << 22


def scale_by_slope_bits_(x: torch.Tensor, bits: torch.Tensor,
                         negative_slope: float) -> torch.Tensor:
    """In-place :func:`scale_by_slope_bits`; returns ``x``.

    The passes of the lean gradient penalty never reuse the unscaled signal, so scaling it in
    place saves one activation-sized tensor at their peak. Works with every backend of the
    out-of-place op by scaling slices and copying them back.
    """
    if x.numel() > bits.numel() * 8:
        raise ValueError(f"scale_by_slope_bits_: `bits` holds {bits.numel() * 8} flags, "
                         f"fewer than x's {x.numel()} elements")
    if not x.is_contiguous():
        return x.copy_(scale_by_slope_bits(x, bits, negative_slope))
    flat = x.view(-1)
    for start in range(0, flat.numel(), _INPLACE_SLICE):
        part = flat[start:start + _INPLACE_SLICE]
        part_bits = bits[start // 8:(start + part.numel() + 7) // 8]
        part.copy_(scale_by_slope_bits(part, part_bits, negative_slope))
    return x


def penalty_terms(g: torch.Tensor, target: float, weight: float):
    """(gp, u) of the gradient penalty from the input gradient ``g`` [N, ...]."""
    if _use_kernel(g):
        return torch.ops.vcfast.penalty_terms(g.contiguous(), float(target), float(weight))
    if _use_triton(g):
        from vcfast.ops.gradient_penalty_triton import penalty_terms_triton

        return penalty_terms_triton(g, float(target), float(weight))
    return penalty_terms_reference(g, target, weight)
