"""Triton backend of the slope-bit ops of the lean gradient penalty (GPU tensors).

Same contracts as the C++ CPU ops and the plain-PyTorch references in
``vcfast.ops.slope_bits`` (bit layout: element ``e`` of the flattened contiguous tensor is bit
``e % 8`` of byte ``e // 8``, ``ceil(n / 8)`` uint8 bytes). Kernels and their math:
``vcfast/kernels/gradient_penalty.py`` (repository path ``kernels/gradient_penalty.py``).

Public functions (inputs of any strides are made contiguous; float16, bfloat16, float32,
float64; half types are computed in float32 and rounded once):

* ``leaky_relu_with_bits_triton(z, negative_slope) -> (out, bits)``: out = leaky_relu(z)
  in z's dtype and shape, bits = packed (z > 0), uint8 [ceil(numel / 8)].
* ``scale_by_slope_bits_triton(x, bits, negative_slope) -> out``: x * (bit ? 1 : slope).
* ``penalty_terms_triton(g, target, weight) -> (gp, u)``: with n_i = ||g_i|| over each
  sample of g [N, ...], gp = weight * mean_i (n_i - target)^2 (float32 for half g, else g's
  dtype) and u = d gp / d g = weight * 2 (n_i - target) / n_i * g_i / N in g's dtype, u_i = 0
  where n_i = 0. The sums of squares are accumulated in float32 (float64 for float64 g),
  deterministically (per-chunk partial sums, reduced in a fixed order; no atomics); the C++
  CPU op accumulates in float64 for every dtype, so float32 results differ from it by
  float32 rounding (relative ~1e-6).

Registered ops (not differentiable; no autograd formula):

* ``vcfast::leaky_relu_with_bits_triton(Tensor z, float negative_slope) -> (Tensor, Tensor)``
* ``vcfast::scale_by_slope_bits_triton(Tensor x, Tensor bits, float negative_slope) -> Tensor``
* ``vcfast::penalty_terms_triton(Tensor g, float target, float weight) -> (Tensor, Tensor)``

Registration: on real GPUs the ops are ``torch.library.triton_op`` (torch.compile can see
the kernels). Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.jit`` yields interpreter
objects that ``wrap_triton`` cannot trace (it hands them back unwrapped, and launching one on
a fake or functional tensor fails), so the triton_op's traced fake/functional
implementations would break opcheck and torch.compile; in that mode the same Python
implementations are registered with ``torch.library.custom_op`` plus ``register_fake``
(same as ``vcfast.ops.spectrogram_triton``): eager behaviour is identical.

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
    "leaky_relu_with_bits_triton",
    "scale_by_slope_bits_triton",
    "penalty_terms_triton",
    "TRITON_IMPORT_ERROR",
    "USES_TRITON_OP",
]

_kernels, TRITON_IMPORT_ERROR = load_kernels("gradient_penalty")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)

# Elementwise kernels: bytes per program (x 8 elements): 2048 elements per program.
_BLOCK_BYTES = 256
# Penalty kernels: elements per vector step; a sum-of-squares program covers up to
# _MAX_SUMSQ_STEPS steps of one sample (more chunks, hence more programs, for big samples).
_BLOCK_PENALTY = 1024
_MAX_SUMSQ_STEPS = 16
_NUM_WARPS = 4


def _kernels_interpreted() -> bool:
    return _kernels is not None and is_interpreted(_kernels._leaky_relu_with_bits_kernel)


# True: registered with torch.library.triton_op (real GPU kernels); False: custom_op fallback
# (interpreter, see the module docstring) or triton missing.
USES_TRITON_OP = _kernels is not None and not _kernels_interpreted()


# ---------------------------------------------------------------------------------------------
# Host-side helpers


def _check_float(name: str, t: Tensor, arg: str) -> None:
    torch._check_type(t.dtype in _DTYPES,
                      lambda: f"vcfast::{name}: {arg} must be float16, bfloat16, float32 or "
                              f"float64, got {t.dtype}")


def _slope_args(negative_slope: float, like: Tensor) -> tuple[float, Tensor]:
    """(slope as a Python float, slope tensor read by the float64 kernels).

    Triton passes Python floats as float32, which is what PyTorch itself uses for float32 and
    half tensors; float64 needs the exact double, so it travels in a 1-element tensor built by
    a fill kernel (torch.full: no host-to-device copy, hence no sync). Other dtypes pass
    ``like`` as a placeholder pointer that the kernel never reads.
    """
    if like.dtype == torch.float64:
        return negative_slope, torch.full((1,), negative_slope, dtype=torch.float64,
                                          device=like.device)
    return negative_slope, like


def _emulate_bf16_rne(out: Tensor) -> bool:
    # The Triton 3.8 interpreter truncates float32 -> bfloat16; compiled kernels round to
    # nearest even. See the kernels module.
    return out.dtype == torch.bfloat16 and _kernels_interpreted()


def _launch_elementwise(name: str, kernel, args_before_slope, negative_slope: float,
                        like: Tensor, n: int) -> None:
    n_bytes = (n + 7) // 8
    slope, slope_t = _slope_args(negative_slope, like)
    grid = (triton.cdiv(n_bytes, _BLOCK_BYTES),)
    check_grid(name, grid)
    with launch_device(like):
        torch.library.wrap_triton(kernel)[grid](
            *args_before_slope, slope, slope_t, n, n_bytes,
            IS_FP64=like.dtype == torch.float64, EMULATE_BF16_RNE=_emulate_bf16_rne(like),
            BLOCK=_BLOCK_BYTES, num_warps=_NUM_WARPS,
        )


# ---------------------------------------------------------------------------------------------
# Op implementations (traceable: triton_op registers them as their own fake kernels too)


def _leaky_relu_with_bits_impl(z: Tensor, negative_slope: float) -> tuple[Tensor, Tensor]:
    _check_float("leaky_relu_with_bits_triton", z, "z")
    z = z.contiguous()
    n = z.numel()
    out = torch.empty_like(z)
    bits = torch.empty(((n + 7) // 8,), dtype=torch.uint8, device=z.device)
    if n > 0:
        _launch_elementwise(_LRB_NAME, _kernels._leaky_relu_with_bits_kernel, (z, out, bits),
                            negative_slope, z, n)
    return out, bits


def _check_scale_inputs(x: Tensor, bits: Tensor) -> None:
    _check_float("scale_by_slope_bits_triton", x, "x")
    torch._check_type(bits.dtype == torch.uint8,
                      lambda: f"vcfast::scale_by_slope_bits_triton: bits must be uint8, got "
                              f"{bits.dtype}")
    torch._check(bits.device == x.device,
                 lambda: f"vcfast::scale_by_slope_bits_triton: bits ({bits.device}) must be on "
                         f"x's device ({x.device})")
    torch._check_value(bits.numel() * 8 >= x.numel(),
                       lambda: f"vcfast::scale_by_slope_bits_triton: bits holds "
                               f"{bits.numel() * 8} flags, fewer than x's {x.numel()} elements")


def _scale_by_slope_bits_impl(x: Tensor, bits: Tensor, negative_slope: float) -> Tensor:
    _check_scale_inputs(x, bits)
    x = x.contiguous()
    n = x.numel()
    out = torch.empty_like(x)
    if n > 0:
        _launch_elementwise(_SCALE_NAME, _kernels._scale_by_slope_bits_kernel,
                            (x, bits.contiguous(), out), negative_slope, x, n)
    return out


def _check_penalty_inputs(g: Tensor) -> None:
    _check_float("penalty_terms_triton", g, "g")
    torch._check_value(g.dim() >= 1 and g.shape[0] >= 1,
                       lambda: f"vcfast::penalty_terms_triton: g must be [N, ...] with N >= 1, "
                               f"got {tuple(g.shape)}")


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _penalty_terms_impl(g: Tensor, target: float, weight: float) -> tuple[Tensor, Tensor]:
    _check_penalty_inputs(g)
    g = g.contiguous()
    batch = g.shape[0]
    per_sample = g.numel() // batch
    acc_dtype = _loss_dtype(g.dtype)
    is_fp64 = g.dtype == torch.float64
    u = torch.empty_like(g)
    if per_sample > 0:
        # sym_min: no guard on the sample size when traced with dynamic shapes.
        steps = torch.sym_min(_MAX_SUMSQ_STEPS, triton.cdiv(per_sample, _BLOCK_PENALTY))
        chunk = steps * _BLOCK_PENALTY
        n_chunks = triton.cdiv(per_sample, chunk)
        partial = torch.empty((batch, n_chunks), dtype=acc_dtype, device=g.device)
        check_grid(_PENALTY_NAME, (batch * n_chunks,))
        with launch_device(g):
            torch.library.wrap_triton(_kernels._penalty_sumsq_kernel)[(batch * n_chunks,)](
                g, partial, per_sample, chunk, n_chunks,
                IS_FP64=is_fp64, BLOCK=_BLOCK_PENALTY, num_warps=_NUM_WARPS,
            )
        norms = partial.sum(dim=1).sqrt()
    else:
        norms = torch.zeros((batch,), dtype=acc_dtype, device=g.device)
    # Same expressions (and order) as penalty_terms_reference.
    gp = weight * ((norms - target) ** 2).mean()
    coeff = torch.where(norms > 0, weight * 2 * (norms - target) / norms.clamp_min(1e-30), 0.0)
    coeff = (coeff / batch).contiguous()
    if per_sample > 0:
        n_blocks = triton.cdiv(per_sample, _BLOCK_PENALTY)
        check_grid(_PENALTY_NAME, (batch * n_blocks,))
        with launch_device(g):
            torch.library.wrap_triton(_kernels._penalty_scale_kernel)[(batch * n_blocks,)](
                g, coeff, u, per_sample, n_blocks,
                IS_FP64=is_fp64, EMULATE_BF16_RNE=_emulate_bf16_rne(g), BLOCK=_BLOCK_PENALTY,
                num_warps=_NUM_WARPS,
            )
    return gp, u


def aot_launch_configs() -> list[dict]:
    """The compiled-kernel configurations the launchers above pick (read by vcfast.aot).

    Kept next to the launch code so the two change together; tests/test_aot_kernels.py checks
    that recorded launches use only configurations listed here. Entries as in
    ``vcfast.ops.spectrogram_triton.aot_launch_configs`` (``float`` marks a float scalar
    argument). Every dtype; EMULATE_BF16_RNE is True only under the interpreter.
    """
    if _kernels is None:
        return []
    configs = []
    for dtype in _DTYPES:
        is_fp64 = dtype == torch.float64
        acc = _loss_dtype(dtype)
        common = {"num_warps": _NUM_WARPS, "largest": True}
        elementwise = {"IS_FP64": is_fp64, "EMULATE_BF16_RNE": False, "BLOCK": _BLOCK_BYTES}
        configs.append({"kernel": "_leaky_relu_with_bits_kernel", **common,
                        "constexprs": elementwise,
                        "args": {"z_ptr": dtype, "out_ptr": dtype, "bits_ptr": torch.uint8,
                                 "slope": float, "slope_ptr": dtype}})
        configs.append({"kernel": "_scale_by_slope_bits_kernel", **common,
                        "constexprs": elementwise,
                        "args": {"x_ptr": dtype, "bits_ptr": torch.uint8, "out_ptr": dtype,
                                 "slope": float, "slope_ptr": dtype}})
        configs.append({"kernel": "_penalty_sumsq_kernel", **common,
                        "constexprs": {"IS_FP64": is_fp64, "BLOCK": _BLOCK_PENALTY},
                        "args": {"g_ptr": dtype, "partial_ptr": acc}})
        configs.append({"kernel": "_penalty_scale_kernel", **common,
                        "constexprs": {"IS_FP64": is_fp64, "EMULATE_BF16_RNE": False,
                                       "BLOCK": _BLOCK_PENALTY},
                        "args": {"g_ptr": dtype, "coeff_ptr": acc, "u_ptr": dtype}})
    return configs


# ---------------------------------------------------------------------------------------------
# Registration

_LRB_NAME = "vcfast::leaky_relu_with_bits_triton"
_SCALE_NAME = "vcfast::scale_by_slope_bits_triton"
_PENALTY_NAME = "vcfast::penalty_terms_triton"

if _kernels is not None:
    _lrb_op = define_op(_LRB_NAME, _leaky_relu_with_bits_impl, use_triton_op=USES_TRITON_OP)
    _scale_op = define_op(_SCALE_NAME, _scale_by_slope_bits_impl, use_triton_op=USES_TRITON_OP)
    _penalty_op = define_op(_PENALTY_NAME, _penalty_terms_impl, use_triton_op=USES_TRITON_OP)
    if not USES_TRITON_OP:  # interpreter: custom ops need explicit fakes

        @_lrb_op.register_fake
        def _leaky_relu_with_bits_fake(z, negative_slope):
            _check_float("leaky_relu_with_bits_triton", z, "z")
            n = z.numel()
            return (torch.empty_like(z, memory_format=torch.contiguous_format),
                    z.new_empty(((n + 7) // 8,), dtype=torch.uint8))

        @_scale_op.register_fake
        def _scale_by_slope_bits_fake(x, bits, negative_slope):
            _check_scale_inputs(x, bits)
            return torch.empty_like(x, memory_format=torch.contiguous_format)

        @_penalty_op.register_fake
        def _penalty_terms_fake(g, target, weight):
            _check_penalty_inputs(g)
            return (g.new_empty((), dtype=_loss_dtype(g.dtype)),
                    torch.empty_like(g, memory_format=torch.contiguous_format))


def _require_triton(name: str, t: Tensor) -> None:
    require_runnable(name, t, kernels=_kernels, import_error=TRITON_IMPORT_ERROR,
                     interpreted=_kernels_interpreted(), module="gradient_penalty",
                     fallback=f"vcfast.ops.slope_bits.{name.removesuffix('_triton')} "
                              "(C++ CPU op or reference)")


def leaky_relu_with_bits_triton(z: Tensor, negative_slope: float) -> tuple[Tensor, Tensor]:
    """LeakyReLU of ``z`` and its packed slope bits (z > 0) in one pass: (out, bits uint8)."""
    _require_triton("leaky_relu_with_bits_triton", z)
    return _lrb_op(z, float(negative_slope))


def scale_by_slope_bits_triton(x: Tensor, bits: Tensor, negative_slope: float) -> Tensor:
    """``x`` times the LeakyReLU derivative recorded in ``bits`` (1 where set, else slope)."""
    _require_triton("scale_by_slope_bits_triton", x)
    return _scale_op(x, bits, float(negative_slope))


def penalty_terms_triton(g: Tensor, target: float, weight: float) -> tuple[Tensor, Tensor]:
    """(gp, u) of the gradient penalty from the input gradient ``g`` [N, ...] in one pass."""
    _require_triton("penalty_terms_triton", g)
    return _penalty_op(g, float(target), float(weight))
