"""StarGAN models (docs/models.md): official layout vs the lean generator and convert_stargan.

Exactness in float64: the lean generator converted from an official one (shared parameters)
gives the same outputs and the same gradient for every parameter (1e-10), in train and eval
mode, and updates the running statistics identically. Reduced sizes keep this fast; paper
size is checked by parameter count (and one forward at paper width on a tiny image).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vcfast.models.convert import convert_stargan
from vcfast.models.discriminator import StarGANDiscriminator
from vcfast.models.generator import StarGANGenerator
from vcfast.models.official import OfficialDiscriminator, OfficialGenerator, OfficialResidualBlock

F64 = torch.float64
SMALL = dict(conv_dim=8, c_dim=7, repeat_num=2)
TOL = dict(rtol=1e-10, atol=1e-10)


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and running statistics (defaults are 1/0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.InstanceNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen,
                                                     dtype=m.weight.dtype))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen,
                                                       dtype=F64))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=F64))


def _pair(activation: str = "sigmoid", **sizes):
    """An official G and, in a deep copy, the same G converted to lean (separate tensors)."""
    torch.manual_seed(0)
    official = OfficialGenerator(**{**SMALL, **sizes}, out_activation=activation).to(F64)
    _randomise_norms(official)
    lean = convert_stargan(copy.deepcopy(official))
    return official, lean


def _inputs(n=2, c_dim=7, hw=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, hw, hw, generator=gen, dtype=F64)
    c = (torch.rand(n, c_dim, generator=gen, dtype=F64) > 0.5).to(F64)
    return x, c


def _step(model, x, c, weight):
    model.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    cr = c.clone().requires_grad_(True)
    y = model(xr, cr)
    (y * weight).sum().backward()
    return y.detach(), xr.grad, cr.grad


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_lean_generator_matches_official_float64(mode, activation):
    official, lean = _pair(activation)
    official.train(mode == "train")
    lean.train(mode == "train")
    x, c = _inputs()
    weight = torch.randn(2, 1, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(5))
    y0, gx0, gc0 = _step(official, x, c, weight)
    y1, gx1, gc1 = _step(lean, x, c, weight)
    assert y0.shape == y1.shape == (2, 1, 32, 32)
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(gx1, gx0, **TOL)
    torch.testing.assert_close(gc1, gc0, **TOL)
    # Same parameters by name in the official layout: the deep copy keeps module identity, so
    # map lean parameters back through the official state dict names.
    off_params = dict(official.named_parameters())
    lean_sd_names = _lean_to_official_names(official, lean)
    assert len(lean_sd_names) == len(off_params)
    for lean_name, off_name in lean_sd_names.items():
        p_lean = dict(lean.named_parameters())[lean_name]
        p_off = off_params[off_name]
        assert p_lean.grad is not None, lean_name
        torch.testing.assert_close(p_lean.grad, p_off.grad, **TOL, msg=f"{lean_name} vs {off_name}")
    # Running statistics: updated in train mode, untouched in eval, identical either way.
    off_bufs = dict(official.named_buffers())
    for lean_name, off_name in _lean_to_official_names(official, lean, buffers=True).items():
        torch.testing.assert_close(dict(lean.named_buffers())[lean_name], off_bufs[off_name], **TOL)


def _lean_to_official_names(official, lean, buffers=False):
    """Lean name -> official name, by matching tensor values of a fresh conversion of a copy."""
    probe = copy.deepcopy(official)
    probe_lean = convert_stargan(probe)
    get = (lambda m: m.named_buffers()) if buffers else (lambda m: m.named_parameters())
    by_id = {id(t): n for n, t in get(probe)}
    names = {}
    for n, t in get(probe_lean):
        if buffers and not t.is_floating_point():
            continue
        names[n] = by_id[id(t)]
    assert names, "no tensors matched"
    return names


def test_running_stats_after_train_steps_match():
    official, lean = _pair()
    before = {n: b.clone() for n, b in official.named_buffers() if b.is_floating_point()}
    for seed in range(3):
        x, c = _inputs(seed=seed)
        official(x, c).sum().backward()
        lean(x, c).sum().backward()
    names = _lean_to_official_names(official, lean, buffers=True)
    off_bufs = dict(official.named_buffers())
    lean_bufs = dict(lean.named_buffers())
    changed = 0
    for ln, on in names.items():
        torch.testing.assert_close(lean_bufs[ln], off_bufs[on], **TOL)
        changed += not torch.equal(off_bufs[on], before[on])
    assert changed == len(names)  # every running mean / var moved


def test_convert_shares_tensors():
    torch.manual_seed(0)
    official = OfficialGenerator(**SMALL).to(F64)
    lean = convert_stargan(official)
    off_ids = {id(t) for t in [*official.parameters(), *official.buffers()]}
    lean_ts = [*lean.parameters(), *lean.buffers()]
    assert {id(t) for t in lean_ts} == off_ids
    assert (sum(p.numel() for p in lean.parameters())
            == sum(p.numel() for p in official.parameters()))
    x, c = _inputs()
    with torch.no_grad():
        official.main[0].weight.mul_(1.5)  # modify the official one ...
        assert lean.stem.weight is official.main[0].weight
        torch.testing.assert_close(lean(x, c), official(x, c), **TOL)  # ... the lean one sees it
        lean.head.conv.weight.add_(0.01)  # and the other way round
    assert torch.equal(official.main[-2].weight, lean.head.conv.weight)
    # An optimizer step on the lean model trains the official one.
    opt = torch.optim.SGD(lean.parameters(), lr=0.1)
    lean(x, c).sum().backward()
    w0 = official.main[3].weight.clone()
    opt.step()
    assert not torch.equal(official.main[3].weight, w0)


def test_convert_user_copy_by_structure():
    """A user's own class with the official structure (not our OfficialGenerator) converts."""

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.main = OfficialResidualBlock(d, d).main

        def forward(self, x):
            return x + self.main(x)

    class UserG(nn.Module):
        def __init__(self):
            super().__init__()
            ref = OfficialGenerator(**SMALL)
            layers = [Block(m.main[0].in_channels) if isinstance(m, OfficialResidualBlock) else m
                      for m in ref.main]
            self.main = nn.Sequential(*layers)

        def forward(self, x, c):
            c = c.view(c.size(0), c.size(1), 1, 1).repeat(1, 1, x.size(2), x.size(3))
            return self.main(torch.cat([x, c], dim=1))

    torch.manual_seed(0)
    user = UserG().to(F64)
    lean = convert_stargan(user)
    assert isinstance(lean, StarGANGenerator) and lean.c_dim == 7 and lean.repeat_num == 2
    x, c = _inputs()
    torch.testing.assert_close(lean(x, c), user(x, c), **TOL)


