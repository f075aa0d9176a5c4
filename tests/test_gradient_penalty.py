"""Lean gradient penalty == autograd's double backward, exactly; bad critics raise."""

import warnings

import pytest
import torch
from torch import nn

import vcfast
from vcfast.models import StarGANDiscriminator
from vcfast.nn import GradientPenalty, PiecewiseLinearCritic
from vcfast.ops import gradient_penalty as gp_module
from vcfast.ops.gradient_penalty import UnsupportedCriticError, gradient_penalty


def penalty_and_grads(critic, x_real, x_fake, eps, mode, **kwargs):
    critic.zero_grad(set_to_none=True)
    gp = gradient_penalty(critic, x_real, x_fake, eps=eps, mode=mode, **kwargs)
    gp.backward()
    grads = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for name, p in critic.named_parameters()}
    return gp.detach(), grads


def assert_same_as_autograd(critic, x_real, x_fake, eps=None, rtol=1e-10, **kwargs):
    if eps is None:
        eps = torch.rand(x_real.shape[0], dtype=x_real.dtype)
    gp_ref, grads_ref = penalty_and_grads(critic, x_real, x_fake, eps, "autograd", **kwargs)
    gp_lean, grads_lean = penalty_and_grads(critic, x_real, x_fake, eps, "lean", **kwargs)
    torch.testing.assert_close(gp_lean, gp_ref, rtol=rtol, atol=0)
    if any(torch.isnan(g).any() for g in grads_ref.values()):
        # A sample whose input gradient is exactly 0 (a dead ReLU critic) makes autograd's
        # sqrt backward 0 * inf = NaN; the lean penalty defines that direction's gradient as
        # 0 instead (see penalty_terms_reference).
        assert all(torch.isfinite(g).all() for g in grads_lean.values())
        return gp_ref, grads_ref
    for name, ref in grads_ref.items():
        scale = ref.abs().max().clamp_min(1e-30)
        err = (grads_lean[name] - ref).abs().max() / scale
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"
    return gp_ref, grads_ref


def random_critic(generator, dtype, in_channels, size):
    """A random conv/LeakyReLU/ReLU stack with a linear head; returns (critic, spatial size)."""
    layers, channels = [], in_channels
    depth = int(torch.randint(1, 4, (1,), generator=generator))
    for _ in range(depth):
        out = int(torch.randint(1, 7, (1,), generator=generator))
        kernel = int(torch.randint(1, 5, (1,), generator=generator))
        stride = int(torch.randint(1, 3, (1,), generator=generator))
        padding = int(torch.randint(0, kernel, (1,), generator=generator))
        if (size + 2 * padding - kernel) // stride + 1 < 1:
            padding, stride = kernel - 1, 1
        layers.append(nn.Conv2d(channels, out, kernel, stride, padding,
                                bias=bool(torch.randint(0, 2, (1,), generator=generator))))
        size = (size + 2 * padding - kernel) // stride + 1
        slope = [0.0, 0.01, 0.2][int(torch.randint(0, 3, (1,), generator=generator))]
        layers.append(nn.ReLU() if slope == 0.0 else nn.LeakyReLU(slope))
        channels = out
    layers += [nn.Flatten(), nn.Linear(channels * size * size, 2)]
    return nn.Sequential(*layers).to(dtype)


@pytest.mark.parametrize("seed", range(12))
def test_random_critics_float64(seed):
    g = torch.Generator().manual_seed(seed)
    size = int(torch.randint(3, 12, (1,), generator=g))  # odd sizes included
    batch = int(torch.randint(1, 4, (1,), generator=g))  # batch 1 included
    in_channels = int(torch.randint(1, 3, (1,), generator=g))
    torch.manual_seed(seed)
    critic = random_critic(g, torch.float64, in_channels, size)
    x_real = torch.randn(batch, in_channels, size, size, generator=g, dtype=torch.float64)
    x_fake = torch.randn(batch, in_channels, size, size, generator=g, dtype=torch.float64)
    assert_same_as_autograd(critic, x_real, x_fake, rtol=1e-10)


def test_sample_with_zero_input_gradient_gets_zero_not_nan():
    critic = nn.Sequential(nn.Conv2d(1, 2, 3, 1, 1), nn.ReLU(), nn.Flatten(),
                           nn.Linear(2 * 9, 1)).double()
    with torch.no_grad():
        critic[0].bias.fill_(-100.0)  # every ReLU is off: grad_x D = 0 for every sample
    x = torch.rand(2, 1, 3, 3, dtype=torch.float64)
    gp = gradient_penalty(critic, x, x, mode="lean")
    gp.backward()
    assert gp.item() == pytest.approx(10.0)  # (0 - 1)^2 * weight
    assert all(torch.isfinite(p.grad).all() for p in critic.parameters() if p.grad is not None)


