"""What every backend of the masked multi-group losses shares, defined once.

The reference and dispatch (vcfast.ops.classification), the Triton host code
(vcfast.ops.classification_triton) and the Triton kernels (vcfast.kernels.classification)
import these; the semantics are docs/ops.md#masked-multi-group-losses. The C++ kernels
(csrc/include/vcfast/classification_math.h, csrc/cpu/classification_cpu.cpp) use the same
reduction codes, softmax status codes and reasons.

Only torch is imported here: the Triton kernel module imports the status codes without
pulling in the op modules.
"""

from __future__ import annotations

import torch

__all__ = [
    "LOGIT_DTYPES",
    "REDUCTIONS",
    "SECOND_DERIVATIVE_ERROR",
    "SOFTMAX_REASONS",
    "STATUS_BAD_VALUE",
    "STATUS_MIXED",
    "STATUS_NO_POSITIVE",
    "STATUS_OK",
    "STATUS_TWO_POSITIVES",
    "STATUS_UNKNOWN",
    "TARGET_DTYPES",
    "bad_group_message",
    "bad_target_message",
    "check_args",
    "group_sizes",
    "loss_dtype",
    "reduce",
]

# Codes of the registered ops' `reduction` argument.
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2, "group_mean": 3}
LOGIT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
TARGET_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                           torch.bfloat16, torch.float32, torch.float64})

# Softmax status of one (sample, group), the numbers of classification_math.h's kGroup* (the
# compiled C++ kernels are the fixed point). Codes >= STATUS_BAD_VALUE are errors; when several
# apply, the check order is bad value, unknown, mixed, no positive, two positives.
STATUS_OK = 0  # exactly one 1, the rest 0
STATUS_UNKNOWN = 1  # all -1: skipped (S = 0, K = 0)
STATUS_BAD_VALUE = 2  # a value outside {-1, 0, 1} (NaN included)
STATUS_MIXED = 3  # -1 mixed with 0/1
STATUS_NO_POSITIVE = 4  # all 0
STATUS_TWO_POSITIVES = 5  # two or more 1
# The reason of each error status; the C++ kernels use the same words.
SOFTMAX_REASONS = {
    STATUS_BAD_VALUE: "holds a value outside {-1, 0, 1}",
    STATUS_MIXED: "mixes -1 with 0/1 (a group is either known, one-hot, or all -1)",
    STATUS_NO_POSITIVE: "has no positive (all 0; use -1 for an unknown group)",
    STATUS_TWO_POSITIVES: "has two or more positives (a known group must be one-hot)",
}

SECOND_DERIVATIVE_ERROR = (
    "vcfast.masked_multigroup_bce / masked_multigroup_softmax_ce: second derivatives (a double "
    "backward, create_graph=True) are not implemented by the fused backends 'cpu', 'cuda' and "
    "'triton'; use backend='reference' where one is needed")


def bad_target_message(op: str, targets: torch.Tensor, sample: int) -> str:
    """The error for a sigmoid-CE target outside {-1, 0, 1} (NaN included): the first one of
    row ``sample``, by column. Every backend raises this wording (the C++ kernels too)."""
    row = targets[sample]
    j = int((~((row == -1) | (row == 0) | (row == 1))).nonzero()[0])
    return (f"{op}: `targets` must hold only -1 (unknown), 0 or 1; found {float(row[j]):g} at "
            f"sample {sample}, column {j}")


