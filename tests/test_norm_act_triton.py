"""Tests of the lean IN -> ReLU -> conv units (vcfast.nn.norm_act) and their fused ops
(vcfast.ops.norm_act references, vcfast.ops.norm_act_triton / kernels/norm_act.py).

Exactness is checked in float64 against nn.InstanceNorm2d(affine=True,
track_running_stats=True) + nn.ReLU + nn.Conv2d / nn.ConvTranspose2d (tolerance 1e-12: same
math, different summation order). Triton kernels run in the interpreter on CPU tensors
(TRITON_INTERPRET=1, set by conftest.py without a GPU); they are
compared with the references: float64 to 1e-12, float32 to 1e-5, half types to one rounding
of the output dtype (assert_close's defaults).

The memory test counts the bytes autograd saves for backward (saved_tensors_hooks),
deduplicated by storage (ReLU and the next conv save the same tensor in the reference) and
excluding parameters and the chain's input (held by the caller either way).
"""

import copy

import pytest
import torch
from _triton_testing import interpreter_marker
from torch import nn

from vcfast.models.official import OfficialResidualBlock
from vcfast.nn.norm_act import (
    InstanceNormReLUConv2d,
    LeanResidualBlock,
    _conv_config,
    _NormReLUConvFn,
)
from vcfast.ops import norm_act as ops

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def _randomise_norm(norm, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=g, dtype=F64) + 1)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g, dtype=F64) * 0.5)
        if norm.running_mean is not None:
            norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=g, dtype=F64))
            norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=g, dtype=F64) + .5)


CONVS = {
    "conv3x3": lambda c, o: nn.Conv2d(c, o, 3, padding=1),
    "conv3x3_nobias": lambda c, o: nn.Conv2d(c, o, 3, padding=1, bias=False),
    "conv4x4_s2": lambda c, o: nn.Conv2d(c, o, 4, stride=2, padding=1),
    "conv1x1_groups": lambda c, o: nn.Conv2d(c, o, 1, groups=2, bias=False),
    "convT4x4_s2": lambda c, o: nn.ConvTranspose2d(c, o, 4, stride=2, padding=1, bias=False),
    "convT3x3_s2_op1": lambda c, o: nn.ConvTranspose2d(c, o, 3, stride=2, padding=1,
                                                       output_padding=1),
}
NORMS = {
    "affine_tracked": dict(affine=True, track_running_stats=True),
    "affine_untracked": dict(affine=True, track_running_stats=False),
    "plain": dict(affine=False, track_running_stats=False),
    "momentum_none": dict(affine=True, track_running_stats=True, momentum=None),
    "momentum_0.3_eps": dict(affine=True, track_running_stats=True, momentum=0.3, eps=1e-3),
}


def _make_pair(conv_name, norm_name, c=4, o=6, seed=0):
    torch.manual_seed(seed)
    norm = nn.InstanceNorm2d(c, **NORMS[norm_name]).to(F64)
    _randomise_norm(norm, seed)
    conv = CONVS[conv_name](c, o).to(F64)
    ref = nn.Sequential(copy.deepcopy(norm), nn.ReLU(), copy.deepcopy(conv))
    lean = InstanceNormReLUConv2d(norm, conv)
    return ref, lean


def _step(module, z, seed=1):
    z = z.detach().clone().requires_grad_(True)
    out = module(z)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(g)
    return out.detach(), z.grad


def _assert_same_state(ref, lean):
    ref_p = dict(ref.named_parameters())
    lean_p = dict(lean.named_parameters())
    key = {"0": "norm", "2": "conv"}
    for name, p in ref_p.items():
        mod, attr = name.split(".")
        q = lean_p[f"{key[mod]}.{attr}"]
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=f"grad of {name}")
    for name, b in ref.named_buffers():
        mod, attr = name.split(".")
        torch.testing.assert_close(dict(lean.named_buffers())[f"{key[mod]}.{attr}"], b, **TOL)


