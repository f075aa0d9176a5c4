// Argument checks of the masked multi-group losses: the one place they are written, shared by
// the CPU kernels (csrc/cpu/classification_cpu.cpp) and the CUDA ones
// (csrc/cuda/classification_cuda.cpp), so `torch.ops.vcfast.*` called directly is as safe as the
// Python entry (vcfast/ops/classification.py), whose checks say the same.
#include <ATen/ATen.h>

#include <vector>

#include "cpu/classification_cpu.h"
#include "vcfast/classification_math.h"

namespace vcfast {

at::ScalarType loss_dtype_of(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<int64_t> check_loss_args(const char* op, const at::Tensor& logits,
                                     const at::Tensor& targets, at::IntArrayRef groups,
                                     const std::optional<at::Tensor>& pos_weight,
                                     int64_t reduction) {
  const auto lt = logits.scalar_type();
  TORCH_CHECK_TYPE(lt == at::kFloat || lt == at::kDouble || lt == at::kHalf || lt == at::kBFloat16,
                   op, ": `logits` must be float16, bfloat16, float32 or float64, got ", lt);
  const auto tt = targets.scalar_type();
  TORCH_CHECK_TYPE(tt == at::kChar || tt == at::kShort || tt == at::kInt || tt == at::kLong ||
                       tt == at::kHalf || tt == at::kBFloat16 || tt == at::kFloat ||
                       tt == at::kDouble,
                   op, ": `targets` must be int8/16/32/64 or a floating dtype holding -1, 0, 1 "
                   "(uint8 and bool cannot hold -1), got ", tt);
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": `logits` must be 2-D [N, C], got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(targets.sizes() == logits.sizes(), op, ": `targets` shape ", targets.sizes(),
                    " must equal `logits` shape ", logits.sizes());
  TORCH_CHECK_VALUE(targets.device() == logits.device(), op,
                    ": `targets` must be on `logits`' device ", logits.device(), ", got ",
                    targets.device());
  TORCH_CHECK_VALUE(!groups.empty(), op, ": `groups` must list at least one group size");
  std::vector<int64_t> offsets(groups.size() + 1, 0);
  for (size_t g = 0; g < groups.size(); ++g) {
    TORCH_CHECK_VALUE(groups[g] >= 1, op, ": every group size must be >= 1, got ", groups);
    offsets[g + 1] = offsets[g] + groups[g];
  }
  TORCH_CHECK_VALUE(offsets.back() == logits.size(1), op, ": `groups` ", groups, " sum to ",
                    offsets.back(), ", but logits have C=", logits.size(1), " columns");
  TORCH_CHECK_VALUE(reduction >= kReduceNone && reduction <= kReduceGroupMean, op,
                    ": reduction code must be 0 (none), 1 (sum), 2 (mean) or 3 (group_mean), got ",
                    reduction);
  if (pos_weight.has_value()) {
    const at::Tensor& pw = *pos_weight;
    TORCH_CHECK_TYPE(pw.is_floating_point(), op, ": `pos_weight` must be floating, got ",
                     pw.scalar_type());
    TORCH_CHECK_VALUE(pw.dim() == 1 && pw.size(0) == logits.size(1), op,
                      ": `pos_weight` must have shape [C]=[", logits.size(1), "], got ",
                      pw.sizes());
    TORCH_CHECK_VALUE(pw.device() == logits.device(), op,
                      ": `pos_weight` must be on `logits`' device ", logits.device(), ", got ",
                      pw.device());
  }
  return offsets;
}

void check_loss_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& logits,
                              int64_t n_groups, int64_t reduction,
                              const at::Tensor& group_counts) {
  if (reduction == kReduceNone) {
    TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == logits.size(0) &&
                          grad.size(1) == n_groups,
                      op, ": grad must have shape [N, G]=[", logits.size(0), ", ", n_groups,
                      "], got ", grad.sizes());
  } else {
    TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad of a reduced loss must have one element, got ",
                      grad.sizes());
  }
  TORCH_CHECK_VALUE(group_counts.dim() == 1 && group_counts.size(0) == n_groups, op,
                    ": group_counts must have shape [G]=[", n_groups, "], got ",
                    group_counts.sizes());
  TORCH_CHECK_VALUE(grad.device() == logits.device() && group_counts.device() == logits.device(),
                    op, ": grad and group_counts must be on `logits`' device");
}

const char* softmax_status_reason(int32_t status) {
  switch (status) {
    case kGroupBadValue: return "holds a value outside {-1, 0, 1}";
    case kGroupMixed: return "mixes -1 with 0/1 (a group is either known, one-hot, or all -1)";
    case kGroupNoPositive: return "has no positive (all 0; use -1 for an unknown group)";
    case kGroupTwoPositives: return "has two or more positives (a known group must be one-hot)";
    default: return "is valid";
  }
}

}  // namespace vcfast
