// CUDA kernels of the masked multi-group losses (math: vcfast/classification_math.h).
//
// One block per row of [N, C]: for each group the block's threads stride over its
// columns, then a fixed-shape block reduction (warp shuffles + shared memory) combines
// them, so results are deterministic. Forward writes the [N, G] partials S, K; a one-block
// kernel reduces them (again in a fixed order) to the loss and the [G] group counts.
// Target values are validated in the same pass: the first offending index is kept with
// an atomicMin, which is order-independent.
//
// Targets are read through a run-time dtype switch (uniform across the grid, so it costs
// no divergence) instead of one template instance per target dtype: that keeps the
// instances to 4 logits dtypes per kernel and this file's compile time short.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "vcfast/classification_math.h"
#include "classification_kernels.h"

namespace vcfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kNoError = INT64_MAX;

template <typename LT>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

struct TargetFlags {
  int32_t unknown;  // t == -1
  int32_t one;      // t == 1
  int32_t bad;      // not -1, 0 or 1 (NaN included)
};

template <typename V>
__device__ __forceinline__ TargetFlags flags_of(V v) {
  return TargetFlags{static_cast<int32_t>(v == V(-1)), static_cast<int32_t>(v == V(1)),
                     target_is_bad(v)};
}

// Compared in the target's own type (half types widened to float, which is exact).
__device__ __forceinline__ TargetFlags load_flags(const void* p, int code, int64_t i) {
  switch (code) {
    case kTargetsI8: return flags_of(static_cast<const int8_t*>(p)[i]);
    case kTargetsI16: return flags_of(static_cast<const int16_t*>(p)[i]);
    case kTargetsI32: return flags_of(static_cast<const int32_t*>(p)[i]);
    case kTargetsI64: return flags_of(static_cast<const int64_t*>(p)[i]);
    case kTargetsF16: return flags_of(__half2float(static_cast<const __half*>(p)[i]));
    case kTargetsBF16: return flags_of(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case kTargetsF32: return flags_of(static_cast<const float*>(p)[i]);
    default: return flags_of(static_cast<const double*>(p)[i]);
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  return v;
}

// Sum over the block; the result is valid in thread 0. `smem` holds kWarps values.
template <typename T>
__device__ T block_sum(T v, T* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the previous use of smem is finished
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = T(0);
  if (warp == 0) r = warp_sum(lane < kWarps ? smem[lane] : T(0));
  return r;
}

template <typename T>
__device__ MaxSumExp<T> block_max_sum_exp(MaxSumExp<T> v, T* smem_max, T* smem_sum) {
  for (int o = 16; o > 0; o >>= 1) {
    const MaxSumExp<T> other{__shfl_down_sync(kFullMask, v.max, o),
                             __shfl_down_sync(kFullMask, v.sum, o)};
    v = max_sum_exp_merge(v, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    smem_max[warp] = v.max;
    smem_sum[warp] = v.sum;
  }
  __syncthreads();
  MaxSumExp<T> r{-INFINITY, T(0)};
  if (warp == 0) {
    if (lane < kWarps) r = MaxSumExp<T>{smem_max[lane], smem_sum[lane]};
    for (int o = 16; o > 0; o >>= 1) {
      const MaxSumExp<T> other{__shfl_down_sync(kFullMask, r.max, o),
                               __shfl_down_sync(kFullMask, r.sum, o)};
      r = max_sum_exp_merge(r, other);
    }
  }
  return r;
}

__device__ __forceinline__ void record_error(int64_t* first_error, int64_t index) {
  atomicMin(reinterpret_cast<unsigned long long*>(first_error),
            static_cast<unsigned long long>(index));
}

// ----------------------------------------------------------------------------- kernels

template <typename LT>
__global__ void __launch_bounds__(kThreads)
    _masked_multigroup_bce_fwd_kernel(const LT* __restrict__ logits,
                                      const void* __restrict__ targets, int targets_code,
                                      const typename Compute<LT>::type* __restrict__ pos_weight,
                                      LossShape shape, typename Compute<LT>::type* __restrict__ s,
                                      int32_t* __restrict__ k, int64_t* first_error) {
  // S[row, g] = sum over valid j of (1 - t) x + c (log1p(exp(-|x|)) + max(-x, 0)); K = count.
  using T = typename Compute<LT>::type;
  __shared__ T smem_t[kWarps];
  __shared__ int32_t smem_i[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t base = row * shape.n_cols;
  int64_t first_bad = kNoError;
  for (int64_t g = 0; g < shape.n_groups; ++g) {
    const int64_t end = shape.offsets[g + 1];
    T acc = T(0);
    int32_t count = 0;
    for (int64_t j = shape.offsets[g] + threadIdx.x; j < end; j += kThreads) {
      const TargetFlags f = load_flags(targets, targets_code, base + j);
      const T p = pos_weight != nullptr ? pos_weight[j] : T(1);
      const T loss = bce_loss<T>(to_compute(logits[base + j]), f.one ? T(1) : T(0), p);
      acc += f.unknown ? T(0) : loss;
      count += 1 - f.unknown;
      if (f.bad && j < first_bad) first_bad = j;
    }
    acc = block_sum(acc, smem_t);
    count = block_sum(count, smem_i);
    if (threadIdx.x == 0) {
      s[row * shape.n_groups + g] = acc;
      k[row * shape.n_groups + g] = count;
    }
  }
  if (first_bad != kNoError) record_error(first_error, base + first_bad);
}

template <typename LT>
__global__ void __launch_bounds__(kThreads)
    _masked_multigroup_bce_bwd_kernel(const LT* __restrict__ logits,
                                      const void* __restrict__ targets, int targets_code,
                                      const typename Compute<LT>::type* __restrict__ pos_weight,
                                      LossShape shape, LossWeights weights,
                                      LT* __restrict__ grad_logits) {
  // dL/dx = (t != -1) (c sigmoid(x) - pw t) w[row, g].
  using T = typename Compute<LT>::type;
  const T* w = static_cast<const T*>(weights.values);
  const int64_t row = blockIdx.x;
  const int64_t base = row * shape.n_cols;
  for (int64_t g = 0; g < shape.n_groups; ++g) {
    const T wg = w[row * weights.stride0 + g * weights.stride1];
    const int64_t end = shape.offsets[g + 1];
    for (int64_t j = shape.offsets[g] + threadIdx.x; j < end; j += kThreads) {
      const TargetFlags f = load_flags(targets, targets_code, base + j);
      const T p = pos_weight != nullptr ? pos_weight[j] : T(1);
      const T gj = bce_grad<T>(to_compute(logits[base + j]), f.one ? T(1) : T(0), p) * wg;
      store(grad_logits + base + j, f.unknown ? T(0) : gj);
    }
  }
}

// Per-group statistics of one row's group, reduced over the block (valid in thread 0):
// online max / sum-exp of the logits, the class logit and the target counts.
template <typename LT>
struct GroupPass {
  MaxSumExp<typename Compute<LT>::type> mse;
  typename Compute<LT>::type x_class;
  int32_t status;
};

template <typename LT>
__device__ GroupPass<LT> softmax_group_pass(const LT* __restrict__ x, const void* targets,
                                            int targets_code, int64_t t_base, int64_t begin,
                                            int64_t end) {
  using T = typename Compute<LT>::type;
  __shared__ T smem_max[kWarps], smem_sum[kWarps], smem_t[kWarps];
  __shared__ int32_t smem_i[kWarps];
  MaxSumExp<T> mse{-INFINITY, T(0)};
  T x_class = T(0);
  int32_t unknown = 0, pos = 0, bad = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const TargetFlags f = load_flags(targets, targets_code, t_base + j);
    const T xv = to_compute(x[j]);
    mse = max_sum_exp_push(mse, xv);
    x_class += f.one ? xv : T(0);
    unknown += f.unknown;
    pos += f.one;
    bad += f.bad;
  }
  GroupPass<LT> r;
  r.mse = block_max_sum_exp(mse, smem_max, smem_sum);
  r.x_class = block_sum(x_class, smem_t);
  unknown = block_sum(unknown, smem_i);
  pos = block_sum(pos, smem_i);
  bad = block_sum(bad, smem_i);
  r.status = softmax_group_status(end - begin, unknown, pos, bad);
  return r;
}

template <typename LT>
__global__ void __launch_bounds__(kThreads)
    _masked_multigroup_softmax_ce_fwd_kernel(const LT* __restrict__ logits,
                                             const void* __restrict__ targets, int targets_code,
                                             LossShape shape,
                                             typename Compute<LT>::type* __restrict__ s,
                                             int32_t* __restrict__ k, int64_t* first_error) {
  // S[row, g] = logsumexp(x[group]) - x[class] for a one-hot group, 0 (K = 0) if all -1.
  using T = typename Compute<LT>::type;
  const int64_t row = blockIdx.x;
  const int64_t base = row * shape.n_cols;
  for (int64_t g = 0; g < shape.n_groups; ++g) {
    const GroupPass<LT> p = softmax_group_pass(logits + base, targets, targets_code, base,
                                               shape.offsets[g], shape.offsets[g + 1]);
    if (threadIdx.x == 0) {
      const bool ok = p.status == kGroupOk;
      // (max - x_class) first, as on the CPU: it keeps O(1) results exact next to 1e4 logits.
      s[row * shape.n_groups + g] = ok ? (p.mse.max - p.x_class) + log(p.mse.sum) : T(0);
      k[row * shape.n_groups + g] = ok ? 1 : 0;
      if (softmax_status_is_error(p.status)) record_error(first_error, row * shape.n_groups + g);
    }
  }
}

template <typename LT>
__global__ void __launch_bounds__(kThreads)
    _masked_multigroup_softmax_ce_bwd_kernel(const LT* __restrict__ logits,
                                             const void* __restrict__ targets, int targets_code,
                                             LossShape shape, LossWeights weights,
                                             LT* __restrict__ grad_logits) {
  // dS/dx = (softmax(x[group]) - onehot) w[row, g] on known groups, 0 elsewhere.
  using T = typename Compute<LT>::type;
  __shared__ T sh_max, sh_inv_sum, sh_w;
  __shared__ bool sh_known;
  const T* w = static_cast<const T*>(weights.values);
  const int64_t row = blockIdx.x;
  const int64_t base = row * shape.n_cols;
  for (int64_t g = 0; g < shape.n_groups; ++g) {
    const int64_t begin = shape.offsets[g], end = shape.offsets[g + 1];
    const GroupPass<LT> p =
        softmax_group_pass(logits + base, targets, targets_code, base, begin, end);
    if (threadIdx.x == 0) {
      const bool ok = p.status == kGroupOk;
      sh_max = p.mse.max;
      sh_inv_sum = T(1) / p.mse.sum;
      sh_w = ok ? w[row * weights.stride0 + g * weights.stride1] : T(0);
      sh_known = ok;
    }
    __syncthreads();
    const T m = sh_max, inv = sh_inv_sum, wg = sh_w;
    const bool known = sh_known;
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
      const TargetFlags f = load_flags(targets, targets_code, base + j);
      const T prob = exp_nonpos(to_compute(logits[base + j]) - m) * inv;
      const T gj = (prob - (f.one ? T(1) : T(0))) * wg;
      store(grad_logits + base + j, known ? gj : T(0));
    }
    // The next group's reductions begin with __syncthreads, so sh_* are not overwritten
    // before every thread has read them.
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    loss_finish_kernel(const T* __restrict__ s, const int32_t* __restrict__ k, int64_t n_rows,
                       int64_t n_groups, int64_t reduction, T* __restrict__ group_counts,
                       T* __restrict__ loss) {
  // One block: per group, a fixed-shape sum over rows (in double), then the reduction.
  __shared__ double smem_d[kWarps];
  __shared__ long long smem_l[kWarps];
  double total = 0.0, present = 0.0;
  long long total_count = 0;
  for (int64_t g = 0; g < n_groups; ++g) {
    double sg = 0.0;
    long long kg = 0;
    for (int64_t r = threadIdx.x; r < n_rows; r += kThreads) {
      sg += static_cast<double>(s[r * n_groups + g]);
      kg += k[r * n_groups + g];
    }
    sg = block_sum(sg, smem_d);
    kg = block_sum(kg, smem_l);
    if (threadIdx.x == 0) {
      group_counts[g] = static_cast<T>(kg);
      total_count += kg;
      if (reduction == kReduceGroupMean) {
        if (kg > 0) {
          total += sg / static_cast<double>(kg);
          present += 1.0;
        }
      } else {
        total += sg;
      }
    }
  }
  if (threadIdx.x == 0 && reduction != kReduceNone) {
    if (reduction == kReduceMean) {
      total = total_count > 0 ? total / static_cast<double>(total_count) : 0.0;
    } else if (reduction == kReduceGroupMean) {
      total = present > 0.0 ? total / present : 0.0;
    }
    *loss = static_cast<T>(total);
  }
}

template <typename T>
__global__ void loss_weights_kernel(const T* __restrict__ grad, const T* __restrict__ counts,
                                    int64_t n_groups, int64_t reduction, T* __restrict__ weights) {
  __shared__ T sh_total, sh_present;
  if (threadIdx.x == 0) {
    T total = T(0), present = T(0);
    for (int64_t g = 0; g < n_groups; ++g) {
      total += counts[g];
      present += counts[g] > T(0) ? T(1) : T(0);
    }
    sh_total = total;
    sh_present = present;
  }
  __syncthreads();
  const T g0 = grad[0];
  for (int64_t g = threadIdx.x; g < n_groups; g += blockDim.x) {
    weights[g] = g0 * reduction_weight<T>(reduction, counts[g], sh_total, sh_present);
  }
}

// Calls f(LT*) with the logits storage type of `code`.
template <typename F>
void dispatch_logits(int code, F&& f) {
  switch (code) {
    case kLogitsF32: f(static_cast<float*>(nullptr)); break;
    case kLogitsF64: f(static_cast<double*>(nullptr)); break;
    case kLogitsF16: f(static_cast<__half*>(nullptr)); break;
    default: f(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

}  // namespace

void launch_bce_fwd(const void* logits, int logits_code, const void* targets, int targets_code,
                    const void* pos_weight, const LossShape& shape, void* s, int32_t* k,
                    int64_t* first_error, cudaStream_t stream) {
  if (shape.n_rows == 0) return;
  dispatch_logits(logits_code, [&](auto* tag) {
    using LT = std::remove_pointer_t<decltype(tag)>;
    using T = typename Compute<LT>::type;
    _masked_multigroup_bce_fwd_kernel<LT><<<shape.n_rows, kThreads, 0, stream>>>(
        static_cast<const LT*>(logits), targets, targets_code, static_cast<const T*>(pos_weight),
        shape, static_cast<T*>(s), k, first_error);
  });
}

void launch_softmax_fwd(const void* logits, int logits_code, const void* targets,
                        int targets_code, const LossShape& shape, void* s, int32_t* k,
                        int64_t* first_error, cudaStream_t stream) {
  if (shape.n_rows == 0) return;
  dispatch_logits(logits_code, [&](auto* tag) {
    using LT = std::remove_pointer_t<decltype(tag)>;
    using T = typename Compute<LT>::type;
    _masked_multigroup_softmax_ce_fwd_kernel<LT><<<shape.n_rows, kThreads, 0, stream>>>(
        static_cast<const LT*>(logits), targets, targets_code, shape, static_cast<T*>(s), k,
        first_error);
  });
}

void launch_loss_finish(const void* s, const int32_t* k, bool is_double, int64_t n_rows,
                        int64_t n_groups, int64_t reduction, void* group_counts, void* loss,
                        cudaStream_t stream) {
  if (is_double) {
    loss_finish_kernel<double><<<1, kThreads, 0, stream>>>(
        static_cast<const double*>(s), k, n_rows, n_groups, reduction,
        static_cast<double*>(group_counts), static_cast<double*>(loss));
  } else {
    loss_finish_kernel<float><<<1, kThreads, 0, stream>>>(
        static_cast<const float*>(s), k, n_rows, n_groups, reduction,
        static_cast<float*>(group_counts), static_cast<float*>(loss));
  }
}

void launch_loss_weights(const void* grad, const void* group_counts, bool is_double,
                         int64_t n_groups, int64_t reduction, void* weights, cudaStream_t stream) {
  if (is_double) {
    loss_weights_kernel<double><<<1, kThreads, 0, stream>>>(
        static_cast<const double*>(grad), static_cast<const double*>(group_counts), n_groups,
        reduction, static_cast<double*>(weights));
  } else {
    loss_weights_kernel<float><<<1, kThreads, 0, stream>>>(
        static_cast<const float*>(grad), static_cast<const float*>(group_counts), n_groups,
        reduction, static_cast<float*>(weights));
  }
}

void launch_bce_bwd(const void* logits, int logits_code, const void* targets, int targets_code,
                    const void* pos_weight, const LossShape& shape, const LossWeights& weights,
                    void* grad_logits, cudaStream_t stream) {
  if (shape.n_rows == 0) return;
  dispatch_logits(logits_code, [&](auto* tag) {
    using LT = std::remove_pointer_t<decltype(tag)>;
    using T = typename Compute<LT>::type;
    _masked_multigroup_bce_bwd_kernel<LT><<<shape.n_rows, kThreads, 0, stream>>>(
        static_cast<const LT*>(logits), targets, targets_code, static_cast<const T*>(pos_weight),
        shape, weights, static_cast<LT*>(grad_logits));
  });
}

void launch_softmax_bwd(const void* logits, int logits_code, const void* targets,
                        int targets_code, const LossShape& shape, const LossWeights& weights,
                        void* grad_logits, cudaStream_t stream) {
  if (shape.n_rows == 0) return;
  dispatch_logits(logits_code, [&](auto* tag) {
    using LT = std::remove_pointer_t<decltype(tag)>;
    _masked_multigroup_softmax_ce_bwd_kernel<LT><<<shape.n_rows, kThreads, 0, stream>>>(
        static_cast<const LT*>(logits), targets, targets_code, shape, weights,
        static_cast<LT*>(grad_logits));
  });
}

}  // namespace vcfast
