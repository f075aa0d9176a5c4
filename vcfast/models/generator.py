"""StarGAN's generator (docs/models.md#generator) built from vcfast's memory-lean layers.

Same parameters, same math, same outputs and gradients as the official layout
(:class:`vcfast.models.official.OfficialGenerator`), but:

* the first 7x7 conv over ``cat(x, tile(c))`` is a :class:`vcfast.nn.LabelConcatConv2d`
  (no ``N x c_dim x H x W`` tile, forward or backward);
* every "InstanceNorm -> ReLU -> conv" runs as one :class:`vcfast.nn.InstanceNormReLUConv2d`
  that keeps only the norm's input and per-(sample, channel) statistics;
* residual blocks are :class:`vcfast.nn.LeanResidualBlock` and can be activation-checkpointed
  (``checkpoint_residual_blocks=True``; running statistics are still updated exactly once);
* ``autocast_bf16=True`` runs the forward under ``torch.autocast(<input's device type>,
  torch.bfloat16)`` (convolutions in bf16, instance-norm statistics in float32, parameters
  stay float32) and returns a float32 output.

Module layout (state-dict names differ from the official ``main.<i>`` ones)::

    stem        LabelConcatConv2d     official main[0]   (7x7 conv over x ++ tiled c)
    down[i]     norm, conv            IN after the previous conv -> ReLU -> 4x4 s2 conv
    trunk_norm  InstanceNorm2d        IN after the last down conv (then ReLU)
    blocks[j]   LeanResidualBlock     .main exactly the official residual block's
    up_in       ConvTranspose2d       first up-sampling conv (on the trunk output)
    up[i]       norm, conv            IN -> ReLU -> next ConvTranspose2d
    head        norm, conv            IN -> ReLU -> final 7x7 conv
    (sigmoid or tanh)

With the same RNG seed ``StarGANGenerator(...)`` initialises exactly like
``OfficialGenerator(...)`` (modules are created in the official order).
Paper size (``StarGANGenerator.paper()``, c_dim 1479): 13,040,448 parameters.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vcfast.nn.label_conv import LabelConcatConv2d
from vcfast.nn.norm_act import InstanceNormReLUConv2d, LeanResidualBlock

__all__ = ["NORM_STATISTICS", "StarGANGenerator", "inference_mode", "module_device"]

_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "none": None}
_AUTOCAST_DEVICES = ("cpu", "cuda")


def bf16_autocast(device_type: str):
    """``torch.autocast(device_type, dtype=torch.bfloat16)``, or a no-op for a device type
    autocast does not support (the meta device: the memory estimator emulates autocast itself)."""
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_float32_if_half(t: Tensor) -> Tensor:
    """Autocast outputs (bf16 / fp16) back to float32; float32 / float64 unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class _FrozenRunningStats:
    """During a checkpoint recompute: run the norms with momentum 0 so the running statistics,
    already updated by the original forward, are left as they are (r * 1 + s * 0 == r).

    A class rather than a generator context manager: checkpoint enters the same recompute
    context once per recompute, and a graph kept with ``retain_graph=True`` is recomputed
    on every backward through it.
    """

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules()
                      if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
        self.saved: list = []

    def __enter__(self):
        self.saved = [m.momentum for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0
        return self

    def __exit__(self, *exc_info) -> None:
        for m, momentum in zip(self.norms, self.saved):
            m.momentum = momentum


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); CPU for a module with neither."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


#: How a generator's InstanceNorms normalise at inference (see :func:`inference_mode`).
NORM_STATISTICS = ("instance", "running")