@pytest.mark.parametrize("norm_name", list(NORMS))
@pytest.mark.parametrize("conv_name", list(CONVS))
def test_matches_reference_train_then_eval(conv_name, norm_name):
    ref, lean = _make_pair(conv_name, norm_name)
    for step, train in enumerate([True, True, False]):
        ref.train(train)
        lean.train(train)
        z = torch.randn(3, 4, 6, 5, dtype=F64) * 2 + 0.3
        out_r, gz_r = _step(ref, z, seed=step)
        out_l, gz_l = _step(lean, z, seed=step)
        torch.testing.assert_close(out_l, out_r, **TOL)
        torch.testing.assert_close(gz_l, gz_r, **TOL)
        _assert_same_state(ref, lean)  # grads accumulate over the steps, running stats update
    # running stats really moved (where tracked with a momentum)
    norm = lean.norm
    if norm.track_running_stats and norm.momentum:
        assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))


def test_only_some_grads_required():
    ref, lean = _make_pair("conv3x3", "affine_tracked")
    for m in (ref, lean):
        for p in m.parameters():
            p.requires_grad_(False)
    ref[2].weight.requires_grad_(True)
    lean.conv.weight.requires_grad_(True)
    z = torch.randn(2, 4, 5, 5, dtype=F64)
    out_r = ref(z)
    out_l = lean(z)
    out_r.sum().backward()
    out_l.sum().backward()
    torch.testing.assert_close(lean.conv.weight.grad, ref[2].weight.grad, **TOL)
    assert lean.norm.weight.grad is None


def test_state_dict_keys_and_sizes():
    lean = InstanceNormReLUConv2d.from_sizes(8, 16, 3, padding=1, bias=False)
    assert set(lean.state_dict()) == {"norm.weight", "norm.bias", "norm.running_mean",
                                      "norm.running_var", "norm.num_batches_tracked",
                                      "conv.weight"}
    out = lean(torch.randn(2, 8, 5, 5))
    assert out.shape == (2, 16, 5, 5)


def test_rejects_unsupported():
    norm = nn.InstanceNorm2d(4, affine=True)
    with pytest.raises(NotImplementedError):
        InstanceNormReLUConv2d(norm, nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError):
        InstanceNormReLUConv2d(norm, nn.Linear(4, 4))
    lean = InstanceNormReLUConv2d(norm, nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError):
        lean(torch.randn(2, 4, 1, 1))  # one spatial element in train mode, like nn.InstanceNorm2d


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck(train):
    _, lean = _make_pair("conv3x3", "affine_tracked", c=2, o=3)
    norm, conv = lean.norm, lean.conv
    cfg = _conv_config(conv)

    def f(z, gamma, beta, w, b):
        # the statistics are recomputed from z on every evaluation (train), as in the module
        if train:
            mean, rstd, _ = ops.instance_norm_stats(z.detach(), norm.eps)
        else:
            mean = norm.running_mean.expand(z.shape[0], -1).contiguous()
            rstd = torch.rsqrt(norm.running_var + norm.eps).expand(z.shape[0], -1).contiguous()
        return _NormReLUConvFn.apply(z, mean, rstd, gamma, beta, w, b, cfg, train)

    z = torch.randn(2, 2, 3, 4, dtype=F64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_(True)
                   for p in (norm.weight, norm.bias, conv.weight, conv.bias))
    assert torch.autograd.gradcheck(f, (z, *params), eps=1e-6, atol=1e-7)


def _block_step(block, x, seed):
    x = x.detach().clone().requires_grad_(True)
    out = block(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                             dtype=out.dtype))
    return out.detach(), x.grad


@pytest.mark.parametrize("direction", ["official_to_lean", "lean_to_official", "shared"])
def test_residual_block_matches_official(direction):
    torch.manual_seed(0)
    official = OfficialResidualBlock(5, 5).to(F64)
    _randomise_norm(official.main[1], 1)
    _randomise_norm(official.main[4], 2)
    if direction == "official_to_lean":
        lean = LeanResidualBlock(5, 5).to(F64)
        lean.load_state_dict(official.state_dict())
    elif direction == "lean_to_official":
        lean = LeanResidualBlock(5, 5).to(F64)
        _randomise_norm(lean.main[1], 3)
        _randomise_norm(lean.main[4], 4)
        official.load_state_dict(lean.state_dict())
    else:
        lean = LeanResidualBlock.from_official(copy.deepcopy(official))
        official = copy.deepcopy(official)
    assert list(lean.state_dict()) == list(official.state_dict())
    for step, train in enumerate([True, True, False]):
        official.train(train)
        lean.train(train)
        x = torch.randn(2, 5, 6, 7, dtype=F64)
        out_o, gx_o = _block_step(official, x, step)
        out_l, gx_l = _block_step(lean, x, step)
        torch.testing.assert_close(out_l, out_o, **TOL)
        torch.testing.assert_close(gx_l, gx_o, **TOL)
        for (name, p), q in zip(official.named_parameters(), lean.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)
        for (name, b), c in zip(official.named_buffers(), lean.buffers()):
            torch.testing.assert_close(c, b, **TOL, msg=name)