def test_same_seed_same_init_as_official():
    torch.manual_seed(3)
    official = OfficialGenerator(**SMALL)
    torch.manual_seed(3)
    lean = StarGANGenerator(**SMALL)
    off = sorted((p.numel(), p.sum().item()) for p in official.parameters())
    new = sorted((p.numel(), p.sum().item()) for p in lean.parameters())
    assert off == new
    x, c = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(lean(x.float(), c.float()), official(x.float(), c.float()),
                                   rtol=1e-4, atol=1e-5)


def test_checkpoint_residual_blocks_same_gradients_and_stats():
    official, lean = _pair()
    lean_ck = convert_stargan(copy.deepcopy(official))
    lean_ck.checkpoint_residual_blocks = True
    x, c = _inputs()
    weight = torch.randn(2, 1, 32, 32, dtype=F64)
    y0, gx0, gc0 = _step(lean, x, c, weight)
    y1, gx1, gc1 = _step(lean_ck, x, c, weight)
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(gx1, gx0, **TOL)
    torch.testing.assert_close(gc1, gc0, **TOL)
    for (n, p0), (_, p1) in zip(lean.named_parameters(), lean_ck.named_parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, **TOL, msg=n)
    # The recompute in backward must not update the running statistics a second time.
    for (n, b0), (_, b1) in zip(lean.named_buffers(), lean_ck.named_buffers()):
        torch.testing.assert_close(b1, b0, **TOL, msg=n)
    # Built directly with the option too.
    g = StarGANGenerator(**SMALL, checkpoint_residual_blocks=True)
    assert g.checkpoint_residual_blocks
    g(x.float(), c.float()).mean().backward()


def test_float32_close_to_official():
    torch.manual_seed(0)
    official = OfficialGenerator(**SMALL)
    lean = convert_stargan(copy.deepcopy(official))
    x, c = (t.float() for t in _inputs())
    y0, gx0, _ = _step(official, x, c, 1.0)
    y1, gx1, _ = _step(lean, x, c, 1.0)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5)


def test_paper_size_parameter_counts():
    g = StarGANGenerator.paper()
    o = OfficialGenerator.paper()
    n_g = sum(p.numel() for p in g.parameters())
    assert n_g == sum(p.numel() for p in o.parameters()) == 13_040_448
    assert abs(n_g / 1e6 - 13.0) < 0.05
    assert (g.c_dim == 1479 and g.conv_dim == 64 and g.repeat_num == 6
            and g.out_activation == "sigmoid")
    d = OfficialDiscriminator.paper()
    assert OfficialDiscriminator is StarGANDiscriminator
    assert abs(sum(p.numel() for p in d.parameters()) / 1e6 - 93.1) < 0.05


def test_paper_from_label_space():
    from vcfast.labels import LabelSpace

    g = StarGANGenerator.paper(LabelSpace())
    assert g.c_dim == LabelSpace().input_dim == 1479
    small = LabelSpace([("a", 4), ("b", 2)])
    assert StarGANGenerator.paper(small).c_dim == small.input_dim
    assert OfficialGenerator.paper(small).main[0].in_channels == 1 + small.input_dim


