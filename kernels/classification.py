"""Triton kernels of the two fused multi-group classification losses.

vcfast.ops.classification_triton launches them; the exact contract (element losses, masking,
one-hot rules, reductions) is docs/ops.md#masked-multi-group-losses, summarised in each
docstring.

Layout
------
``logits`` x and ``targets`` t are [N, C] with arbitrary strides (passed per tensor); the C
columns are split into G contiguous groups described by an int64 offsets tensor ``off``
[G + 1] (group g covers columns [off[g], off[g + 1])). Group sizes can differ by orders of
magnitude (e.g. 1421 and 2), so each program (one row) loops over the groups and, inside a
group, over BLOCK-wide chunks of its columns; BLOCK is a power of two picked by the host.

The forward kernels write per-(row, group) partials to contiguous [N, G] buffers:

    S[n, g]    float32 (float64 for float64 logits): summed loss of row n, group g
    K[n, g]    int32: number of valid entries (BCE) / 1 if the group is known (softmax)
    FLAG[n, g] int32: (BCE) the number of entries outside {-1, 0, 1} (NaN included), 0 when
               the targets are fine; (softmax) the group's status, a STATUS_* code of
               vcfast.ops._classification_common (the C++ kernels' kGroup* numbers), an
               error when >= STATUS_BAD_VALUE

and S is set to NaN wherever FLAG marks an error, so a violation is visible in the loss even
where the host cannot raise (torch.compile'd graphs). The host reduces S / K (tiny) with a few
deterministic torch ops and raises the ValueError from FLAG in eager mode.

The backward kernels take the per-(row, group) weight w = dL/dS[n, g] as a strided [N, G]
tensor (the host builds it from the reduction's upstream gradient) and write dL/dx into a
contiguous [N, C] buffer of the logits dtype, recomputing everything else from x and t
(nothing but the inputs is saved between forward and backward).

Numerics: targets of any integer or floating dtype are loaded and converted to the compute
dtype (float32, or float64 for float64 logits) in-kernel; logits are widened likewise; the
loss partials are summed lane-wise over the chunks and reduced once per group (a fixed
order: deterministic). log1p uses libdevice on GPUs and an accurate portable formula in the
interpreter (which has no libdevice). All address arithmetic is int64.
"""

import triton
import triton.language as tl

from vcfast.ops import _classification_common as _codes

try:  # the device math library (log1p); absent or unusable in the interpreter
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old / stripped Triton builds
    libdevice = None

# The softmax status codes written to FLAG, as constexprs (the host maps them to messages).
STATUS_OK = tl.constexpr(_codes.STATUS_OK)
STATUS_UNKNOWN = tl.constexpr(_codes.STATUS_UNKNOWN)
STATUS_BAD_VALUE = tl.constexpr(_codes.STATUS_BAD_VALUE)
STATUS_MIXED = tl.constexpr(_codes.STATUS_MIXED)
STATUS_NO_POSITIVE = tl.constexpr(_codes.STATUS_NO_POSITIVE)
STATUS_TWO_POSITIVES = tl.constexpr(_codes.STATUS_TWO_POSITIVES)


@triton.jit
def _to_compute(v, IS_FP64: tl.constexpr):
    if IS_FP64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _log1p_small(e, USE_LIBDEVICE: tl.constexpr):
    """log(1 + e) for e in [0, 1], accurate to a few ulp also for tiny e.

    GPUs use libdevice's log1p. The interpreter has no libdevice, so there the classic
    compensated form is used: u = 1 + e (rounded); log1p(e) = log(u) * e / (u - 1), or e
    when u == 1 (Goldberg; the rounding error of u cancels in the ratio).
    """
    if USE_LIBDEVICE:
        r = libdevice.log1p(e)
    else:
        u = 1.0 + e
        d = u - 1.0
        safe_d = tl.where(d == 0.0, 1.0, d)
        r = tl.where(d == 0.0, e, tl.log(u) * (e / safe_d))
    return r


