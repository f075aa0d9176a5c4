"""``convert_stargan``: the drop-in path from existing (official-layout) StarGAN code.

Recognises modules by structure, not by class, so users' own copies of the official StarGAN
``Generator`` / ``Discriminator`` work. The returned lean module SHARES the Parameters and
buffers of the one given (no copies): training either trains both, and state dicts of the
original stay valid.
"""

from __future__ import annotations

from torch import nn

from vcfast.models.discriminator import StarGANDiscriminator
from vcfast.models.generator import StarGANGenerator
from vcfast.nn.norm_act import LeanResidualBlock

__all__ = ["convert_stargan"]


def _describe(m: nn.Module) -> str:
    return type(m).__name__


def _is_residual_block(m: nn.Module) -> bool:
    main = getattr(m, "main", None)
    if not isinstance(main, nn.Sequential) or len(main) != 5:
        return False
    kinds = [nn.Conv2d, nn.InstanceNorm2d, nn.ReLU, nn.Conv2d, nn.InstanceNorm2d]
    if not all(type(layer) is k for layer, k in zip(main, kinds)):
        return False
    c1, n1, _, c2, n2 = main
    return (c1.in_channels == c2.out_channels
            and c1.out_channels == n1.num_features == c2.in_channels
            and c2.out_channels == n2.num_features and c1.stride == (1, 1) and c2.stride == (1, 1)
            and 2 * c1.padding[0] == c1.kernel_size[0] - 1
            and 2 * c1.padding[1] == c1.kernel_size[1] - 1
            and 2 * c2.padding[0] == c2.kernel_size[0] - 1
            and 2 * c2.padding[1] == c2.kernel_size[1] - 1)


def _expect(layers, i: int, kind, what: str) -> nn.Module:
    if i >= len(layers):
        raise ValueError(f"convert_stargan: generator main ends at index {i}; expected {what}")
    m = layers[i]
    if type(m) is not kind:
        raise ValueError(f"convert_stargan: generator main[{i}] is {_describe(m)}; expected {what}")
    return m


def _convert_generator(module: nn.Module, label_channels: int | None) -> StarGANGenerator:
    layers = list(module.main)
    n = len(layers)
    # Output activation at the end.
    activation = "none"
    end = n
    if n and type(layers[-1]) is nn.Sigmoid:
        activation, end = "sigmoid", n - 1
    elif n and type(layers[-1]) is nn.Tanh:
        activation, end = "tanh", n - 1
    final = (_expect(layers[:end], end - 1, nn.Conv2d, "the final Conv2d (before Sigmoid/Tanh)")
             if end else None)
    if final is None:
        raise ValueError("convert_stargan: generator main is empty")
    body = layers[:end - 1]

    i = 0
    convs, pre_norms = [], []
    # Stem and down-sampling: (Conv2d, InstanceNorm2d, ReLU) triples up to the residual trunk.
    while i < len(body) and type(body[i]) is nn.Conv2d:
        convs.append(body[i])
        pre_norms.append(_expect(body, i + 1, nn.InstanceNorm2d, "InstanceNorm2d after a Conv2d"))
        _expect(body, i + 2, nn.ReLU, "ReLU after an InstanceNorm2d")
        i += 3
    if not convs:
        raise ValueError(f"convert_stargan: generator main[0] is {_describe(layers[0])}; "
                         "expected the first Conv2d over image ++ tiled labels")
    blocks = []
    while i < len(body) and _is_residual_block(body[i]):
        blocks.append(body[i])
        i += 1
    ups, post_norms = [], []
    while i < len(body) and type(body[i]) is nn.ConvTranspose2d:
        ups.append(body[i])
        post_norms.append(_expect(body, i + 1, nn.InstanceNorm2d,
                                  "InstanceNorm2d after a ConvTranspose2d"))
        _expect(body, i + 2, nn.ReLU, "ReLU after an InstanceNorm2d")
        i += 3
    if i != len(body):
        raise ValueError(f"convert_stargan: generator main[{i}] is {_describe(body[i])}; "
                         "expected a residual block (main = Conv2d, InstanceNorm2d, ReLU, Conv2d, "
                         "InstanceNorm2d), a "
                         "ConvTranspose2d, or the final Conv2d")
    if not ups:
        raise ValueError("convert_stargan: generator has no ConvTranspose2d up-sampling layer")

    stem = convs[0]
    if label_channels is None:
        # Official layout: the output has as many channels as the image input.
        label_channels = stem.in_channels - final.out_channels
    if not 0 < label_channels < stem.in_channels:
        raise ValueError(f"convert_stargan: cannot split the first conv's {stem.in_channels} "
                         f"input channels into image + {label_channels} label channels; "
                         "pass label_channels=")
    blocks = [LeanResidualBlock.from_official(b) for b in blocks]
    return StarGANGenerator._from_modules(stem, label_channels, pre_norms, convs[1:], blocks, ups,
                                          post_norms, final, activation, False)