def test_conv_transpose_and_float32():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(2, 6, 3, 2, 1), nn.LeakyReLU(0.2),
                           nn.ConvTranspose2d(6, 4, 4, 2, 1),
                           nn.ReLU(), nn.Conv2d(4, 1, 3, 1, 1, bias=False))
    x_real, x_fake = torch.randn(3, 2, 9, 9), torch.randn(3, 2, 9, 9)
    assert_same_as_autograd(critic, x_real, x_fake, rtol=1e-4)
    assert_same_as_autograd(critic.double(), x_real.double(), x_fake.double(), rtol=1e-10)


def test_exactly_on_a_kink():
    # Zero input and zero biases put every pre-activation of the first layer exactly at 0,
    # where PyTorch's LeakyReLU derivative is the negative slope; both modes must agree.
    torch.manual_seed(1)
    critic = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 3, 1, 1),
                           nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(4 * 5 * 5, 1)).double()
    with torch.no_grad():
        critic[0].bias.zero_()
    zeros = torch.zeros(2, 1, 5, 5, dtype=torch.float64)
    gp, grads = assert_same_as_autograd(critic, zeros, zeros, rtol=1e-10)
    assert gp > 0 and grads["0.weight"].abs().max() > 0


def test_stargan_discriminator_reduced_resolution():
    # Paper channel widths (64 .. 2048, 93 M parameters) at 64x64 instead of 256x256.
    torch.manual_seed(0)
    critic = StarGANDiscriminator(image_size=64, n_classes=10)
    x_real, x_fake = torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)
    _, grads = assert_same_as_autograd(critic, x_real, x_fake, rtol=1e-4)
    assert grads["conv2.weight"].abs().max() == 0  # the classifier head is not penalised
    assert grads["main.0.bias"].abs().max() == 0  # biases do not change the input gradient


def test_weight_gradient_slices_are_exact(monkeypatch):
    monkeypatch.setattr(gp_module, "_WEIGHT_GRAD_SLICE_BYTES", 256)
    torch.manual_seed(2)
    critic = nn.Sequential(nn.Conv2d(1, 12, 3, 2, 1), nn.LeakyReLU(0.01), nn.Flatten(),
                           nn.Linear(12 * 4 * 4, 7), nn.LeakyReLU(0.01), nn.Linear(7, 1)).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert_same_as_autograd(critic, x, torch.randn_like(x), rtol=1e-10)


def test_batch_slices_are_exact(monkeypatch):
    # Large convolutions run over batch slices to bound oneDNN's operand copies.
    monkeypatch.setattr(gp_module, "_BATCH_SLICE_BYTES", 64)
    torch.manual_seed(6)
    critic = nn.Sequential(nn.Conv2d(2, 5, 3, 2, 1), nn.LeakyReLU(0.01),
                           nn.ConvTranspose2d(5, 3, 4, 2, 1),
                           nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).double()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    assert_same_as_autograd(critic, x, torch.randn_like(x), rtol=1e-10)


def test_composes_with_the_rest_of_the_d_loss():
    torch.manual_seed(3)
    critic = PiecewiseLinearCritic(nn.Sequential(nn.Conv2d(1, 4, 4, 2, 1), nn.LeakyReLU(0.01)),
                                   nn.Sequential(nn.Conv2d(4, 1, 3, 1, 1, bias=False)))
    x_real, x_fake = (torch.randn(2, 1, 8, 8, dtype=torch.float64),
                      torch.randn(2, 1, 8, 8, dtype=torch.float64))
    critic.double()
    eps = torch.rand(2, dtype=torch.float64)
    totals = {}
    for mode in ("autograd", "lean"):
        critic.zero_grad(set_to_none=True)
        d_loss = -critic(x_real).mean() + critic(x_fake).mean()
        (d_loss + gradient_penalty(critic, x_real, x_fake, eps=eps, mode=mode)).backward()
        totals[mode] = [p.grad.clone() for p in critic.parameters()]
    for a, b in zip(totals["lean"], totals["autograd"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_frozen_layers_get_no_gradient():
    critic = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 1))
    critic[0].weight.requires_grad_(False)
    gradient_penalty(critic, torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6)).backward()
    assert critic[0].weight.grad is None and critic[3].weight.grad is not None


@pytest.mark.parametrize("layer", [nn.BatchNorm2d(3), nn.Dropout(0.1), nn.Tanh(), nn.Sigmoid(),
                                   nn.InstanceNorm2d(3)])
