// Host side of the CUDA masked multi-group losses: argument checks (shared with the CPU
// kernels), buffers, launches (classification_kernels.cu) and the error report.
// Compiled by the host C++ compiler (not nvcc) because it needs the torch headers.
//
// Target validation happens inside the forward kernel; reporting it as a ValueError needs
// one device-to-host read of the first offending index, i.e. one synchronisation per
// forward call. That is the price of the contract (bad labels raise), paid once per loss.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/classification_cpu.h"
#include "cuda/classification_kernels.h"
#include "vcfast/classification_math.h"

namespace vcfast {
namespace {

constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();

int logits_code(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return kLogitsF32;
    case at::kDouble: return kLogitsF64;
    case at::kHalf: return kLogitsF16;
    default: return kLogitsBF16;  // check_loss_args admitted only these four
  }
}

int targets_code(at::ScalarType st) {
  switch (st) {
    case at::kChar: return kTargetsI8;
    case at::kShort: return kTargetsI16;
    case at::kInt: return kTargetsI32;
    case at::kLong: return kTargetsI64;
    case at::kHalf: return kTargetsF16;
    case at::kBFloat16: return kTargetsBF16;
    case at::kFloat: return kTargetsF32;
    default: return kTargetsF64;
  }
}

// Group offsets on the device (G + 1 int64 values). The host copy is pinned and the upload
// asynchronous on the current stream: a copy from pageable memory would make the host wait
// for the GPU on every forward and backward. The pinned block comes from PyTorch's caching
// host allocator, which records the copy's stream and does not reuse the block before the
// copy has run, so it may go out of scope here.
at::Tensor device_offsets(const std::vector<int64_t>& offsets, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(offsets.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(offsets.begin(), offsets.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
}

std::string format_value(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

struct Prepared {
  at::Tensor logits, targets, pos_weight, offsets;
  LossShape shape;
  at::ScalarType loss_type;
};

Prepared prepare(const char* op, const at::Tensor& logits_in, const at::Tensor& targets_in,
                 at::IntArrayRef groups, const std::optional<at::Tensor>& pos_weight_in,
                 int64_t reduction) {
  const std::vector<int64_t> offsets =
      check_loss_args(op, logits_in, targets_in, groups, pos_weight_in, reduction);
  TORCH_CHECK_VALUE(logits_in.is_cuda(), op, ": the CUDA kernel needs CUDA tensors");
  Prepared p;
  p.logits = logits_in.contiguous();
  p.targets = targets_in.contiguous();
  p.loss_type = loss_dtype_of(p.logits);
  if (pos_weight_in.has_value()) p.pos_weight = pos_weight_in->to(p.loss_type).contiguous();
  p.offsets = device_offsets(offsets, p.logits.device());
  p.shape = LossShape{p.logits.size(0), p.logits.size(1), static_cast<int64_t>(groups.size()),
                      p.offsets.data_ptr<int64_t>()};
  return p;
}

// The weights of dL/dS: grad itself (any strides) for "none", else [G] per-group values.
at::Tensor backward_weights(const at::Tensor& grad, const at::Tensor& counts, int64_t reduction,
                            at::ScalarType loss_type, LossWeights* out, cudaStream_t stream) {
  if (reduction == kReduceNone) {
    *out = LossWeights{grad.data_ptr(), grad.stride(0), grad.stride(1)};
    return grad;
  }
  at::Tensor weights = at::empty({counts.numel()}, counts.options());
  launch_loss_weights(grad.data_ptr(), counts.data_ptr(), loss_type == at::kDouble,
                      counts.numel(), reduction, weights.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  *out = LossWeights{weights.data_ptr(), 0, 1};
  return weights;
}

// Runs `launch_fwd(s, k, first_error)` and reduces the partials to (loss, group_counts).
template <typename F>
std::tuple<at::Tensor, at::Tensor> forward_common(const Prepared& p, int64_t reduction,
                                                  cudaStream_t stream, at::Tensor* first_error,
                                                  F&& launch_fwd) {
  const at::TensorOptions options = p.logits.options().dtype(p.loss_type);
  const int64_t n_rows = p.shape.n_rows, n_groups = p.shape.n_groups;
  at::Tensor s = at::empty({n_rows, n_groups}, options);  // the loss itself for "none"
  at::Tensor k = at::empty({n_rows, n_groups}, options.dtype(at::kInt));
  *first_error = at::full({1}, kNoError, options.dtype(at::kLong));
  launch_fwd(s.data_ptr(), k.data_ptr<int32_t>(), first_error->data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor counts = at::empty({n_groups}, options);
  at::Tensor loss = reduction == kReduceNone ? s : at::empty({}, options);
  launch_loss_finish(s.data_ptr(), k.data_ptr<int32_t>(), p.loss_type == at::kDouble, n_rows,
                     n_groups, reduction, counts.data_ptr(), loss.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // int64, as every backend returns them (one output schema for the C++ and Triton ops); the
  // finishing kernel writes the loss dtype, and [G] elements convert on the stream, no sync.
  return {loss, counts.to(at::kLong)};
}

std::tuple<at::Tensor, at::Tensor> masked_multigroup_bce_cuda(
    const at::Tensor& logits, const at::Tensor& targets, at::IntArrayRef groups,
    const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  constexpr const char* kOp = "vcfast.masked_multigroup_bce";
  const c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(kOp, logits, targets, groups, pos_weight, reduction);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor first_error;
  auto result = forward_common(p, reduction, stream, &first_error, [&](void* s, int32_t* k,
                                                                       int64_t* err) {
    launch_bce_fwd(p.logits.data_ptr(), logits_code(p.logits.scalar_type()), p.targets.data_ptr(),
                   targets_code(p.targets.scalar_type()),
                   p.pos_weight.defined() ? p.pos_weight.data_ptr() : nullptr, p.shape, s, k, err,
                   stream);
  });
  const int64_t bad = first_error.item<int64_t>();
  if (bad != kNoError) {
    const int64_t row = bad / p.shape.n_cols, col = bad % p.shape.n_cols;
    const double value = p.targets[row][col].item<double>();
    TORCH_CHECK_VALUE(false, kOp, ": `targets` must hold only -1 (unknown), 0 or 1; found ",
                      format_value(value), " at sample ", row, ", column ", col);
  }
  return result;
}

at::Tensor masked_multigroup_bce_backward_cuda(const at::Tensor& grad_in, const at::Tensor& logits,
                                               const at::Tensor& targets, at::IntArrayRef groups,
                                               const std::optional<at::Tensor>& pos_weight,
                                               int64_t reduction,
                                               const at::Tensor& group_counts) {
  constexpr const char* kOp = "vcfast.masked_multigroup_bce_backward";
  const c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(kOp, logits, targets, groups, pos_weight, reduction);
  check_loss_backward_args(kOp, grad_in, logits, p.shape.n_groups, reduction, group_counts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor grad = grad_in.to(p.loss_type);
  const at::Tensor counts = group_counts.to(p.loss_type).contiguous();
  LossWeights weights{};
  const at::Tensor keep_alive = backward_weights(grad, counts, reduction, p.loss_type, &weights,
                                                 stream);
  at::Tensor grad_logits = at::empty_like(p.logits);
  launch_bce_bwd(p.logits.data_ptr(), logits_code(p.logits.scalar_type()), p.targets.data_ptr(),
                 targets_code(p.targets.scalar_type()),
                 p.pos_weight.defined() ? p.pos_weight.data_ptr() : nullptr, p.shape, weights,
                 grad_logits.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_logits;
}

std::tuple<at::Tensor, at::Tensor> masked_multigroup_softmax_ce_cuda(const at::Tensor& logits,
                                                                     const at::Tensor& targets,
                                                                     at::IntArrayRef groups,
                                                                     int64_t reduction) {
  constexpr const char* kOp = "vcfast.masked_multigroup_softmax_ce";
  const c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(kOp, logits, targets, groups, std::nullopt, reduction);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor first_error;
  auto result = forward_common(p, reduction, stream, &first_error, [&](void* s, int32_t* k,
                                                                       int64_t* err) {
    launch_softmax_fwd(p.logits.data_ptr(), logits_code(p.logits.scalar_type()),
                       p.targets.data_ptr(), targets_code(p.targets.scalar_type()), p.shape, s, k,
                       err, stream);
  });
  const int64_t bad = first_error.item<int64_t>();
  if (bad != kNoError) {
    // Classify the offending group again on the host (a few values) to name the reason.
    const int64_t row = bad / p.shape.n_groups, g = bad % p.shape.n_groups;
    int64_t off = 0;
    for (int64_t i = 0; i < g; ++i) off += groups[i];
    const int64_t size = groups[g];
    const at::Tensor t = p.targets[row].narrow(0, off, size).to(at::kCPU, at::kDouble);
    const double* tv = t.data_ptr<double>();
    int64_t n_unknown = 0, n_pos = 0, n_bad = 0;
    std::string bad_value;
    for (int64_t j = 0; j < size; ++j) {
      n_unknown += tv[j] == -1.0;
      n_pos += tv[j] == 1.0;
      if (target_is_bad(tv[j]) && n_bad++ == 0) {
        bad_value = " (found " + format_value(tv[j]) + " at column " + std::to_string(off + j) + ")";
      }
    }
    const int32_t status = softmax_group_status(size, n_unknown, n_pos, n_bad);
    TORCH_CHECK_VALUE(false, kOp, ": `targets` of sample ", row, ", group ", g, " (columns ", off,
                      "..", off + size - 1, ") ", softmax_status_reason(status), bad_value);
  }
  return result;
}

at::Tensor masked_multigroup_softmax_ce_backward_cuda(const at::Tensor& grad_in,
                                                      const at::Tensor& logits,
                                                      const at::Tensor& targets,
                                                      at::IntArrayRef groups, int64_t reduction,
                                                      const at::Tensor& group_counts) {
  constexpr const char* kOp = "vcfast.masked_multigroup_softmax_ce_backward";
  const c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(kOp, logits, targets, groups, std::nullopt, reduction);
  check_loss_backward_args(kOp, grad_in, logits, p.shape.n_groups, reduction, group_counts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor grad = grad_in.to(p.loss_type);
  const at::Tensor counts = group_counts.to(p.loss_type).contiguous();
  LossWeights weights{};
  const at::Tensor keep_alive = backward_weights(grad, counts, reduction, p.loss_type, &weights,
                                                 stream);
  at::Tensor grad_logits = at::empty_like(p.logits);
  launch_softmax_bwd(p.logits.data_ptr(), logits_code(p.logits.scalar_type()),
                     p.targets.data_ptr(), targets_code(p.targets.scalar_type()), p.shape,
                     weights, grad_logits.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_logits;
}

}  // namespace
}  // namespace vcfast

TORCH_LIBRARY_IMPL(vcfast, CUDA, m) {
  m.impl("masked_multigroup_bce", &vcfast::masked_multigroup_bce_cuda);
  m.impl("masked_multigroup_bce_backward", &vcfast::masked_multigroup_bce_backward_cuda);
  m.impl("masked_multigroup_softmax_ce", &vcfast::masked_multigroup_softmax_ce_cuda);
  m.impl("masked_multigroup_softmax_ce_backward",
         &vcfast::masked_multigroup_softmax_ce_backward_cuda);
}