def _looks_like_discriminator(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "conv1", None), nn.Conv2d)
            and isinstance(getattr(module, "conv2", None), nn.Conv2d)
            and isinstance(getattr(module, "main", None), nn.Sequential))


def _convert_discriminator(module: nn.Module) -> StarGANDiscriminator:
    layers = list(module.main)
    if not layers or len(layers) % 2:
        raise ValueError("convert_stargan: discriminator main must be [Conv2d, LeakyReLU] pairs, "
                         f"got {len(layers)} layers")
    slope = None
    for j in range(0, len(layers), 2):
        conv, act = layers[j], layers[j + 1]
        if type(conv) is not nn.Conv2d:
            raise ValueError(f"convert_stargan: discriminator main[{j}] is {_describe(conv)}; "
                             "expected Conv2d")
        if type(act) is not nn.LeakyReLU:
            raise ValueError(f"convert_stargan: discriminator main[{j + 1}] is {_describe(act)}; "
                             "expected LeakyReLU")
        if (conv.kernel_size, conv.stride, conv.padding) != ((4, 4), (2, 2), (1, 1)):
            raise ValueError(f"convert_stargan: discriminator main[{j}] is not a 4x4 stride-2 "
                             "padding-1 conv")
        if slope is not None and act.negative_slope != slope:
            raise ValueError("convert_stargan: discriminator LeakyReLU slopes differ between "
                             "layers")
        slope = act.negative_slope
    repeat_num = len(layers) // 2
    conv1, conv2 = module.conv1, module.conv2
    if (conv1.out_channels != 1 or conv1.kernel_size != (3, 3) or conv1.stride != (1, 1)
            or conv1.padding != (1, 1)):
        raise ValueError("convert_stargan: discriminator conv1 must be a 3x3 s1 p1 conv to 1 "
                         "channel")
    if (conv2.kernel_size[0] != conv2.kernel_size[1] or conv2.stride != (1, 1)
            or conv2.padding != (0, 0)):
        raise ValueError("convert_stargan: discriminator conv2 must be a square unpadded conv over "
                         "the whole feature map")
    d = StarGANDiscriminator.__new__(StarGANDiscriminator)
    nn.Module.__init__(d)
    d.main = module.main
    d.conv1 = conv1
    d.conv2 = conv2
    d.image_size = conv2.kernel_size[0] * 2**repeat_num
    d.n_classes = conv2.out_channels
    d.train(module.training)
    return d


def convert_stargan(module: nn.Module, label_channels: int | None = None) -> nn.Module:
    """Returns the lean equivalent of an official-layout StarGAN G or D, sharing its tensors.

    * Generator (``module.main`` an ``nn.Sequential`` of ``Conv2d, InstanceNorm2d, ReLU``
      triples, residual blocks whose ``.main`` is ``Conv2d, InstanceNorm2d, ReLU, Conv2d,
      InstanceNorm2d``, ``ConvTranspose2d, InstanceNorm2d, ReLU`` triples, a final ``Conv2d``
      and optionally ``Sigmoid``/``Tanh``; forward tiling ``c`` and concatenating it after
      ``x``) -> :class:`StarGANGenerator`. ``label_channels`` defaults to the first conv's
      input channels minus the final conv's output channels (the official layout).
    * Discriminator (``main`` of ``Conv2d 4x4 s2 p1 + LeakyReLU`` pairs, heads ``conv1`` and
      ``conv2``) -> :class:`StarGANDiscriminator` (returned as is if it already is one).
    * :class:`StarGANGenerator` is returned as is.

    Anything else raises ``TypeError`` / ``ValueError`` naming what was unexpected.
    Parameters and buffers are the very same tensors; the lean module's train/eval mode
    follows the original's at conversion time.
    """
    if isinstance(module, (StarGANGenerator, StarGANDiscriminator)):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_stargan: expected an nn.Module, got {type(module).__name__}")
    if _looks_like_discriminator(module):
        return _convert_discriminator(module)
    main = getattr(module, "main", None)
    if not isinstance(main, nn.Sequential):
        raise TypeError(f"convert_stargan: {type(module).__name__} has no `.main` nn.Sequential; "
                        "expected an official-layout StarGAN Generator (main) or Discriminator "
                        "(main, conv1, conv2)")
    g = _convert_generator(module, label_channels)
    g.train(module.training)
    return g