# --- memory ------------------------------------------------------------------------------


def _saved_bytes(fn, exclude):
    """Bytes of distinct storages autograd saves while ``fn`` runs (``exclude``d ones skipped)."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def _chain(lean: bool, n_blocks: int = 2, c: int = 16):
    """conv -> [IN -> ReLU -> conv] * n_blocks, official layout or lean units (same params)."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(n_blocks + 1)]
    norms = [nn.InstanceNorm2d(c, affine=True, track_running_stats=True) for _ in range(n_blocks)]
    if lean:
        layers = [convs[0]] + [InstanceNormReLUConv2d(n, k) for n, k in zip(norms, convs[1:])]
    else:
        layers = [convs[0]]
        for n, k in zip(norms, convs[1:]):
            layers += [n, nn.ReLU(inplace=True), k]
    return nn.Sequential(*layers)


def test_lean_chain_saves_about_half():
    x = torch.randn(2, 16, 32, 32)
    ref, lean = _chain(False), _chain(True)
    ref_bytes, out_r = _saved_bytes(lambda: ref(x), [x, *ref.parameters()])
    lean_bytes, out_l = _saved_bytes(lambda: lean(x), [x, *lean.parameters()])
    torch.testing.assert_close(out_l, out_r, rtol=1e-5, atol=1e-5)
    act = x.numel() * x.element_size()
    # reference: z and a per block (2 activations); lean: z + [N, C] statistics
    assert ref_bytes >= 2 * 2 * act
    assert lean_bytes <= 0.55 * ref_bytes, (lean_bytes, ref_bytes)
    assert lean_bytes < 2 * act + 4096


def test_lean_residual_block_saves_one_activation_less():
    x = torch.randn(2, 16, 32, 32)
    official = OfficialResidualBlock(16, 16)
    lean = LeanResidualBlock.from_official(copy.deepcopy(official))
    ref_bytes, _ = _saved_bytes(lambda: official(x), [*official.parameters()])
    lean_bytes, _ = _saved_bytes(lambda: lean(x), [*lean.parameters()])
    act = x.numel() * x.element_size()
    # official: x, z1, a1, z2; lean: x, z1, z2 (+ small statistics)
    assert ref_bytes >= 4 * act
    assert lean_bytes <= 3 * act + 4096
    assert lean_bytes <= 0.76 * ref_bytes


# --- fused ops: Triton kernels vs references (interpreter) -----------------------------------

# The op module imports without triton (its kernels are then None), so only the Triton tests
# below skip, not the whole module.
import vcfast.ops.norm_act_triton as nat  # noqa: E402

_, needs_interpreter = interpreter_marker(nat, "norm_act")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
dtype_ids = [str(d).removeprefix("torch.") for d in DTYPES]
SHAPES = [(1, 1, 2, 1), (2, 3, 5, 7), (1, 2, 33, 40)]  # 33 * 40 > BLOCK: multi-block rows


def _inputs(shape, dtype, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5).to(dtype)
    grad_a = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    acc = ops.acc_dtype(z)
    c = shape[1]
    gamma = (torch.randn(c, generator=g, dtype=F64) + 1).to(acc) if affine else None
    beta = torch.randn(c, generator=g, dtype=F64).to(acc) if affine else None
    mean, rstd, _ = ops.instance_norm_stats(z, 1e-5)
    return z, grad_a, mean, rstd, gamma, beta


def _tol(dtype):
    return {torch.float64: dict(rtol=1e-12, atol=1e-12),
            torch.float32: dict(rtol=1e-5, atol=1e-5)}.get(dtype, {})