@contextlib.contextmanager
def inference_mode(generator: nn.Module, norm_statistics: str = "instance"):
    """Run ``generator`` for conversion; restores every module's mode afterwards.

    ``norm_statistics="instance"`` (default): each InstanceNorm normalises a spectrogram with
    its own statistics, as in training. This is what the official StarGAN code does at test
    time (it never calls ``eval()``), and what a briefly trained model needs: its running
    averages of per-utterance statistics are a poor stand-in for the utterance's own (on the
    demo, G's identity error in eval mode equals that of predicting the mean spectrogram; with
    instance statistics it is 40 % lower). Running statistics are left untouched.
    ``"running"``: plain ``eval()``, the norms use their running statistics.
    """
    if norm_statistics not in NORM_STATISTICS:
        raise ValueError(f"norm_statistics must be one of {NORM_STATISTICS}, "
                         f"got {norm_statistics!r}")
    modes = [(m, m.training) for m in generator.modules()]
    generator.eval()
    try:
        if norm_statistics == "instance":
            norms = [m for m in generator.modules()
                     if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
            for m in norms:
                m.train()
            with _FrozenRunningStats(generator):
                yield generator
        else:
            yield generator
    finally:
        for m, mode in modes:
            m.training = mode


class StarGANGenerator(nn.Module):
    """Lean StarGAN generator.

    Args:
        conv_dim: channels after the first conv (64 at paper size).
        c_dim: label-vector length (``LabelSpace.input_dim``, 1479).
        repeat_num: residual blocks (6).
        in_channels: image channels (1 for spectrograms); the output has the same.
        out_activation: ``'sigmoid'`` (docs/models.md#generator) or ``'tanh'``.
        checkpoint_residual_blocks: recompute each residual block in backward
            (``torch.utils.checkpoint``, ``use_reentrant=False``) instead of keeping its
            intermediates; only active when autograd records.
        autocast_bf16: run the forward under bf16 autocast on the input's device type
            (CPU or CUDA; the backward then follows autocast's casts); the output is float32.
            Changeable later through the attribute of the same name.

    ``forward(x [N, in_channels, H, W], c [N, c_dim]) -> [N, in_channels, H, W]`` (H, W
    divisible by 4).
    """

    def __init__(self, conv_dim: int = 64, c_dim: int = 1479, repeat_num: int = 6,
                 in_channels: int = 1, out_activation: str = "sigmoid",
                 checkpoint_residual_blocks: bool = False, autocast_bf16: bool = False):
        super().__init__()
        if out_activation not in ("sigmoid", "tanh"):
            raise ValueError(f"out_activation must be 'sigmoid' or 'tanh', got {out_activation!r}")

        def norm(ch):
            return nn.InstanceNorm2d(ch, affine=True, track_running_stats=True)

        # Created in the official order so that a given seed gives the official initialisation.
        stem = nn.Conv2d(in_channels + c_dim, conv_dim, kernel_size=7, stride=1, padding=3,
                         bias=False)
        pre_norms = [norm(conv_dim)]
        downs = []
        curr = conv_dim
        for _ in range(2):
            downs.append(nn.Conv2d(curr, curr * 2, kernel_size=4, stride=2, padding=1, bias=False))
            pre_norms.append(norm(curr * 2))
            curr *= 2
        blocks = [LeanResidualBlock(curr, curr) for _ in range(repeat_num)]
        ups, post_norms = [], []
        for _ in range(2):
            ups.append(nn.ConvTranspose2d(curr, curr // 2, kernel_size=4, stride=2, padding=1,
                                          bias=False))
            post_norms.append(norm(curr // 2))
            curr //= 2
        final = nn.Conv2d(curr, in_channels, kernel_size=7, stride=1, padding=3, bias=False)
        self._assemble(stem, c_dim, pre_norms, downs, blocks, ups, post_norms, final,
                       out_activation, checkpoint_residual_blocks)
        self.autocast_bf16 = bool(autocast_bf16)

    def _assemble(self, stem: nn.Conv2d, c_dim: int, pre_norms, downs, blocks, ups, post_norms,
                  final: nn.Conv2d, out_activation: str, checkpoint_residual_blocks: bool) -> None:
        """Wires existing modules (shared, not copied). ``pre_norms[i]`` follows conv ``i`` of
        ``[stem] + downs``; ``post_norms[i]`` follows ``ups[i]``."""
        if len(pre_norms) != len(downs) + 1 or len(post_norms) != len(ups) or not ups:
            raise ValueError("StarGANGenerator: inconsistent layer lists")
        self.stem = LabelConcatConv2d.from_conv(stem, c_dim)
        self.down = nn.ModuleList(InstanceNormReLUConv2d(n, c)
                                  for n, c in zip(pre_norms[:-1], downs))
        self.trunk_norm = pre_norms[-1]
        self.blocks = nn.ModuleList(blocks)
        self.up_in = ups[0]
        self.up = nn.ModuleList(InstanceNormReLUConv2d(n, c)
                                for n, c in zip(post_norms[:-1], ups[1:]))
        self.head = InstanceNormReLUConv2d(post_norms[-1], final)
        self.out_activation = out_activation
        self.checkpoint_residual_blocks = bool(checkpoint_residual_blocks)
        self.autocast_bf16 = False
        self.in_channels = stem.in_channels - c_dim
        self.c_dim = c_dim
        self.conv_dim = stem.out_channels
        self.repeat_num = len(blocks)

    @classmethod
    def _from_modules(cls, *args, **kwargs) -> "StarGANGenerator":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._assemble(*args, **kwargs)
        return self

    @classmethod
    def paper(cls, label_space=None, out_activation: str = "sigmoid",
              checkpoint_residual_blocks: bool = False,
              autocast_bf16: bool = False) -> "StarGANGenerator":
        """Paper size (docs/models.md#generator); ``label_space`` (a vcfast.LabelSpace) sets
        ``c_dim`` (default 1479)."""
        c_dim = label_space.input_dim if label_space is not None else 1479
        return cls(conv_dim=64, c_dim=c_dim, repeat_num=6, in_channels=1,
                   out_activation=out_activation,
                   checkpoint_residual_blocks=checkpoint_residual_blocks,
                   autocast_bf16=autocast_bf16)

    def extra_repr(self) -> str:
        return (f"c_dim={self.c_dim}, out_activation={self.out_activation!r}, "
                f"checkpoint_residual_blocks={self.checkpoint_residual_blocks}, "
                f"autocast_bf16={getattr(self, 'autocast_bf16', False)}")

    def _run_block(self, block: nn.Module, h: Tensor) -> Tensor:
        if self.checkpoint_residual_blocks and torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                # Dynamo cannot trace a checkpoint context_fn. It does not need one: compiled,
                # the backward recomputes from the traced graph's pure ops, so the running
                # statistics are updated once, by the forward, without freezing them.
                return checkpoint(block, h, use_reentrant=False)
            return checkpoint(block, h, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(),
                                                  _FrozenRunningStats(block)))
        return block(h)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        if getattr(self, "autocast_bf16", False):  # getattr: modules unpickled from older code
            with bf16_autocast(x.device.type):
                out = self._forward(x, c)
            return to_float32_if_half(out)
        return self._forward(x, c)

    def _forward(self, x: Tensor, c: Tensor) -> Tensor:
        h = self.stem(x, c)
        for unit in self.down:
            h = unit(h)
        h = F.relu(self.trunk_norm(h), inplace=True)
        for block in self.blocks:
            h = self._run_block(block, h)
        h = self.up_in(h)
        for unit in self.up:
            h = unit(h)
        h = self.head(h)
        act = _ACTIVATIONS[self.out_activation]
        return act(h) if act is not None else h
