// Declarations of the fused masked multi-group losses (CPU and, when built, CUDA) and the
// argument checks both share.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>
#include <vector>

namespace vcfast {

// Validates what every backend needs (shapes, dtypes, devices, groups summing to C,
// reduction code) and returns the column offsets of the groups, offsets[G] = C.
// `op` names the public function in the messages.
std::vector<int64_t> check_loss_args(const char* op, const at::Tensor& logits,
                                     const at::Tensor& targets, at::IntArrayRef groups,
                                     const std::optional<at::Tensor>& pos_weight,
                                     int64_t reduction);

// grad of the backward: [N, G] for reduction "none", one element otherwise; group_counts [G].
void check_loss_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& logits,
                              int64_t n_groups, int64_t reduction, const at::Tensor& group_counts);

// Loss dtype: float64 for float64 logits, else float32.
at::ScalarType loss_dtype_of(const at::Tensor& logits);

std::tuple<at::Tensor, at::Tensor> masked_multigroup_bce_cpu(
    const at::Tensor& logits, const at::Tensor& targets, at::IntArrayRef groups,
    const std::optional<at::Tensor>& pos_weight, int64_t reduction);

at::Tensor masked_multigroup_bce_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                              const at::Tensor& targets, at::IntArrayRef groups,
                                              const std::optional<at::Tensor>& pos_weight,
                                              int64_t reduction, const at::Tensor& group_counts);

std::tuple<at::Tensor, at::Tensor> masked_multigroup_softmax_ce_cpu(const at::Tensor& logits,
                                                                    const at::Tensor& targets,
                                                                    at::IntArrayRef groups,
                                                                    int64_t reduction);

at::Tensor masked_multigroup_softmax_ce_backward_cpu(const at::Tensor& grad,
                                                     const at::Tensor& logits,
                                                     const at::Tensor& targets,
                                                     at::IntArrayRef groups, int64_t reduction,
                                                     const at::Tensor& group_counts);

// Human-readable reason of a softmax group status (classification_math.h), for messages.
const char* softmax_status_reason(int32_t status);

}  // namespace vcfast
