"""StarGAN's generator and discriminator written exactly as the official StarGAN code writes them.

This is the reference layout (docs/models.md): what users bring, what the tests compare the lean
models against, and what the memory estimator measures as "the reference". The generator
tiles the label vector over H x W and concatenates it to the input (a B x c_dim x H x W tensor;
~370 MiB per sample at paper size in fp32) and keeps two activation-sized tensors per
Conv -> InstanceNorm -> ReLU block. Use :func:`vcfast.models.convert.convert_stargan` to get the
lean equivalent sharing the same parameters.

Paper size (``OfficialGenerator()``, c_dim 1479): 13,040,448 parameters (~13.0 M).
"""

from __future__ import annotations

import torch
from torch import nn

from vcfast.models.discriminator import StarGANDiscriminator
from vcfast.nn.norm_act import residual_block_main

__all__ = ["OfficialDiscriminator", "OfficialGenerator", "OfficialResidualBlock"]

#: The official discriminator layout is what :class:`StarGANDiscriminator` already is.
OfficialDiscriminator = StarGANDiscriminator


class OfficialResidualBlock(nn.Module):
    """Residual Block with instance normalization (official StarGAN ``ResidualBlock``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.main = residual_block_main(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


def _out_activation(name: str) -> nn.Module:
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"out_activation must be 'sigmoid' or 'tanh', got {name!r}")


class OfficialGenerator(nn.Module):
    """Generator network (official StarGAN ``Generator``; input channels and output activation
    configurable: 1-channel spectrograms and a sigmoid output for vcfast, docs/models.md).

    ``forward(x [N, in_channels, H, W], c [N, c_dim]) -> [N, in_channels, H, W]``.
    """

    def __init__(self, conv_dim: int = 64, c_dim: int = 1479, repeat_num: int = 6,
                 in_channels: int = 1, out_activation: str = "sigmoid"):
        super().__init__()
        act = _out_activation(out_activation)

        layers = []
        layers.append(nn.Conv2d(in_channels + c_dim, conv_dim, kernel_size=7, stride=1, padding=3,
                                bias=False))
        layers.append(nn.InstanceNorm2d(conv_dim, affine=True, track_running_stats=True))
        layers.append(nn.ReLU(inplace=True))

        # Down-sampling layers.
        curr_dim = conv_dim
        for i in range(2):
            layers.append(nn.Conv2d(curr_dim, curr_dim * 2, kernel_size=4, stride=2, padding=1,
                                    bias=False))
            layers.append(nn.InstanceNorm2d(curr_dim * 2, affine=True, track_running_stats=True))
            layers.append(nn.ReLU(inplace=True))
            curr_dim = curr_dim * 2

        # Bottleneck layers.
        for i in range(repeat_num):
            layers.append(OfficialResidualBlock(dim_in=curr_dim, dim_out=curr_dim))

        # Up-sampling layers.
        for i in range(2):
            layers.append(nn.ConvTranspose2d(curr_dim, curr_dim // 2, kernel_size=4, stride=2,
                                             padding=1, bias=False))
            layers.append(nn.InstanceNorm2d(curr_dim // 2, affine=True, track_running_stats=True))
            layers.append(nn.ReLU(inplace=True))
            curr_dim = curr_dim // 2

        layers.append(nn.Conv2d(curr_dim, in_channels, kernel_size=7, stride=1, padding=3,
                                bias=False))
        layers.append(act)
        self.main = nn.Sequential(*layers)

    @classmethod
    def paper(cls, label_space=None, out_activation: str = "sigmoid") -> "OfficialGenerator":
        """Paper size (docs/models.md); ``label_space`` (a vcfast.LabelSpace) sets ``c_dim``
        (default 1479)."""
        c_dim = label_space.input_dim if label_space is not None else 1479
        return cls(conv_dim=64, c_dim=c_dim, repeat_num=6, in_channels=1,
                   out_activation=out_activation)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # Replicate spatially and concatenate domain information.
        c = c.view(c.size(0), c.size(1), 1, 1)
        c = c.repeat(1, 1, x.size(2), x.size(3))
        x = torch.cat([x, c], dim=1)
        return self.main(x)
