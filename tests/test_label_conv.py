"""LabelConcatConv2d against nn.Conv2d on cat(x, tile(c)); label-table kernels against
references."""

import itertools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vcfast import _extension
from vcfast.nn.label_conv import LabelConcatConv2d
from vcfast.ops import label_conv as lc

needs_kernels = pytest.mark.skipif(not (_extension.has_op("label_table_add")
                                        and _extension.has_op("label_table_grad")),
                                   reason="vcfast._C without the label-table kernels (rebuild)")


def _triton_ok():
    if not _extension.backends()["triton"]:
        return False
    from vcfast.ops import label_conv_triton

    return label_conv_triton.TRITON_IMPORT_ERROR is None


needs_triton = pytest.mark.skipif(not _triton_ok(), reason="Triton not runnable here")


def _tiled_reference(conv: nn.Conv2d, x, c):
    tile = c[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
    return conv(torch.cat([x, tile], dim=1))


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


def _compare(cx, cc, o, k, s, p, h, w, batch, dtype, bias=True, atol=1e-10, rtol=1e-10):
    torch.manual_seed(0)
    conv = nn.Conv2d(cx + cc, o, k, stride=s, padding=p, bias=bias).to(dtype)
    mod = LabelConcatConv2d.from_conv(conv, cc)
    x = torch.randn(batch, cx, h, w, dtype=dtype, requires_grad=True)
    c = torch.randn(batch, cc, dtype=dtype, requires_grad=True)
    params = [conv.weight] + ([conv.bias] if bias else [])
    ref = _tiled_reference(conv, x, c)
    out = mod(x, c)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for a, b in zip(_grads(out, [x, c] + params), _grads(ref, [x, c] + params)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("k,s,p", list(itertools.product([1, 3, 4, 7], [1, 2], [0, 1, 3])))
def test_exact_vs_tiled_conv_float64(k, s, p):
    h, w = 9, 11
    if h + 2 * p < k:
        pytest.skip("kernel larger than padded input")
    _compare(cx=2, cc=3, o=4, k=k, s=s, p=p, h=h, w=w, batch=1, dtype=torch.float64)


@pytest.mark.parametrize("k,s,p,hw", [((3, 5), (1, 2), (2, 1), (7, 13)),
                                      ((4, 4), 2, (1, 3), (5, 6)),
                                      (2, 3, 4, (3, 3)), (5, 1, 0, (5, 8))])
def test_exact_pairs_and_edge_cases_float64(k, s, p, hw):
    # asymmetric kernels/strides/paddings; padding >= kernel (rows with no valid tap)
    _compare(cx=1, cc=4, o=3, k=k, s=s, p=p, h=hw[0], w=hw[1], batch=2, dtype=torch.float64)


def test_no_bias_and_batch_float64():
    _compare(cx=3, cc=5, o=2, k=3, s=1, p=1, h=6, w=5, batch=3, dtype=torch.float64, bias=False)


def test_float32_tolerance():
    _compare(cx=2, cc=17, o=8, k=4, s=2, p=1, h=15, w=16, batch=2, dtype=torch.float32,
             atol=1e-4, rtol=1e-4)


def test_paper_first_layer_scaled_down():
    # The paper-size stem (docs/models.md#generator): 1 + 1479 label channels, 7x7 s1 p3 -> 64, no
    # bias; small spatial size
    _compare(cx=1, cc=1479, o=64, k=7, s=1, p=3, h=9, w=10, batch=2, dtype=torch.float64,
             bias=False)
    _compare(cx=1, cc=1479, o=64, k=7, s=1, p=3, h=9, w=10, batch=1, dtype=torch.float32,
             bias=False, atol=1e-4, rtol=1e-4)


def test_state_dict_interchangeable():
    torch.manual_seed(1)
    conv = nn.Conv2d(3 + 6, 5, 3, stride=2, padding=1)
    mod = LabelConcatConv2d(3, 6, 5, 3, stride=2, padding=1)
    assert set(mod.state_dict()) == {"weight", "bias"}
    assert mod.weight.shape == conv.weight.shape
    mod.load_state_dict(conv.state_dict())
    x, c = torch.randn(2, 3, 8, 7), torch.randn(2, 6)
    torch.testing.assert_close(mod(x, c), _tiled_reference(conv, x, c), atol=1e-5, rtol=1e-5)
    conv2 = nn.Conv2d(9, 5, 3, stride=2, padding=1)
    conv2.load_state_dict(mod.state_dict())
    torch.testing.assert_close(conv2(torch.cat([x, c[:, :, None, None].expand(-1, -1, 8, 7)], 1)),
                               mod(x, c), atol=1e-5, rtol=1e-5)


def test_from_conv_shares_parameters():
    conv = nn.Conv2d(4, 2, 3, padding=1)
    mod = LabelConcatConv2d.from_conv(conv, 3)
    assert mod.weight is conv.weight and mod.bias is conv.bias
    assert mod.in_channels == 1 and mod.label_channels == 3
    assert [n for n, _ in mod.named_parameters()] == ["weight", "bias"]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="dilation"):
        LabelConcatConv2d(1, 2, 3, 3, dilation=2)
    with pytest.raises(ValueError, match="groups"):
        LabelConcatConv2d(2, 2, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        LabelConcatConv2d(1, 2, 3, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="dilation"):
        LabelConcatConv2d.from_conv(nn.Conv2d(3, 2, 3, dilation=2), 2)
    with pytest.raises(ValueError, match="groups"):
        LabelConcatConv2d.from_conv(nn.Conv2d(4, 2, 3, groups=2), 2)
    mod = LabelConcatConv2d(1, 2, 3, 3, padding=1)
    x = torch.randn(2, 1, 5, 5)
    with pytest.raises(ValueError, match="c must be"):
        mod(x, torch.randn(2, 3))
    with pytest.raises(ValueError, match="c must be"):
        mod(x, torch.randn(2, 2, 1))
    with pytest.raises(ValueError, match="batch"):
        mod(x, torch.randn(3, 2))
    with pytest.raises(ValueError, match="x must be"):
        mod(torch.randn(2, 2, 5, 5), torch.randn(2, 2))


def test_tap_patterns():
    ids, ind = lc.tap_patterns(9, 7, 1, 3)
    assert ids.shape == (9,) and ind.shape[1] == 7
    assert ind.shape[0] == 7  # 3 top border + interior + 3 bottom border
    assert ind[ids[4]].all()
    for i in range(9):
        expect = [0 <= i - 3 + k < 9 for k in range(7)]
        assert ind[ids[i]].tolist() == expect


def _table_inputs(dtype, b=2, o=3, h=7, w=9, r=4, s=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(b, o, h, w, generator=g).to(dtype)
    table = torch.randn(b, o, r, s, generator=g).to(dtype)
    row_ids = torch.randint(0, r, (h,), generator=g)
    col_ids = torch.randint(0, s, (w,), generator=g)
    return conv, table, row_ids, col_ids


def test_reference_grad_matches_autograd():
    conv, table, row_ids, col_ids = _table_inputs(torch.float64)
    table.requires_grad_(True)
    out = lc.label_table_add_reference(conv, table, row_ids, col_ids)
    g = torch.randn_like(out)
    (gt,) = torch.autograd.grad(out, table, g)
    torch.testing.assert_close(lc.label_table_grad_reference(g, row_ids, col_ids, 4, 5), gt)


_TOL = {torch.float64: {}, torch.float32: {}, torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
        torch.float16: dict(atol=2e-3, rtol=2e-3)}


@needs_kernels
@pytest.mark.parametrize("dtype", list(_TOL))
def test_cpu_kernels_match_reference(dtype):
    conv, table, row_ids, col_ids = _table_inputs(dtype)
    out = torch.ops.vcfast.label_table_add(conv, table, row_ids, col_ids)
    assert torch.equal(out, lc.label_table_add_reference(conv, table, row_ids, col_ids))
    grad = torch.ops.vcfast.label_table_grad(conv, row_ids, col_ids, 4, 5)
    torch.testing.assert_close(grad, lc.label_table_grad_reference(conv, row_ids, col_ids, 4, 5),
                               **_TOL[dtype])
    # non-contiguous inputs
    nc = conv.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(torch.ops.vcfast.label_table_add(nc, table, row_ids, col_ids), out)


@needs_kernels
def test_cpu_kernels_reject_bad_indices():
    conv, table, row_ids, col_ids = _table_inputs(torch.float32)
    with pytest.raises(IndexError):
        torch.ops.vcfast.label_table_add(conv, table, row_ids + 10, col_ids)
    with pytest.raises(ValueError):
        torch.ops.vcfast.label_table_add(conv, table, row_ids[:-1], col_ids)
    with pytest.raises(TypeError):
        torch.ops.vcfast.label_table_grad(conv, row_ids.int(), col_ids, 4, 5)


@needs_kernels
def test_opcheck_cpu_ops():
    conv, table, row_ids, col_ids = _table_inputs(torch.float64)
    torch.library.opcheck(torch.ops.vcfast.label_table_add.default,
                          (conv.requires_grad_(), table.requires_grad_(), row_ids, col_ids))
    torch.library.opcheck(torch.ops.vcfast.label_table_grad.default,
                          (conv.detach(), row_ids, col_ids, 4, 5))


@needs_kernels
def test_module_uses_kernel_and_gradcheck():
    conv = nn.Conv2d(2 + 3, 2, 3, stride=2, padding=1).double()
    mod = LabelConcatConv2d.from_conv(conv, 3)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, c: mod(x, c), (x, c))


class _LargestAllocation(TorchDispatchMode):
    """Largest numel among tensors produced with fresh storage (views of existing storage
    skipped)."""

    def __init__(self, known):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.known:
                    self.known.add(ptr)
                    self.sizes.append((t.untyped_storage().nbytes() // t.element_size(), str(func)))
        return out


def test_never_materialises_the_tile():
    # paper shape (1 + 1479 label channels, 7x7 s1 p3 -> 64) at 32x32, forward and backward
    b, cx, cc, h, w = 2, 1, 1479, 32, 32
    conv = nn.Conv2d(cx + cc, 64, 7, padding=3, bias=False)
    mod = LabelConcatConv2d.from_conv(conv, cc)
    x = torch.randn(b, cx, h, w, requires_grad=True)
    c = torch.randn(b, cc, requires_grad=True)
    tile = b * cc * h * w
    with _LargestAllocation([x, c, conv.weight]) as meter:
        out = mod(x, c)
    # forward: nothing large at all (not even a copy of the label slice of the weight)
    assert max(n for n, _ in meter.sizes) < tile / 4, sorted(meter.sizes)[-5:]
    with _LargestAllocation([x, c, conv.weight]) as meter:
        out.sum().backward()
    # backward: the weight gradient (and its label-slice part) are parameter-sized, as for
    # nn.Conv2d; everything else must stay far below the tiled label tensor.
    param_sized = {conv.weight.numel(), conv.weight[:, cx:].numel()}
    others = [n for n, _ in meter.sizes if n not in param_sized]
    assert max(others) < tile / 4, sorted(meter.sizes)[-5:]
    assert x.grad is not None and c.grad is not None and conv.weight.grad is not None
    # sanity: the meter does see the tile in the tiled formulation
    with _LargestAllocation([x, c, conv.weight]) as ref_meter:
        _tiled_reference(conv, x, c)
    assert max(n for n, _ in ref_meter.sizes) >= tile


@needs_triton
@pytest.mark.parametrize("dtype", list(_TOL))
def test_triton_kernels_match_reference(dtype):
    from vcfast.ops.label_conv_triton import label_table_add_triton, label_table_grad_triton

    conv, table, row_ids, col_ids = _table_inputs(dtype, h=9, w=150, r=7, s=7)
    out = label_table_add_triton(conv, table, row_ids, col_ids)
    assert torch.equal(out, lc.label_table_add_reference(conv, table, row_ids, col_ids))
    grad = label_table_grad_triton(conv, row_ids, col_ids, 7, 7)
    torch.testing.assert_close(grad, lc.label_table_grad_reference(conv, row_ids, col_ids, 7, 7),
                               **_TOL[dtype])


@needs_triton
def test_triton_autograd_and_opcheck():
    from vcfast.ops.label_conv_triton import label_table_add_triton

    conv, table, row_ids, col_ids = _table_inputs(torch.float64, b=1, o=2, h=3, w=4, r=2, s=3)
    conv.requires_grad_(True)
    table.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, t: label_table_add_triton(a, t, row_ids, col_ids),
                             (conv, table))
    torch.library.opcheck(torch.ops.vcfast.label_table_add_triton.default,
                          (conv, table, row_ids, col_ids))
    torch.library.opcheck(torch.ops.vcfast.label_table_grad_triton.default,
                          (conv.detach(), row_ids, col_ids, 2, 3))
