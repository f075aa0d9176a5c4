"""bf16 autocast for the lean layers and models.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the lean generator (LabelConcatConv2d,
InstanceNormReLUConv2d, LeanResidualBlock) must do what the official layout does under the
same autocast: convolutions in bf16, statistics in float32, float32 parameter gradients, no
dtype errors in backward. The two run different bf16 roundings (the lean table is float32,
the lean norm-ReLU rounds its output once), so they are compared with a norm-relative
tolerance for bf16 (2e-2: bf16 has 8 significant bits, 3.9e-3 per rounding, and the errors
of a few layers add up); an error in the casting logic (a conv left in float32 on one side
only, a missing cast of a gradient) shows up as a dtype error or an O(1) difference.
Small models: conv_dim 8, c_dim 10, 32 x 32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vcfast.models.convert import convert_stargan
from vcfast.models.discriminator import StarGANDiscriminator
from vcfast.models.generator import StarGANGenerator
from vcfast.models.official import OfficialGenerator
from vcfast.nn.label_conv import LabelConcatConv2d
from vcfast.nn.norm_act import InstanceNormReLUConv2d

BF16 = torch.bfloat16
REL = 2e-2


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _assert_rel_close(got, want, rel=REL, what=""):
    err = _rel_err(got, want)
    assert err < rel, f"{what}: relative error {err:.3g} >= {rel}"


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.InstanceNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def _pair():
    torch.manual_seed(0)
    official = OfficialGenerator(conv_dim=8, c_dim=10, repeat_num=2)
    _randomise_norms(official)
    lean = convert_stargan(copy.deepcopy(official))
    return official, lean


def _inputs(n=2, c_dim=10, hw=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, hw, hw, generator=gen)
    c = (torch.rand(n, c_dim, generator=gen) > 0.5).float()
    w = torch.randn(n, 1, hw, hw, generator=torch.Generator().manual_seed(seed + 1))
    return x, c, w


def _run(model, x, c, w, autocast: bool, backward_inside: bool = True):
    model.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    if autocast:
        with torch.autocast("cpu", dtype=BF16):
            y = model(xr, c)
            loss = (y.float() * w).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
    else:
        y = model(xr, c)
        (y * w).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return y, xr.grad, grads


def _official_name_of(lean_param, official):
    """The official parameter holding equal values (convert_stargan shares, deepcopy copies)."""
    for name, p in official.named_parameters():
        if p.shape == lean_param.shape and torch.equal(p.detach(), lean_param.detach()):
            return name
    raise AssertionError("no official parameter matches")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_lean_generator_matches_official_under_cpu_bf16_autocast(mode):
    official, lean = _pair()
    official.train(mode == "train")
    lean.train(mode == "train")
    x, c, w = _inputs()
    exact = {}
    for name, model in (("official", official), ("lean", lean)):
        exact[name] = _run(copy.deepcopy(model), x, c, w, autocast=False)
    y0, gx0, g0 = _run(official, x, c, w, autocast=True)
    y1, gx1, g1 = _run(lean, x, c, w, autocast=True)
    # the convolutions really ran in bf16 on both sides; the output is as close as bf16 allows
    assert y0.dtype == BF16 and y1.dtype == BF16
    _assert_rel_close(y1, y0, what="output")
    _assert_rel_close(y1, exact["lean"][0], what="output vs float32")
    # Gradients: bf16 rounding in ~15 backward convolutions and the train-mode IN backward
    # (g - mean(g) - xhat mean(g xhat) cancels) leave the *official* layout's bf16 gradients
    # 1-20 % (relative norm) away from its own float32 gradients on this model, so the lean
    # bf16 gradients are held to being as accurate as the official bf16 ones, measured
    # against the float32 gradients: per tensor within 2x + 0.02 of the official error, and
    # over all parameters together within 1.3x. A wrong cast (a layer in float32 on one side
    # only would be *more* accurate; a gradient cast to the wrong dtype, or a wrong mask,
    # gives an O(1) error) fails this.
    err_off = _rel_err(gx0, exact["official"][1])
    err_lean = _rel_err(gx1, exact["lean"][1])
    assert err_lean <= 2 * err_off + 0.02, f"grad x: lean {err_lean:.3g} vs official {err_off:.3g}"
    total_off = total_lean = 0.0
    for n, p in lean.named_parameters():
        on = _official_name_of(p, official)
        assert g1[n].dtype == torch.float32, n
        err_off = _rel_err(g0[on], exact["official"][2][on])
        err_lean = _rel_err(g1[n], exact["lean"][2][n])
        assert err_lean <= 2 * err_off + 0.02, \
            f"grad {n}: lean {err_lean:.3g} vs official {err_off:.3g}"
        assert _rel_err(g1[n], g0[on]) < 0.5, n  # and close to the official bf16 gradient
        total_off += err_off ** 2
        total_lean += err_lean ** 2
    assert total_lean <= 1.3 ** 2 * total_off, (total_lean ** 0.5, total_off ** 0.5)
    # running statistics were updated by the same amounts (train), or left alone (eval)
    run0 = dict(official.named_buffers())
    for n, b in lean.named_buffers():
        if n.endswith("running_var") or n.endswith("running_mean"):
            kind = n.rsplit(".", 1)[1]
            match = [v for k, v in run0.items() if k.endswith(kind) and v.shape == b.shape
                     and torch.allclose(v, b, rtol=REL, atol=1e-3)]
            assert b.dtype == torch.float32 and match, n


def test_lean_generator_bf16_close_to_float32():
    _, lean = _pair()
    x, c, w = _inputs()
    y32, gx32, g32 = _run(copy.deepcopy(lean), x, c, w, autocast=False)
    y16, gx16, g16 = _run(lean, x, c, w, autocast=True)
    _assert_rel_close(y16, y32, what="output vs float32")
    assert gx16.dtype == torch.float32
    assert all(g16[n].dtype == torch.float32 for n in g16)
    _assert_rel_close(g16["head.conv.weight"], g32["head.conv.weight"], rel=5e-2,
                      what="last conv grad")


def test_autocast_bf16_option_generator():
    """autocast_bf16=True: float32 in, float32 out, the same numbers as an outer autocast; the
    backward works outside any autocast context."""
    _, lean = _pair()
    x, c, w = _inputs()
    y_outer, gx_outer, g_outer = _run(copy.deepcopy(lean), x, c, w, autocast=True,
                                      backward_inside=False)
    lean.autocast_bf16 = True
    assert "autocast_bf16=True" in repr(lean)
    y, gx, g = _run(lean, x, c, w, autocast=False)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_outer.float(), rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_outer, rtol=0, atol=0)
    for n in g:
        torch.testing.assert_close(g[n], g_outer[n], rtol=0, atol=0, msg=n)
    fresh = StarGANGenerator(conv_dim=8, c_dim=10, repeat_num=1, autocast_bf16=True,
                             checkpoint_residual_blocks=True)
    out = fresh(x, c)
    assert out.dtype == torch.float32 and fresh.autocast_bf16
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fresh.parameters())
    # float64 models are left alone, as autocast leaves float64 alone
    f64 = StarGANGenerator(conv_dim=4, c_dim=3, repeat_num=1, autocast_bf16=True).double()
    assert f64(x.double()[:, :, :8, :8], c.double()[:, :3]).dtype == torch.float64


def test_backward_outside_autocast_equals_backward_inside():
    """The explicit casts make the lean units' backward independent of the autocast state it
    runs in. Exception: the stem's label table is ordinary autograd (bmm / matmul), whose
    backward formulas PyTorch runs through autocast when backward() is called inside the
    autocast region, so its label-weight gradient differs there by bf16 rounding."""
    _, lean = _pair()
    x, c, w = _inputs()
    _, gx_in, g_in = _run(copy.deepcopy(lean), x, c, w, autocast=True, backward_inside=True)
    _, gx_out, g_out = _run(lean, x, c, w, autocast=True, backward_inside=False)
    torch.testing.assert_close(gx_out, gx_in, rtol=0, atol=0)
    for n in g_in:
        if n == "stem.weight":
            torch.testing.assert_close(g_out[n][:, :1], g_in[n][:, :1], rtol=0, atol=0)
            _assert_rel_close(g_out[n], g_in[n], what=n)
        else:
            torch.testing.assert_close(g_out[n], g_in[n], rtol=0, atol=0, msg=n)


def test_norm_relu_conv_unit_under_autocast():
    torch.manual_seed(0)
    lean = InstanceNormReLUConv2d.from_sizes(6, 5, 3, padding=1)
    ref = nn.Sequential(copy.deepcopy(lean.norm), nn.ReLU(), copy.deepcopy(lean.conv))
    z = torch.randn(2, 6, 9, 11)
    results = []
    for m in (lean, ref):
        zz = z.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=BF16):
            out = m(zz)
        out.float().sum().backward()
        results.append((out, zz.grad))
    (o1, g1), (o0, g0) = results
    assert o1.dtype == o0.dtype == BF16
    assert g1.dtype == torch.float32
    _assert_rel_close(o1, o0, what="output")
    _assert_rel_close(g1, g0, what="grad z")
    for (n1, p1), (n0, p0) in zip(lean.named_parameters(), ref.named_parameters()):
        assert p1.grad.dtype == torch.float32
        _assert_rel_close(p1.grad, p0.grad, what=n1)


def test_label_concat_conv_under_autocast():
    torch.manual_seed(0)
    lean = LabelConcatConv2d(1, 10, 8, 7, padding=3)
    conv = nn.Conv2d(11, 8, 7, padding=3)
    with torch.no_grad():
        conv.weight.copy_(lean.weight)
        conv.bias.copy_(lean.bias)
    x = torch.rand(2, 1, 16, 16)
    c = (torch.rand(2, 10) > 0.5).float()
    outs = []
    for name in ("lean", "tiled"):
        xr = x.clone().requires_grad_(True)
        cr = c.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=BF16):
            if name == "lean":
                y = lean(xr, cr)
            else:
                y = conv(torch.cat([xr, cr[:, :, None, None].expand(-1, -1, 16, 16)], 1))
        y.float().square().sum().backward()
        outs.append((y, xr.grad, cr.grad))
    (y1, gx1, gc1), (y0, gx0, gc0) = outs
    assert y1.dtype == y0.dtype == BF16
    assert gc1.dtype == torch.float32 and lean.weight.grad.dtype == torch.float32
    _assert_rel_close(y1, y0, what="output")
    _assert_rel_close(gx1, gx0, what="grad x")
    _assert_rel_close(gc1, gc0, what="grad c")
    _assert_rel_close(lean.weight.grad, conv.weight.grad, what="grad weight")
    _assert_rel_close(lean.bias.grad, conv.bias.grad, what="grad bias")


def test_autocast_bf16_option_discriminator():
    torch.manual_seed(0)
    d32 = StarGANDiscriminator(image_size=32, conv_dim=8, repeat_num=3, n_classes=5)
    d16 = copy.deepcopy(d32)
    d16.autocast_bf16 = True
    assert StarGANDiscriminator(image_size=32, conv_dim=8, repeat_num=3, n_classes=5,
                                autocast_bf16=True).autocast_bf16
    x = torch.rand(2, 1, 32, 32)
    src32, cls32 = d32(x)
    src16, cls16 = d16(x)
    assert src16.dtype == cls16.dtype == torch.float32
    _assert_rel_close(src16, src32, what="src")
    _assert_rel_close(cls16, cls32, what="cls")
    feat = d16.features(x)
    assert feat.dtype == torch.float32
    _assert_rel_close(feat, d32.features(x), what="features")
    (src16.sum() + cls16.sum()).backward()
    assert all(p.grad.dtype == torch.float32 for p in d16.parameters())
