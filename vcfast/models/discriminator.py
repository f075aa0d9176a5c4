"""StarGAN's discriminator (official code layout, docs/models.md), ready for the lean gradient
penalty."""

from __future__ import annotations

import torch
from torch import nn

from vcfast.models.generator import bf16_autocast, to_float32_if_half


class StarGANDiscriminator(nn.Module):
    """PatchGAN critic + domain classifier.

    ``repeat_num`` x [Conv 4x4 s2 p1, LeakyReLU(0.01)] from ``conv_dim`` channels doubling,
    then two bias-free heads on the shared feature: ``conv1`` (3x3 -> 1 channel, the WGAN
    "real?" map) and ``conv2`` (a kernel covering the whole feature map -> ``n_classes``
    logits). Paper size (1x256x256, 64..2048 channels, 1476 classes): about 93.1 M parameters.

    ``forward(x) -> (src [N, 1, h, w], cls [N, n_classes])``; ``features(x)`` is the shared
    ``[N, C, h, w]`` feature (for feature matching); ``gradient_penalty_layers()`` is trunk +
    src head, so :func:`vcfast.gradient_penalty` penalises D_src only, as StarGAN does.

    ``autocast_bf16=True`` runs ``forward`` and ``features`` under
    ``torch.autocast(<input's device type>, torch.bfloat16)`` and returns float32 tensors.
    :func:`vcfast.gradient_penalty` runs ``gradient_penalty_layers()`` itself and does not see
    this flag: wrap the penalty in ``torch.autocast`` to run it in bf16 too.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 256, conv_dim: int = 64,
                 repeat_num: int = 6, n_classes: int = 1476, negative_slope: float = 0.01,
                 autocast_bf16: bool = False) -> None:
        super().__init__()
        if image_size % (2**repeat_num) != 0:
            raise ValueError(f"StarGANDiscriminator: image_size {image_size} must be divisible by "
                             f"2**repeat_num = {2**repeat_num}")
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(repeat_num):
            out = conv_dim * 2**i
            layers += [nn.Conv2d(channels, out, 4, 2, 1), nn.LeakyReLU(negative_slope)]
            channels = out
        self.main = nn.Sequential(*layers)
        self.conv1 = nn.Conv2d(channels, 1, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(channels, n_classes, image_size // 2**repeat_num, bias=False)
        self.image_size = image_size
        self.n_classes = n_classes
        self.autocast_bf16 = bool(autocast_bf16)

    @classmethod
    def paper(cls, label_space=None, image_size: int = 256,
              autocast_bf16: bool = False) -> "StarGANDiscriminator":
        """Paper size (docs/models.md#discriminator); ``label_space`` (a vcfast.LabelSpace) sets the
        classifier width."""
        n_classes = label_space.n_classes if label_space is not None else 1476
        return cls(in_channels=1, image_size=image_size, conv_dim=64, repeat_num=6,
                   n_classes=n_classes, autocast_bf16=autocast_bf16)

    def _autocast_enabled(self) -> bool:
        return getattr(self, "autocast_bf16", False)  # getattr: modules unpickled from older code

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared trunk feature ``[N, C, h, w]`` (float32 under ``autocast_bf16``)."""
        if self._autocast_enabled():
            with bf16_autocast(x.device.type):
                h = self.main(x)
            return to_float32_if_half(h)
        return self.main(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._autocast_enabled():
            with bf16_autocast(x.device.type):
                src, cls = self._forward(x)
            return to_float32_if_half(src), to_float32_if_half(cls)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.main(x)
        return self.conv1(h), self.conv2(h).flatten(1)

    def gradient_penalty_layers(self) -> list[nn.Module]:
        return [*self.main, self.conv1]