@needs_interpreter
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_triton_forward_matches_reference(shape, dtype, affine):
    z, _, mean, rstd, gamma, beta = _inputs(shape, dtype, affine=affine)
    got = nat.norm_relu_forward_triton(z, mean, rstd, gamma, beta)
    ref = ops.norm_relu_forward_reference(z, mean, rstd, gamma, beta)
    assert got.dtype == z.dtype and got.shape == z.shape
    torch.testing.assert_close(got, ref, **_tol(dtype))


@needs_interpreter
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_triton_backward_matches_reference(shape, dtype, affine, batch_stats):
    z, grad_a, mean, rstd, gamma, beta = _inputs(shape, dtype, affine=affine)
    got = nat.norm_relu_backward_triton(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    ref = ops.norm_relu_backward_reference(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    assert got[0].dtype == z.dtype
    torch.testing.assert_close(got[0], ref[0], **_tol(dtype))
    if affine:
        acc_tol = _tol(ops.acc_dtype(z))
        torch.testing.assert_close(got[1], ref[1], **acc_tol)
        torch.testing.assert_close(got[2], ref[2], **acc_tol)
    else:
        assert got[1] is None and got[2] is None


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_opcheck(dtype):
    z, grad_a, mean, rstd, gamma, beta = _inputs((2, 3, 4, 5), dtype)
    torch.library.opcheck(torch.ops.vcfast.norm_relu_forward_triton.default,
                          (z, mean, rstd, gamma, beta))
    for batch_stats in (True, False):
        torch.library.opcheck(torch.ops.vcfast.norm_relu_backward_triton.default,
                              (grad_a, z, mean, rstd, gamma, beta, batch_stats))


@needs_interpreter
def test_module_through_triton_ops(monkeypatch):
    """The lean unit's autograd function driving the Triton ops (as on CUDA) is still exact."""
    ref, lean = _make_pair("conv4x4_s2", "affine_tracked")
    monkeypatch.setattr(ops, "_use_triton", lambda t: True)
    for step, train in enumerate([True, False]):
        ref.train(train)
        lean.train(train)
        z = torch.randn(2, 4, 6, 6, dtype=F64)
        out_r, gz_r = _step(ref, z, seed=step)
        out_l, gz_l = _step(lean, z, seed=step)
        torch.testing.assert_close(out_l, out_r, **TOL)
        torch.testing.assert_close(gz_l, gz_r, **TOL)
        _assert_same_state(ref, lean)


def _special_inputs(dtype):
    """Inputs whose pre-activation y holds NaN (z NaN, beta NaN) and -0.0 (z == mean, gamma < 0,
    beta = -0.0), with statistics given rather than computed, so the rest stays finite."""
    z, grad_a, mean, rstd, gamma, beta = _inputs((2, 3, 4, 5), dtype)
    mean = torch.zeros_like(mean)
    gamma = gamma.clone()
    beta = beta.clone()
    z[0, 0, 1, 2] = float("nan")
    z[1, 1] = 0.0  # == mean: xhat = +0.0, times gamma < 0 is -0.0
    gamma[1] = -1.5
    beta[1] = -0.0
    beta[2] = float("nan")
    return z, grad_a, mean, rstd, gamma, beta


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_triton_forward_keeps_nan_and_signed_zero_like_torch_relu(dtype):
    z, _, mean, rstd, gamma, beta = _special_inputs(dtype)
    got = nat.norm_relu_forward_triton(z, mean, rstd, gamma, beta)
    ref = ops.norm_relu_forward_reference(z, mean, rstd, gamma, beta)
    assert got[0, 0, 1, 2].isnan() and got[:, 2].isnan().all()
    torch.testing.assert_close(got, ref, equal_nan=True, **_tol(dtype))
    assert torch.equal(got.signbit(), ref.signbit())  # relu(-0.0) is -0.0 in torch
    assert got[1, 1].signbit().all()


@needs_interpreter
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_triton_backward_masks_nan_like_the_reference(dtype, batch_stats):
    z, grad_a, mean, rstd, gamma, beta = _special_inputs(dtype)
    got = nat.norm_relu_backward_triton(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    ref = ops.norm_relu_backward_reference(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, equal_nan=True, **_tol(dtype))
    if not batch_stats:  # y NaN fails y > 0: no gradient flows there, as in the reference
        assert got[0][:, 2].eq(0).all() and got[0][0, 0, 1, 2] == 0