def test_paper_width_forward_small_image():
    official = OfficialGenerator.paper().to(F64)
    _randomise_norms(official)
    lean = convert_stargan(copy.deepcopy(official))
    x, c = _inputs(n=1, c_dim=1479, hw=12)
    y0, gx0, gc0 = _step(official, x, c, 1.0)
    y1, gx1, gc1 = _step(lean, x, c, 1.0)
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(gx1, gx0, **TOL)
    torch.testing.assert_close(gc1, gc0, **TOL)
    names = _lean_to_official_names(official, lean)
    lp, op = dict(lean.named_parameters()), dict(official.named_parameters())
    for ln, on in names.items():
        torch.testing.assert_close(lp[ln].grad, op[on].grad, **TOL, msg=ln)


def test_discriminator_conversion():
    class UserD(nn.Module):  # the official Discriminator, written out by a user
        def __init__(self, image_size=32, conv_dim=8, c_dim=5, repeat_num=3):
            super().__init__()
            layers = [nn.Conv2d(1, conv_dim, 4, 2, 1), nn.LeakyReLU(0.01)]
            cur = conv_dim
            for _ in range(1, repeat_num):
                layers += [nn.Conv2d(cur, cur * 2, 4, 2, 1), nn.LeakyReLU(0.01)]
                cur *= 2
            self.main = nn.Sequential(*layers)
            self.conv1 = nn.Conv2d(cur, 1, 3, 1, 1, bias=False)
            self.conv2 = nn.Conv2d(cur, c_dim, image_size // 2**repeat_num, bias=False)

        def forward(self, x):
            h = self.main(x)
            return self.conv1(h), self.conv2(h).view(h.size(0), -1)

    torch.manual_seed(0)
    user = UserD().to(F64)
    d = convert_stargan(user)
    assert isinstance(d, StarGANDiscriminator)
    assert d.image_size == 32 and d.n_classes == 5
    assert {id(p) for p in d.parameters()} == {id(p) for p in user.parameters()}
    x = torch.rand(2, 1, 32, 32, dtype=F64)
    s0, c0 = user(x)
    s1, c1 = d(x)
    torch.testing.assert_close(s1, s0, **TOL)
    torch.testing.assert_close(c1, c0, **TOL)
    assert len(d.gradient_penalty_layers()) == len(user.main) + 1
    # Already lean: returned as is.
    native = StarGANDiscriminator(image_size=32, conv_dim=8, repeat_num=3, n_classes=5)
    assert convert_stargan(native) is native
    g = StarGANGenerator(**SMALL)
    assert convert_stargan(g) is g


def test_bad_modules_raise():
    with pytest.raises(TypeError, match="no `.main`"):
        convert_stargan(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        convert_stargan("not a module")

    official = OfficialGenerator(**SMALL)
    broken = copy.deepcopy(official)
    broken.main[2] = nn.LeakyReLU(0.2)
    with pytest.raises(ValueError, match=r"main\[2\] is LeakyReLU"):
        convert_stargan(broken)

    no_up = copy.deepcopy(official)
    no_up.main = nn.Sequential(*[m for m in official.main if not isinstance(m, nn.ConvTranspose2d)])
    with pytest.raises(ValueError, match="main"):
        convert_stargan(no_up)

    class BadD(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(nn.Conv2d(1, 4, 4, 2, 1), nn.ReLU())
            self.conv1 = nn.Conv2d(4, 1, 3, 1, 1, bias=False)
            self.conv2 = nn.Conv2d(4, 3, 16, bias=False)

    with pytest.raises(ValueError, match=r"main\[1\] is ReLU; expected LeakyReLU"):
        convert_stargan(BadD())

    with pytest.raises(ValueError, match="out_activation"):
        StarGANGenerator(**SMALL, out_activation="relu")
    with pytest.raises(ValueError, match="out_activation"):
        OfficialGenerator(**SMALL, out_activation="relu")


def test_inference_mode_uses_instance_statistics_and_leaves_state_alone():
    """Conversion normalises each spectrogram with its own statistics (as training does and
    the official StarGAN test code does), never touches the running statistics, and restores
    every module's mode; "running" is plain eval mode."""
    from vcfast.models import inference_mode

    torch.manual_seed(0)
    G = StarGANGenerator(conv_dim=4, c_dim=5, repeat_num=1)
    x, c = torch.rand(2, 1, 16, 16), torch.rand(2, 5)
    expected_instance = G(x, c).detach()  # train mode: instance statistics (updates running ones)
    G.eval()
    with torch.no_grad():
        expected_running = G(x, c)
    state = {k: v.clone() for k, v in G.state_dict().items()}
    with torch.no_grad(), inference_mode(G):
        converted = G(x, c)
    torch.testing.assert_close(converted, expected_instance)
    assert not torch.allclose(converted, expected_running, atol=1e-3)
    for k, v in G.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(m.training for m in G.modules())
    with torch.no_grad(), inference_mode(G, "running"):
        torch.testing.assert_close(G(x, c), expected_running)
    with pytest.raises(ValueError, match="norm_statistics"):
        with inference_mode(G, "batch"):
            pass
