"""The lean gradient penalty keeps the autograd contract: its weight gradients reach autograd.

`.backward()`, `torch.autograd.grad`, `backward(inputs=)`, gradient accumulation, GradScaler,
`torch.compile(fullgraph=True)` of a whole D loss, wrapped critics (DataParallel, compiled
modules, DistributedDataParallel on 2 gloo processes) all give what the double-backward
reference (`mode="autograd"`) gives; what cannot work raises a clear error.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import vcfast
from vcfast.memory import LiveBytesTracker
from vcfast.models import StarGANDiscriminator
from vcfast.nn import PiecewiseLinearCritic
from vcfast.ops import gradient_penalty as gp_module
from vcfast.ops.gradient_penalty import gradient_penalty


def small_critic(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    critic = PiecewiseLinearCritic(
        nn.Sequential(
            nn.Conv2d(1, 4, 4, 2, 1),
            nn.LeakyReLU(0.01),
            nn.Conv2d(4, 8, 4, 2, 1),
            nn.LeakyReLU(0.2),
        ),
        nn.Sequential(nn.Conv2d(8, 1, 3, 1, 1, bias=False)),
    )
    return critic.to(dtype)


def batch(n=3, size=16, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(n, 1, size, size, generator=g, dtype=dtype),
        torch.rand(n, 1, size, size, generator=g, dtype=dtype),
        torch.rand(n, generator=g, dtype=dtype),
    )


def weights_of(critic):
    return [p for name, p in critic.named_parameters() if name.endswith("weight")]


def reference_grads(critic, x_real, x_fake, eps):
    gp = gradient_penalty(critic, x_real, x_fake, eps=eps, mode="autograd")
    return gp.detach(), torch.autograd.grad(gp, weights_of(critic))


def assert_grads_close(actual, expected, rtol=1e-10):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a is not None, "no gradient reached autograd"
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item())


# --- the three ways of asking autograd for gradients ------------------------------------------


def test_autograd_grad_gets_the_weight_gradients():
    critic = small_critic()
    x_real, x_fake, eps = batch()
    gp_ref, expected = reference_grads(critic, x_real, x_fake, eps)
    gp = gradient_penalty(critic, x_real, x_fake, eps=eps)
    grads = torch.autograd.grad(gp, weights_of(critic))
    torch.testing.assert_close(gp.detach(), gp_ref, rtol=1e-12, atol=0)
    assert_grads_close(grads, expected)
    assert all(p.grad is None for p in critic.parameters()), "autograd.grad must not write .grad"


def test_backward_and_backward_inputs_agree_with_autograd_grad():
    critic = small_critic()
    x_real, x_fake, eps = batch()
    _, expected = reference_grads(critic, x_real, x_fake, eps)
    weights = weights_of(critic)

    gradient_penalty(critic, x_real, x_fake, eps=eps).backward()
    assert_grads_close([w.grad for w in weights], expected)

    critic.zero_grad(set_to_none=True)
    # Only the middle layer: the pass still runs through the first layer to get there.
    gradient_penalty(critic, x_real, x_fake, eps=eps).backward(inputs=[weights[1]])
    assert weights[0].grad is None and weights[2].grad is None
    assert_grads_close([weights[1].grad], [expected[1]])


def test_biases_get_zero_or_no_gradient_as_with_autograd():
    critic = small_critic()
    x_real, x_fake, eps = batch()
    biases = [p for name, p in critic.named_parameters() if name.endswith("bias")]
    results = {}
    for mode in ("autograd", "lean"):
        gp = gradient_penalty(critic, x_real, x_fake, eps=eps, mode=mode)
        grads = torch.autograd.grad(gp, biases, allow_unused=True)
        results[mode] = [None if g is None else g.abs().max().item() for g in grads]
    assert results["lean"] == results["autograd"] == [0.0, 0.0]


def test_gradient_accumulation_over_calls():
    critic = small_critic()
    x_real, x_fake, eps = batch(n=4)
    _, whole = reference_grads(critic, x_real, x_fake, eps)
    for half in (slice(0, 2), slice(2, 4)):  # two micro-batches, each half of the mean
        (0.5 * gradient_penalty(critic, x_real[half], x_fake[half], eps=eps[half])).backward()
    assert_grads_close([w.grad for w in weights_of(critic)], whole)


def test_composes_with_the_d_loss_and_other_terms():
    critic = small_critic()
    x_real, x_fake, eps = batch()
    totals = {}
    for mode in ("autograd", "lean"):
        loss = (
            -critic(x_real).mean()
            + critic(x_fake).mean()
            + gradient_penalty(critic, x_real, x_fake, eps=eps, mode=mode)
        )
        totals[mode] = torch.autograd.grad(loss, list(critic.parameters()))
    assert_grads_close(totals["lean"], totals["autograd"])


def test_grad_scaler_scales_and_unscales_the_penalty():
    critic = small_critic(torch.float32)
    x_real, x_fake, eps = batch(dtype=torch.float32)
    _, expected = reference_grads(critic, x_real, x_fake, eps)
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(gradient_penalty(critic, x_real, x_fake, eps=eps)).backward()
    assert weights_of(critic)[0].grad.abs().max() > 100 * expected[0].abs().max()  # scaled
    scaler.unscale_(optimizer)
    assert_grads_close([w.grad for w in weights_of(critic)], expected, rtol=1e-5)


# --- what does not work says so --------------------------------------------------------------


def test_second_backward_raises_clearly():
    critic = small_critic()
    x_real, x_fake, eps = batch()
    gp = gradient_penalty(critic, x_real, x_fake, eps=eps)
    gp.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        gp.backward()
    gp = gradient_penalty(critic, x_real, x_fake, eps=eps)
    gp.backward()
    with pytest.raises(RuntimeError, match="second time"):
        gp.backward()


def test_double_backward_raises_clearly():
    critic = small_critic()
    x_real, x_fake, eps = batch()
    gp = gradient_penalty(critic, x_real, x_fake, eps=eps)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        torch.autograd.grad(gp, [weights_of(critic)[0]], create_graph=True)


def test_weights_changed_before_backward_raise():
    # An optimizer step between the penalty and its backward would silently use new weights.
    critic = small_critic()
    x_real, x_fake, eps = batch()
    gp = gradient_penalty(critic, x_real, x_fake, eps=eps)
    with torch.no_grad():
        weights_of(critic)[1].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        gp.backward()


def test_no_grad_and_inference_mode_and_frozen_critic():
    critic = small_critic()
    x_real, x_fake, eps = batch()
    expected = gradient_penalty(critic, x_real, x_fake, eps=eps, mode="autograd").detach()
    with torch.no_grad():
        value = gradient_penalty(critic, x_real, x_fake, eps=eps)
    assert value.grad_fn is None
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(
            gradient_penalty(critic, x_real, x_fake, eps=eps), expected, rtol=1e-12, atol=0
        )
    critic.requires_grad_(False)
    value = gradient_penalty(critic, x_real, x_fake, eps=eps)
    assert value.grad_fn is None and not value.requires_grad


def test_repeated_calls_are_bitwise_deterministic():
    critic = small_critic(torch.float32)
    x_real, x_fake, eps = batch(dtype=torch.float32)
    runs = []
    for _ in range(2):
        gp = gradient_penalty(critic, x_real, x_fake, eps=eps)
        runs.append((gp.detach(), torch.autograd.grad(gp, weights_of(critic))))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_non_contiguous_and_channels_last_inputs():
    critic = small_critic()
    x_real, x_fake, eps = batch(n=4)
    _, expected = reference_grads(critic, x_real[::2], x_fake[::2], eps[::2])
    gp = gradient_penalty(critic, x_real[::2], x_fake[::2], eps=eps[::2])  # strided batch
    assert_grads_close(torch.autograd.grad(gp, weights_of(critic)), expected)
    gp = gradient_penalty(
        critic,
        x_real[::2].to(memory_format=torch.channels_last),
        x_fake[::2].to(memory_format=torch.channels_last),
        eps=eps[::2],
    )
    assert_grads_close(torch.autograd.grad(gp, weights_of(critic)), expected)


# --- memory: one weight gradient at a time ----------------------------------------------------


def test_backward_holds_one_weight_gradient_at_a_time(monkeypatch):
    """Every finished weight gradient is accumulated before the next one is made.

    Two 4 MiB Linear weights and tiny activations, gradients built in 1 MiB slices: handing
    both gradients to autograd at the end would hold 8 MiB at once; layer by layer holds one
    plus a slice.
    """
    monkeypatch.setattr(gp_module, "_WEIGHT_GRAD_SLICE_BYTES", 2**20)
    torch.manual_seed(0)
    width = 1024
    critic = nn.Sequential(
        nn.Linear(width, width),
        nn.LeakyReLU(0.01),
        nn.Linear(width, width),
        nn.LeakyReLU(0.01),
        nn.Linear(width, 1),
    )
    for p in critic.parameters():
        p.grad = torch.zeros_like(p)  # persistent gradient buffers, as in a training loop
    x_real, x_fake = torch.randn(2, width), torch.randn(2, width)
    gp = gradient_penalty(critic, x_real, x_fake)
    one_weight = width * width * 4
    with LiveBytesTracker() as tracker:
        gp.backward()
    assert tracker.peak_allocated_bytes < 1.5 * one_weight, tracker.peak_allocated_bytes
    assert tracker.peak_allocated_bytes >= one_weight  # it did build a whole gradient


# --- torch.compile and torch.library ----------------------------------------------------------


def d_loss(critic, x_real, x_fake, eps):
    return (
        -critic(x_real).mean()
        + critic(x_fake).mean()
        + vcfast.gradient_penalty(critic, x_real, x_fake, eps=eps)
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_d_loss_matches_eager(backend):
    torch._dynamo.reset()
    critic = small_critic()
    x_real, x_fake, eps = batch()
    compiled = torch.compile(d_loss, fullgraph=True, backend=backend)
    loss = compiled(critic, x_real, x_fake, eps)
    grads = torch.autograd.grad(loss, list(critic.parameters()))
    eager = d_loss(critic, x_real, x_fake, eps)
    expected = torch.autograd.grad(eager, list(critic.parameters()))
    torch.testing.assert_close(loss.detach(), eager.detach(), rtol=1e-12, atol=1e-12)
    assert_grads_close(grads, expected)


def test_compiled_stargan_d_loss_with_fused_bce():
    torch._dynamo.reset()
    torch.manual_seed(0)
    critic = StarGANDiscriminator(image_size=32, conv_dim=4, repeat_num=3, n_classes=7)
    x_real, x_fake = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    eps = torch.rand(2)
    targets = torch.tensor([[1, 0, 0, 0, -1, 1, 0], [0, 0, 1, 0, 1, 0, -1]], dtype=torch.int8)

    def loss_fn(x_real, x_fake, eps):
        src_real, cls_real = critic(x_real)
        src_fake, _ = critic(x_fake)
        return (
            -src_real.mean()
            + src_fake.mean()
            + vcfast.masked_multigroup_bce(cls_real, targets, (4, 3))
            + vcfast.gradient_penalty(critic, x_real, x_fake, eps=eps)
        )

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    params = list(critic.parameters())
    got = torch.autograd.grad(compiled(x_real, x_fake, eps), params)
    expected = torch.autograd.grad(loss_fn(x_real, x_fake, eps), params)
    assert_grads_close(got, expected, rtol=1e-5)


def test_lean_gradient_penalty_op_opcheck():
    from vcfast.ops.gradient_penalty import _encode, _plan

    critic = nn.Sequential(
        nn.Conv2d(1, 3, 3, 2, 1), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(3 * 16, 1)
    )
    codes, slopes = _encode(_plan(list(critic)))
    x_hat = torch.rand(2, 1, 8, 8)
    weights = [critic[0].weight, critic[3].weight]
    biases = [critic[0].bias, critic[3].bias]
    torch.library.opcheck(
        torch.ops.vcfast.lean_gradient_penalty.default,
        (x_hat, weights, biases, [0, 1], codes, slopes, 1.0, 10.0),
    )


# --- wrapped critics ---------------------------------------------------------------------------


def test_data_parallel_and_compiled_modules_are_looked_through():
    critic = small_critic()
    x_real, x_fake, eps = batch()
    _, expected = reference_grads(critic, x_real, x_fake, eps)
    for wrapped in (nn.DataParallel(critic), torch.compile(critic)):
        if isinstance(wrapped, nn.DataParallel) and torch.cuda.is_available():
            continue  # with a GPU, DataParallel insists on a cuda:0 module: checked below
        gp = gradient_penalty(wrapped, x_real, x_fake, eps=eps)
        assert_grads_close(torch.autograd.grad(gp, weights_of(critic)), expected)
    if torch.cuda.is_available():
        on_gpu = copy.deepcopy(critic).cuda()
        gp = gradient_penalty(nn.DataParallel(on_gpu), x_real.cuda(), x_fake.cuda(),
                              eps=eps.cuda())
        got = torch.autograd.grad(gp, weights_of(on_gpu))
        assert_grads_close([g.cpu() for g in got], expected)


def _ddp_worker(rank, world, init_file, out_dir, find_unused):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        critic = small_critic()
        ddp = nn.parallel.DistributedDataParallel(critic, find_unused_parameters=find_unused)
        x_real, x_fake, eps = batch(n=4)
        mine = slice(2 * rank, 2 * rank + 2)
        results = {}
        if not find_unused:  # the penalty alone: its bracket prepares the reducer
            gradient_penalty(ddp, x_real[mine], x_fake[mine], eps=eps[mine]).backward()
            results["alone"] = [p.grad.clone() for p in weights_of(critic)]
            critic.zero_grad(set_to_none=True)
        loss = (
            -ddp(x_real[mine]).mean()
            + ddp(x_fake[mine]).mean()
            + gradient_penalty(ddp, x_real[mine], x_fake[mine], eps=eps[mine])
        )
        loss.backward()
        results["d_loss"] = [p.grad.clone() for p in critic.parameters()]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_averages_the_penalty_gradients(tmp_path, find_unused):
    """2 gloo processes, 2 samples each == one process's autograd penalty on all 4."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path), find_unused), nprocs=2)
    critic = small_critic()
    x_real, x_fake, eps = batch(n=4)
    _, expected_alone = reference_grads(critic, x_real, x_fake, eps)
    loss = (
        -critic(x_real).mean()
        + critic(x_fake).mean()
        + gradient_penalty(critic, x_real, x_fake, eps=eps, mode="autograd")
    )
    expected_loss = torch.autograd.grad(loss, list(critic.parameters()))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        if not find_unused:
            assert_grads_close(results["alone"], expected_alone)
        assert_grads_close(results["d_loss"], expected_loss)


# --- the module ---------------------------------------------------------------------------------


def test_gradient_penalty_module_compiles_with_interval_1_and_refuses_lazy_schedules():
    torch._dynamo.reset()
    from vcfast.nn import GradientPenalty

    critic = small_critic()
    x_real, x_fake, eps = batch()
    every_call = GradientPenalty(interval=1)
    compiled = torch.compile(
        lambda: every_call(critic, x_real, x_fake, eps=eps), fullgraph=True, backend="aot_eager"
    )
    got = torch.autograd.grad(compiled(), weights_of(critic))
    _, expected = reference_grads(critic, x_real, x_fake, eps)
    assert_grads_close(got, expected)
    assert int(every_call.calls) == 1
    lazy = GradientPenalty(interval=2)
    compiled_lazy = torch.compile(
        lambda: lazy(critic, x_real, x_fake, eps=eps), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(Exception, match="interval>1"):
        compiled_lazy()