def bad_group_message(op: str, targets: torch.Tensor, sample: int, group: int,
                      sizes: tuple[int, ...], status: int) -> str:
    """The error for a softmax-CE group whose targets are not one-hot or all -1 (``status``
    >= STATUS_BAD_VALUE), naming the sample, the group, its columns and why."""
    off = sum(sizes[:group])
    found = ""
    if status == STATUS_BAD_VALUE:
        t = targets[sample, off:off + sizes[group]]
        j = int((~((t == -1) | (t == 0) | (t == 1))).nonzero()[0])
        found = f" (found {float(t[j]):g} at column {off + j})"
    return (f"{op}: `targets` of sample {sample}, group {group} (columns {off}.."
            f"{off + sizes[group] - 1}) {SOFTMAX_REASONS[status]}{found}")


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype of the loss and its partial sums: float64 for float64 logits, else float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def group_sizes(op: str, groups, n_cols) -> tuple[int, ...]:
    """Validates ``groups`` (sizes, or an object with ``.sizes``) against C = ``n_cols``."""
    sizes = getattr(groups, "sizes", groups)  # a LabelSpace-like object or a sequence
    if not isinstance(sizes, (list, tuple)):
        raise TypeError(f"{op}: `groups` must be a list/tuple of group sizes (ints), "
                        f"got {type(sizes).__name__}")
    if len(sizes) == 0:
        raise ValueError(f"{op}: `groups` must list at least one group size, got []")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, (int, torch.SymInt)):
            raise TypeError(f"{op}: `groups` must hold ints, got {sizes!r}")
        if size < 1:
            raise ValueError(f"{op}: every group size must be >= 1, got {list(sizes)}")
    total = sum(sizes)
    torch._check_value(total == n_cols,
                       lambda: f"{op}: `groups` {list(sizes)} sum to {total}, but `logits` have "
                               f"C={n_cols} columns (groups must sum to C)")
    return tuple(sizes)


def check_args(op: str, logits, targets, groups, pos_weight=None) -> tuple[int, ...]:
    """Validates shapes, dtypes, devices and groups; returns the group sizes as a tuple.

    Cheap: no pass over the data (the target values are checked by the kernels). Works on
    fake tensors and symbolic shapes too (the Triton ops' fake implementations call it).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: `logits` must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{op}: `targets` must be a torch.Tensor, got {type(targets).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{op}: `logits` must be a floating tensor (float16, bfloat16, float32 "
                        f"or float64), got {logits.dtype}")
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(f"{op}: `targets` must be int8/int16/int32/int64 or floating with values "
                        f"-1, 0, 1 (uint8 and bool cannot hold -1), got {targets.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"{op}: `logits` must be 2-D [N, C], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(f"{op}: `targets` shape {tuple(targets.shape)} must equal `logits` "
                         f"shape {tuple(logits.shape)} (logits and targets: the same shape)")
    if targets.device != logits.device:
        raise ValueError(f"{op}: `targets` is on {targets.device} but `logits` on "
                         f"{logits.device}; move them to one device")
    if pos_weight is not None:
        if not isinstance(pos_weight, torch.Tensor) or not pos_weight.is_floating_point():
            raise TypeError(f"{op}: `pos_weight` must be a floating tensor of shape [C] or None")
        if pos_weight.shape != logits.shape[1:]:
            raise ValueError(f"{op}: `pos_weight` must have shape [C]=[{logits.shape[1]}], got "
                             f"{tuple(pos_weight.shape)}")
        if pos_weight.device != logits.device:
            raise ValueError(f"{op}: `pos_weight` is on {pos_weight.device} but `logits` on "
                             f"{logits.device}")
    return group_sizes(op, groups, logits.shape[1])


def reduce(S: torch.Tensor, K: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, group_counts) from the [N, G] partials S (summed loss) and K (counts).

    ``code`` is a value of REDUCTIONS; ``group_counts`` = ``K.sum(0)`` (int64 for integer K).
    A few deterministic torch ops; never NaN where S is finite: S is 0 wherever K is, so an
    all-masked batch gives 0 ("mean" divides by at least 1, "group_mean" averages only the
    groups with a count).
    """
    counts = K.sum(0)
    if code == 0:
        return S, counts
    if code == 1:
        return S.sum(), counts
    if code == 2:
        return S.sum() / counts.sum().clamp(min=1).to(S.dtype), counts
    present = counts > 0
    per_group = S.sum(0) / counts.clamp(min=1).to(S.dtype)
    n_present = present.sum().clamp(min=1).to(S.dtype)
    return torch.where(present, per_group, 0.0).sum() / n_present, counts
