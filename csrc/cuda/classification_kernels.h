// Launchers of the CUDA masked multi-group losses (see classification_kernels.cu).
// Plain pointers, dtype codes and a stream only, so the .cu never includes torch headers.
//
// Pointers typed `void*` hold the logits' storage type (LogitsCode) or, for the per-group
// and loss buffers, the compute type: double for float64 logits, float otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace vcfast {

enum LogitsCode : int { kLogitsF32 = 0, kLogitsF64 = 1, kLogitsF16 = 2, kLogitsBF16 = 3 };
enum TargetsCode : int {
  kTargetsI8 = 0,
  kTargetsI16 = 1,
  kTargetsI32 = 2,
  kTargetsI64 = 3,
  kTargetsF16 = 4,
  kTargetsBF16 = 5,
  kTargetsF32 = 6,
  kTargetsF64 = 7,
};

// Shared geometry of one call: [n_rows, n_cols] inputs, groups given by device offsets
// (n_groups + 1 values, offsets[n_groups] == n_cols).
struct LossShape {
  int64_t n_rows;
  int64_t n_cols;
  int64_t n_groups;
  const int64_t* offsets;  // device
};

// Forward partials: s, k are [n_rows, n_groups]; *first_error (device, preset to INT64_MAX)
// is lowered to the first offending row * n_cols + column (BCE) or row * n_groups + group
// (softmax). pos_weight may be null.
void launch_bce_fwd(const void* logits, int logits_code, const void* targets, int targets_code,
                    const void* pos_weight, const LossShape& shape, void* s, int32_t* k,
                    int64_t* first_error, cudaStream_t stream);
void launch_softmax_fwd(const void* logits, int logits_code, const void* targets,
                        int targets_code, const LossShape& shape, void* s, int32_t* k,
                        int64_t* first_error, cudaStream_t stream);

// (loss, group_counts) from the partials, deterministic; loss is ignored for reduction 0.
void launch_loss_finish(const void* s, const int32_t* k, bool is_double, int64_t n_rows,
                        int64_t n_groups, int64_t reduction, void* group_counts, void* loss,
                        cudaStream_t stream);

// Per-group weights of dL/dS for reductions other than "none" (grad is the scalar dL/dloss).
void launch_loss_weights(const void* grad, const void* group_counts, bool is_double,
                         int64_t n_groups, int64_t reduction, void* weights, cudaStream_t stream);

// Backward: dL/dlogits [n_rows, n_cols] in the logits' dtype. With reduction "none" the
// weights are grad[row * grad_stride0 + g * grad_stride1], else weights[g].
struct LossWeights {
  const void* values;
  int64_t stride0;  // 0 for per-group weights
  int64_t stride1;
};
void launch_bce_bwd(const void* logits, int logits_code, const void* targets, int targets_code,
                    const void* pos_weight, const LossShape& shape, const LossWeights& weights,
                    void* grad_logits, cudaStream_t stream);
void launch_softmax_bwd(const void* logits, int logits_code, const void* targets,
                        int targets_code, const LossShape& shape, const LossWeights& weights,
                        void* grad_logits, cudaStream_t stream);

}  // namespace vcfast
