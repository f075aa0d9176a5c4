"""``LabelConcatConv2d``: ``nn.Conv2d`` over ``cat(x, tile(c))`` without ever tiling ``c``.

The module holds exactly the parameters of ``nn.Conv2d(in_channels + label_channels,
out_channels, kernel_size, stride, padding, bias=bias)`` (``weight`` [O, C_x + C_c, kh, kw] and
``bias`` [O]), so state dicts are interchangeable. Forward::

    conv_x = conv2d(x, weight[:, :C_x], stride, padding)        # the image part
    P      = c @ weight[:, C_x:]      -> [B, O, kh, kw]          # per-tap label offsets
    T      = A_row P A_col^T (+ bias) -> [B, O, R, S]            # one entry per border pattern
    out    = label_table_add(conv_x, T, row_ids, col_ids)        # out[b,o,i,j] += T[b,o,r(i),s(j)]

(see vcfast.ops.label_conv). Exact math (only the summation order differs from the tiled conv);
gradients for x, c, both weight slices and the bias flow through ordinary autograd except the
table add, a registered op whose backward is a segmented sum. No B x C_c x H x W tensor exists
in forward or backward. Dilation 1, groups 1 and zero padding only.

Autocast: under ``torch.autocast(device_type="cpu" | "cuda", dtype=torch.bfloat16 / float16)``
the image convolution runs in the autocast dtype (``F.conv2d`` is on autocast's list, as for
``nn.Conv2d``) and the output has that dtype. The label table is tiny, so it is computed with
autocast disabled in the weight's dtype (float32) and rounded once to the output dtype when
added -- closer to the float32 result than autocast's bf16 convolution over the tiled labels,
whose label part it replaces. Gradients reach weight, bias and ``c`` in their own dtypes.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vcfast.ops.label_conv import label_table_add, tap_patterns

__all__ = ["LabelConcatConv2d"]


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, str):
        if v == "valid" and name == "padding":
            return (0, 0)
        raise ValueError(f"LabelConcatConv2d: {name}={v!r} is not supported; give an int or a pair")
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(e) for e in v)
    if len(t) != 2:
        raise ValueError(f"LabelConcatConv2d: {name} must be an int or a pair, got {v!r}")
    return t


def _autocast_disabled(device_type: str):
    """Autocast off for this block (a no-op where autocast is off or unsupported)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class LabelConcatConv2d(nn.Module):
    """``nn.Conv2d`` on ``cat(x, c tiled over H x W)``, computed without the tile.

    Args:
        in_channels: channels of ``x`` (C_x).
        label_channels: length of the label vector ``c`` (C_c).
        out_channels, kernel_size, stride, padding, bias: as ``nn.Conv2d``.
        dilation, groups, padding_mode: accepted only at their defaults (1, 1, 'zeros');
            anything else raises ``ValueError``.

    ``forward(x [B, C_x, H, W], c [B, C_c]) -> [B, O, H_out, W_out]``.
    """

    def __init__(self, in_channels: int, label_channels: int, out_channels: int, kernel_size,
                 stride=1, padding=0, bias: bool = True, dilation=1, groups: int = 1,
                 padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        self._configure(in_channels, label_channels, out_channels, kernel_size, stride, padding,
                        dilation, groups, padding_mode)
        factory = {"device": device, "dtype": dtype}
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels + label_channels, kh, kw,
                                               **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _configure(self, in_channels, label_channels, out_channels, kernel_size, stride, padding,
                   dilation, groups, padding_mode) -> None:
        if _pair(dilation, "dilation") != (1, 1):
            raise ValueError(f"LabelConcatConv2d: only dilation 1 is supported, got {dilation!r}")
        if groups != 1:
            raise ValueError(f"LabelConcatConv2d: only groups=1 is supported, got {groups}")
        if padding_mode != "zeros":
            raise ValueError(f"LabelConcatConv2d: only padding_mode='zeros' is supported, "
                             f"got {padding_mode!r}")
        if in_channels < 1 or label_channels < 1 or out_channels < 1:
            raise ValueError("LabelConcatConv2d: in_channels, label_channels and out_channels "
                             f"must be >= 1, got {in_channels}, {label_channels}, {out_channels}")
        self.in_channels = int(in_channels)
        self.label_channels = int(label_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"LabelConcatConv2d: bad kernel_size/stride/padding "
                             f"{self.kernel_size}, {self.stride}, {self.padding}")
        self._pattern_cache: dict = {}

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation, over the full (concatenated) fan-in.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, label_channels: int) -> "LabelConcatConv2d":
        """Wraps ``conv`` (over ``cat(x, tile(c))``, the last ``label_channels`` input channels
        being the label) sharing its ``weight`` and ``bias`` Parameters."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"LabelConcatConv2d.from_conv: expected nn.Conv2d, "
                            f"got {type(conv).__name__}")
        in_channels = conv.in_channels - label_channels
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._configure(in_channels, label_channels, conv.out_channels, conv.kernel_size,
                        conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
        self.weight = conv.weight
        self.bias = conv.bias
        return self

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, label_channels={self.label_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"bias={self.bias is not None}")

    def _patterns(self, axis: int, in_size: int, out_size: int, device, dtype):
        key = (axis, in_size, out_size, str(device), dtype)
        hit = self._pattern_cache.get(key)
        if hit is None:
            # Cached tensors made under torch.inference_mode would be inference tensors, which
            # autograd refuses to save: a later training call would fail. Make normal ones.
            with torch.inference_mode(False):
                ids, indicator = tap_patterns(in_size, self.kernel_size[axis], self.stride[axis],
                                              self.padding[axis], out_size)
                hit = (ids.to(device), indicator.to(device=device, dtype=dtype))
            self._pattern_cache[key] = hit
        return hit

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"LabelConcatConv2d: x must be [B, {self.in_channels}, H, W], "
                             f"got {tuple(x.shape)}")
        if c.dim() != 2 or c.shape[1] != self.label_channels:
            raise ValueError(f"LabelConcatConv2d: c must be [B, {self.label_channels}], "
                             f"got {tuple(c.shape)}")
        if c.shape[0] != x.shape[0]:
            raise ValueError(f"LabelConcatConv2d: c has batch {c.shape[0]}, x has {x.shape[0]}")
        cx = self.in_channels
        o = self.out_channels
        kh, kw = self.kernel_size
        weight = self.weight
        conv_x = F.conv2d(x, weight[:, :cx], None, self.stride, self.padding)
        h_out, w_out = conv_x.shape[-2:]
        row_ids, a_row = self._patterns(0, x.shape[2], h_out, x.device, weight.dtype)
        col_ids, a_col = self._patterns(1, x.shape[3], w_out, x.device, weight.dtype)
        # P[o, b, k] = sum_c c[b, c] W_c[o, c, k]: a bmm over o on a strided view of the weight
        # (torch.matmul would copy the label slice; bmm reads it in place).
        with _autocast_disabled(x.device.type):
            # The table in the weight's dtype even under autocast (see the module doc).
            w_c = weight[:, cx:].reshape(o, self.label_channels, kh * kw)
            p = torch.bmm(c.to(weight.dtype).unsqueeze(0).expand(o, -1, -1), w_c)  # [O, B, kh*kw]
            p = p.view(o, -1, kh, kw).transpose(0, 1)                      # [B, O, kh, kw]
            table = torch.matmul(torch.matmul(a_row, p), a_col.t())        # [B, O, R, S]
            if self.bias is not None:
                table = table + self.bias.view(1, o, 1, 1)
        return label_table_add(conv_x, table.to(conv_x.dtype), row_ids, col_ids)