@triton.jit
def _masked_bce_fwd_kernel(
    x_ptr, t_ptr, pw_ptr, off_ptr, s_ptr, k_ptr, flag_ptr,
    G, stride_xn, stride_xc, stride_tn, stride_tc, stride_pw,
    HAS_PW: tl.constexpr, IS_FP64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Masked multi-group sigmoid cross-entropy, forward; one program per row n.

    For each column j of group g (off[g] <= j < off[g+1]) with t = t[n, j] != -1 (valid),
    pw = pos_weight[j] (1 without pos_weight):
        c = 1 + (pw - 1) * t
        l = (1 - t) * x + c * (log1p(exp(-|x|)) + max(-x, 0))     (stable for |x| = 1e4)
    and
        S[n, g]    = sum of l over the valid j of group g        (0 if none)
        K[n, g]    = number of valid j of group g
        FLAG[n, g] = number of j with t not in {-1, 0, 1} (NaN counts); S = NaN if FLAG > 0.
    Entries with t == -1 are ignored entirely (a NaN logit there does not propagate).
    """
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    t_row = t_ptr + row * stride_tn
    for g in range(G):
        start = tl.load(off_ptr + g)
        end = tl.load(off_ptr + g + 1)
        if IS_FP64:
            acc_s = tl.zeros((BLOCK,), dtype=tl.float64)
        else:
            acc_s = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_k = tl.zeros((BLOCK,), dtype=tl.int32)
        acc_bad = tl.zeros((BLOCK,), dtype=tl.int32)
        for c0 in range(start, end, BLOCK):
            cols = c0 + lanes
            in_group = cols < end
            x = _to_compute(tl.load(x_row + cols * stride_xc, mask=in_group, other=0.0), IS_FP64)
            t = _to_compute(tl.load(t_row + cols * stride_tc, mask=in_group, other=-1), IS_FP64)
            valid = in_group & (t != -1.0)
            bad = valid & (t != 0.0) & (t != 1.0)
            if HAS_PW:
                pw = _to_compute(tl.load(pw_ptr + cols * stride_pw, mask=in_group, other=1.0),
                                 IS_FP64)
                c = 1.0 + (pw - 1.0) * t
            else:
                c = tl.full((BLOCK,), 1.0, x.dtype)
            e = tl.exp(-tl.abs(x))
            sp = _log1p_small(e, USE_LIBDEVICE) + tl.maximum(-x, 0.0)  # softplus(-x)
            loss = (1.0 - t) * x + c * sp
            acc_s += tl.where(valid, loss, 0.0)
            acc_k += valid.to(tl.int32)
            acc_bad += bad.to(tl.int32)
        s = tl.sum(acc_s, axis=0)
        n_bad = tl.sum(acc_bad, axis=0)
        s = tl.where(n_bad > 0, float("nan"), s)
        idx = row * G + g
        tl.store(s_ptr + idx, s)
        tl.store(k_ptr + idx, tl.sum(acc_k, axis=0))
        tl.store(flag_ptr + idx, n_bad)


@triton.jit
def _masked_bce_bwd_kernel(
    x_ptr, t_ptr, pw_ptr, off_ptr, w_ptr, gx_ptr,
    G, C, stride_xn, stride_xc, stride_tn, stride_tc, stride_pw, stride_wn, stride_wg,
    HAS_PW: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Masked multi-group sigmoid cross-entropy, backward; one program per row n.

    With w = w[n, g] the weight of group g (dL/dS[n, g], see the host code for each
    reduction), for every column j of group g:
        gx[n, j] = valid ? (c * sigmoid(x) - pw * t) * w : 0        (c, pw, valid as forward)
    sigmoid computed stably: e = exp(-|x|); x >= 0: 1 / (1 + e), else e / (1 + e).
    gx is a contiguous [N, C] buffer of the logits dtype; every column is written.
    """
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    t_row = t_ptr + row * stride_tn
    gx_row = gx_ptr + row * C
    for g in range(G):
        start = tl.load(off_ptr + g)
        end = tl.load(off_ptr + g + 1)
        w = _to_compute(tl.load(w_ptr + row * stride_wn + g * stride_wg), IS_FP64)
        for c0 in range(start, end, BLOCK):
            cols = c0 + lanes
            in_group = cols < end
            x = _to_compute(tl.load(x_row + cols * stride_xc, mask=in_group, other=0.0), IS_FP64)
            t = _to_compute(tl.load(t_row + cols * stride_tc, mask=in_group, other=-1), IS_FP64)
            valid = in_group & (t != -1.0)
            e = tl.exp(-tl.abs(x))
            sig = tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
            if HAS_PW:
                pw = _to_compute(tl.load(pw_ptr + cols * stride_pw, mask=in_group, other=1.0),
                                 IS_FP64)
                d = (1.0 + (pw - 1.0) * t) * sig - pw * t
            else:
                d = sig - t
            gx = tl.where(valid, d * w, 0.0)
            tl.store(gx_row + cols, gx.to(gx_ptr.dtype.element_ty), mask=in_group)


@triton.jit
def _group_logsumexp(x_row, t_row, start, end, lanes, stride_xc, stride_tc,
                     IS_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over a group's chunks: (logsumexp of x, sum of x where t == 1,
    #(t == 1), #(t == 0), #(t == -1), #(other t, NaN included)).

    Online logsumexp: per chunk, m' = max(m, max_chunk x), s = s * exp(m - m') + sum exp(x - m').
    """
    if IS_FP64:
        m_run = tl.full((), float("-inf"), tl.float64)
        s_run = tl.full((), 0.0, tl.float64)
        acc_x1 = tl.zeros((BLOCK,), dtype=tl.float64)
    else:
        m_run = tl.full((), float("-inf"), tl.float32)
        s_run = tl.full((), 0.0, tl.float32)
        acc_x1 = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_one = tl.zeros((BLOCK,), dtype=tl.int32)
    acc_zero = tl.zeros((BLOCK,), dtype=tl.int32)
    acc_neg = tl.zeros((BLOCK,), dtype=tl.int32)
    for c0 in range(start, end, BLOCK):
        cols = c0 + lanes
        in_group = cols < end
        x = _to_compute(tl.load(x_row + cols * stride_xc, mask=in_group, other=float("-inf")),
                        IS_FP64)
        t = _to_compute(tl.load(t_row + cols * stride_tc, mask=in_group, other=0), IS_FP64)
        m_new = tl.maximum(m_run, tl.max(x, axis=0))
        p = tl.where(in_group, tl.exp(x - m_new), 0.0)
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(p, axis=0)
        m_run = m_new
        is_one = in_group & (t == 1.0)
        acc_x1 += tl.where(is_one, x, 0.0)
        acc_one += is_one.to(tl.int32)
        acc_zero += (in_group & (t == 0.0)).to(tl.int32)
        acc_neg += (in_group & (t == -1.0)).to(tl.int32)
    n_one = tl.sum(acc_one, axis=0)
    n_zero = tl.sum(acc_zero, axis=0)
    n_neg = tl.sum(acc_neg, axis=0)
    n_other = (end - start) - n_one - n_zero - n_neg
    lse = m_run + tl.log(s_run)
    return lse, tl.sum(acc_x1, axis=0), n_one, n_zero, n_neg, n_other


@triton.jit
def _masked_softmax_ce_fwd_kernel(
    x_ptr, t_ptr, off_ptr, s_ptr, k_ptr, flag_ptr,
    G, stride_xn, stride_xc, stride_tn, stride_tc,
    IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Masked multi-group softmax cross-entropy, forward; one program per row n.

    For group g with columns J = [off[g], off[g+1]) of row n:
      * all t[n, J] == -1 (unknown):  S[n, g] = 0, K[n, g] = 0;
      * exactly one t == 1, all others 0 (one-hot, class k):
            S[n, g] = logsumexp(x[n, J]) - x[n, k],   K[n, g] = 1
        (logsumexp with an online max / sum-exp over the chunks);
      * anything else: FLAG[n, g] = STATUS_BAD_VALUE (a value outside {-1, 0, 1}, NaN
        included), STATUS_MIXED (mixes -1 with 0/1), STATUS_NO_POSITIVE or
        STATUS_TWO_POSITIVES, checked in that order; S[n, g] = NaN, K[n, g] = 0.
    FLAG[n, g] is STATUS_UNKNOWN for an unknown group and STATUS_OK for a one-hot one.
    """
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    t_row = t_ptr + row * stride_tn
    for g in range(G):
        start = tl.load(off_ptr + g)
        end = tl.load(off_ptr + g + 1)
        lse, x_pos, n_one, n_zero, n_neg, n_other = _group_logsumexp(
            x_row, t_row, start, end, lanes, stride_xc, stride_tc, IS_FP64, BLOCK)
        size = end - start
        flag = tl.where(n_other > 0, STATUS_BAD_VALUE,
                        tl.where(n_neg == size, STATUS_UNKNOWN,
                                 tl.where(n_neg > 0, STATUS_MIXED,
                                          tl.where(n_one == 0, STATUS_NO_POSITIVE,
                                                   tl.where(n_one >= 2, STATUS_TWO_POSITIVES,
                                                            STATUS_OK)))))
        known = flag == STATUS_OK
        s = tl.where(known, lse - x_pos, 0.0)
        s = tl.where(flag >= STATUS_BAD_VALUE, float("nan"), s)
        idx = row * G + g
        tl.store(s_ptr + idx, s)
        tl.store(k_ptr + idx, known.to(tl.int32))
        tl.store(flag_ptr + idx, flag.to(tl.int32))


@triton.jit
def _masked_softmax_ce_bwd_kernel(
    x_ptr, t_ptr, off_ptr, w_ptr, gx_ptr,
    G, C, stride_xn, stride_xc, stride_tn, stride_tc, stride_wn, stride_wg,
    IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Masked multi-group softmax cross-entropy, backward; one program per row n.

    Per group g (columns J): pass 1 recomputes lse = logsumexp(x[n, J]) and whether the
    group is known (not all -1); pass 2 writes, for j in J,
        gx[n, j] = known ? (exp(x[n, j] - lse) - (t[n, j] == 1)) * w[n, g] : 0
    (softmax minus one-hot, scaled by w = dL/dS[n, g]). gx is a contiguous [N, C] buffer of
    the logits dtype; every column is written. Targets were validated by the forward.
    """
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    t_row = t_ptr + row * stride_tn
    gx_row = gx_ptr + row * C
    for g in range(G):
        start = tl.load(off_ptr + g)
        end = tl.load(off_ptr + g + 1)
        w = _to_compute(tl.load(w_ptr + row * stride_wn + g * stride_wg), IS_FP64)
        lse, x_pos, n_one, n_zero, n_neg, n_other = _group_logsumexp(
            x_row, t_row, start, end, lanes, stride_xc, stride_tc, IS_FP64, BLOCK)
        known = n_neg < (end - start)
        for c0 in range(start, end, BLOCK):
            cols = c0 + lanes
            in_group = cols < end
            x = _to_compute(tl.load(x_row + cols * stride_xc, mask=in_group, other=0.0), IS_FP64)
            t = _to_compute(tl.load(t_row + cols * stride_tc, mask=in_group, other=0), IS_FP64)
            d = tl.exp(x - lse) - tl.where(t == 1.0, 1.0, 0.0)
            gx = tl.where(known, d * w, 0.0)
            tl.store(gx_row + cols, gx.to(gx_ptr.dtype.element_ty), mask=in_group)
