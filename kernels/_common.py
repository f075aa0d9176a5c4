"""Triton helpers shared by several kernel modules."""

import triton
import triton.language as tl


@triton.jit
def to_output(v, out_ptr, EMULATE_BF16_RNE: tl.constexpr):
    """v (float32 / float64) cast to out_ptr's element type, rounding to nearest even.

    Triton 3.8's interpreter truncates float32 -> bfloat16 (compiled kernels round to nearest
    even), so the host sets EMULATE_BF16_RNE when kernels are interpreted and the output is
    bfloat16, and the rounding is done here with integer arithmetic on the float32 bits.
    """
    if EMULATE_BF16_RNE:
        # bf16 = upper 16 bits of fp32, rounded: add 0x7FFF plus the lowest kept bit (ties to
        # even), then drop the low half. NaN is handled apart (the add could carry into the
        # sign bit of a NaN with a full mantissa).
        b = v.to(tl.uint32, bitcast=True)
        rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)
        r = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = v.to(out_ptr.dtype.element_ty)
    return r