def test_unsupported_layers_raise_and_auto_falls_back(layer):
    critic = nn.Sequential(nn.Conv2d(1, 3, 3, 1, 1), layer, nn.Flatten(), nn.Linear(3 * 4 * 4, 1))
    x_real, x_fake = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    with pytest.raises(UnsupportedCriticError, match=type(layer).__name__):
        gradient_penalty(critic, x_real, x_fake, mode="lean")
    gp_module._warned_auto = False
    eps = torch.rand(2)
    critic.eval()  # deterministic dropout/batch norm so both calls see the same function
    with pytest.warns(UserWarning, match="falls back to autograd"):
        auto = gradient_penalty(critic, x_real, x_fake, eps=eps, mode="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per process
        gradient_penalty(critic, x_real, x_fake, eps=eps, mode="auto")
    torch.testing.assert_close(auto,
                               gradient_penalty(critic, x_real, x_fake, eps=eps, mode="autograd"))


def test_bad_arguments():
    critic = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="mode"):
        gradient_penalty(critic, x, x, mode="double")
    with pytest.raises(ValueError, match="same shape"):
        gradient_penalty(critic, x, x[:1])
    with pytest.raises(ValueError, match="one value per sample"):
        gradient_penalty(critic, x, x, eps=torch.rand(3))
    with pytest.raises(UnsupportedCriticError, match="gradient_penalty_layers"):
        gradient_penalty(nn.Module(), x, x)
    with pytest.raises(UnsupportedCriticError, match="padding_mode"):
        gradient_penalty(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), x, x)
    with pytest.raises(UnsupportedCriticError, match="no Conv2d"):
        gradient_penalty(nn.Sequential(nn.ReLU()), x, x)


def test_lazy_regularisation_schedule():
    torch.manual_seed(4)
    critic = nn.Sequential(nn.Conv2d(1, 2, 3, 1, 1), nn.LeakyReLU(0.2), nn.Flatten(),
                           nn.Linear(2 * 16, 1))
    x_real, x_fake = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    eps = torch.rand(2)
    lazy = GradientPenalty(weight=10.0, interval=3)
    values = [lazy(critic, x_real, x_fake, eps=eps).item() for _ in range(7)]
    full = gradient_penalty(critic, x_real, x_fake, eps=eps).item()
    assert values[1] == values[2] == values[4] == values[5] == 0.0
    for i in (0, 3, 6):
        assert values[i] == pytest.approx(3 * full, rel=1e-6)
    assert int(lazy.state_dict()["calls"]) == 7
    with pytest.raises(ValueError, match="interval"):
        GradientPenalty(interval=0)


def test_bf16_autocast_matches_autograd_loosely():
    torch.manual_seed(5)
    critic = nn.Sequential(nn.Conv2d(1, 8, 4, 2, 1), nn.LeakyReLU(0.01), nn.Conv2d(8, 8, 4, 2, 1),
                           nn.LeakyReLU(0.01), nn.Conv2d(8, 1, 3, 1, 1, bias=False))
    x_real, x_fake = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    eps = torch.rand(2)
    results = {}
    for mode in ("autograd", "lean"):
        critic.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gp = gradient_penalty(critic, x_real, x_fake, eps=eps, mode=mode)
        gp.float().backward()
        results[mode] = (gp.float(), critic[0].weight.grad.clone())
    torch.testing.assert_close(results["lean"][0], results["autograd"][0], rtol=5e-2, atol=0)
    g_lean, g_ref = results["lean"][1], results["autograd"][1]
    assert (g_lean - g_ref).abs().max() <= 0.1 * g_ref.abs().max()


def test_public_exports():
    assert vcfast.gradient_penalty is gradient_penalty


def test_gemm_weight_gradient_over_batch_slices_is_exact(monkeypatch):
    # Wide conv weights are built by GEMMs into their buffer, a batch slice at a time.
    monkeypatch.setattr(gp_module, "_WEIGHT_GRAD_SLICE_BYTES", 256)
    monkeypatch.setattr(gp_module, "_BATCH_SLICE_BYTES", 64)
    torch.manual_seed(7)
    critic = nn.Sequential(nn.Conv2d(2, 6, 3, 2, 1, dilation=1), nn.LeakyReLU(0.01),
                           nn.Conv2d(6, 4, 3, 1, 2, dilation=2), nn.LeakyReLU(0.2),
                           nn.Flatten(), nn.Linear(4 * 4 * 4, 1)).double()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    assert_same_as_autograd(critic, x, torch.randn_like(x), rtol=1e-10)
