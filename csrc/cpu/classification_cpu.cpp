// Fused masked multi-group losses on the CPU (sigmoid CE and per-group softmax CE).
//
// Forward: one pass over logits and targets. Each row's partial sums S[n, g] and valid
// counts K[n, g] go into a small [N, G] buffer (threads own whole rows), then a serial
// reduction in a fixed order gives the loss, so results do not depend on the thread count.
// The target values are validated in the same pass: a flag per row, and only when it is
// set is the offending row scanned again to name the sample and column.
//
// Backward: one pass writing dL/dlogits; it needs only logits, targets and the [G] group
// counts, so nothing [N, C]-sized is saved between forward and backward.
//
// Vectorisation: the per-element math (classification_math.h) is branch-free, and float
// reductions are accumulated in kLanes independent lanes (an explicit lane array) because
// GCC will not reorder a scalar float sum without -ffast-math, which would keep the whole
// loop scalar. Lanes are summed in a fixed order at the end of each span.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <sstream>
#include <type_traits>
#include <vector>

#include "vcfast/classification_math.h"
#include "vcfast/cpu_isa.h"
#include "classification_cpu.h"

namespace vcfast {
namespace {

// Half/BFloat16 logits are computed in float; float64 in double.
template <typename LT>
using compute_t = std::conditional_t<std::is_same_v<LT, double>, double, float>;

// Targets are compared in a type that holds them exactly: Half/BFloat16 in float.
template <typename TT>
using target_cmp_t =
    std::conditional_t<std::is_same_v<TT, at::Half> || std::is_same_v<TT, at::BFloat16>, float,
                       TT>;

// 16 floats = two AVX2 / one AVX-512 vector; doubles likewise fill the same registers.
template <typename T>
constexpr int kLanes = std::is_same_v<T, double> ? 8 : 16;

// Rows per parallel task: at least ~32 K elements, so a batch of a few rows does not pay
// for waking the thread pool.
int64_t rows_grain(int64_t n_cols) {
  return std::max<int64_t>(1, int64_t(32768) / std::max<int64_t>(n_cols, 1));
}

template <typename F>
void dispatch_logits(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kDouble: return f(static_cast<double*>(nullptr));
    case at::kHalf: return f(static_cast<at::Half*>(nullptr));
    case at::kBFloat16: return f(static_cast<at::BFloat16*>(nullptr));
    default: TORCH_CHECK_TYPE(false, "vcfast: unsupported logits dtype ", st);
  }
}

template <typename F>
void dispatch_targets(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kChar: return f(static_cast<int8_t*>(nullptr));
    case at::kShort: return f(static_cast<int16_t*>(nullptr));
    case at::kInt: return f(static_cast<int32_t*>(nullptr));
    case at::kLong: return f(static_cast<int64_t*>(nullptr));
    case at::kHalf: return f(static_cast<at::Half*>(nullptr));
    case at::kBFloat16: return f(static_cast<at::BFloat16*>(nullptr));
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kDouble: return f(static_cast<double*>(nullptr));
    default: TORCH_CHECK_TYPE(false, "vcfast: unsupported targets dtype ", st);
  }
}

template <typename T>
T sum_lanes(const T* lanes) {
  T s = T(0);
  for (int l = 0; l < kLanes<T>; ++l) s += lanes[l];
  return s;
}

// A row of logits in the compute type: the row itself, or converted into `buf`.
template <typename LT, typename T>
const T* row_in_compute_type(const LT* row, int64_t n, std::vector<T>& buf) {
  if constexpr (std::is_same_v<LT, T>) {
    return row;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<T>(row[j]);
    return buf.data();
  }
}

// Lowers an atomic "first offending index" to `candidate` if smaller.
void atomic_min(std::atomic<int64_t>& target, int64_t candidate) {
  int64_t current = target.load(std::memory_order_relaxed);
  while (candidate < current &&
         !target.compare_exchange_weak(current, candidate, std::memory_order_relaxed)) {
  }
}

// ------------------------------------------------------------------------------- rows
// Each function below handles every group of one row. They are compiled three times
// (AVX-512, AVX2+FMA, baseline x86-64; VCFAST_ISA_DISPATCHED in
// csrc/include/vcfast/cpu_isa.h picks one per row at run time) because the loops are
// compute-bound: exp and log1p per entry cost more than reading the entry.
//
// Pattern: an elementwise loop over a block of at most kBlock entries writes per-entry
// values into a stack buffer and keeps integer counts (integer reductions vectorise as
// they are); lane_sum then adds the buffer in kLanes independent lanes.

constexpr int64_t kBlock = 256;

template <typename T>
VCFAST_ALWAYS_INLINE T lane_sum(const T* __restrict__ v, int64_t n) {
  constexpr int L = kLanes<T>;
  T acc[L];
  for (int l = 0; l < L; ++l) acc[l] = T(0);
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    for (int l = 0; l < L; ++l) acc[l] += v[j + l];
  }
  for (int l = 0; j < n; ++j, ++l) acc[l] += v[j];
  return sum_lanes(acc);
}

template <typename T>
VCFAST_ALWAYS_INLINE T lane_max(const T* __restrict__ v, int64_t n) {
  constexpr int L = kLanes<T>;
  T acc[L];
  for (int l = 0; l < L; ++l) acc[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    for (int l = 0; l < L; ++l) acc[l] = v[j + l] > acc[l] ? v[j + l] : acc[l];
  }
  for (int l = 0; j < n; ++j, ++l) acc[l] = v[j] > acc[l] ? v[j] : acc[l];
  T m = acc[0];
  for (int l = 1; l < L; ++l) m = acc[l] > m ? acc[l] : m;
  return m;
}

// Sigmoid CE forward of one row: s[g] = sum of entry losses of group g, k[g] = valid
// entries; returns nonzero when a target is not -1, 0 or 1.
template <typename T, typename TT, bool kPw>
VCFAST_ALWAYS_INLINE int32_t bce_fwd_row_impl(const T* __restrict__ x, const TT* __restrict__ tg,
                                      const T* __restrict__ pw, const int64_t* offsets,
                                      int64_t n_groups, T* __restrict__ s,
                                      int32_t* __restrict__ k) {
  using V = target_cmp_t<TT>;
  T vals[kBlock];
  int32_t bad = 0;
  for (int64_t g = 0; g < n_groups; ++g) {
    T sum = T(0);
    int32_t count = 0;
    for (int64_t base = offsets[g]; base < offsets[g + 1]; base += kBlock) {
      const int64_t m = std::min(kBlock, offsets[g + 1] - base);
      const T* xb = x + base;
      const TT* tb = tg + base;
      const T* pb = kPw ? pw + base : nullptr;
      for (int64_t j = 0; j < m; ++j) {
        const V v = static_cast<V>(tb[j]);
        const int32_t valid = v != V(-1);
        const T t = v == V(1) ? T(1) : T(0);
        const T p = kPw ? pb[j] : T(1);
        const T loss = bce_loss<T>(xb[j], t, p);
        vals[j] = valid ? loss : T(0);  // a select: a masked NaN/Inf logit cannot leak in
        count += valid;
        bad |= target_is_bad(v);
      }
      sum += lane_sum(vals, m);
    }
    s[g] = sum;
    k[g] = count;
  }
  return bad;
}
VCFAST_ISA_DISPATCHED(int32_t, bce_fwd_row, (typename T, typename TT, bool kPw), (T, TT, kPw),
                      (const T* __restrict__ x, const TT* __restrict__ tg,
                       const T* __restrict__ pw, const int64_t* offsets, int64_t n_groups,
                       T* __restrict__ s, int32_t* __restrict__ k),
                      (x, tg, pw, offsets, n_groups, s, k))

// Sigmoid CE backward of one row; w[g] is dL/dS[row, g].
template <typename T, typename TT, bool kPw>
VCFAST_ALWAYS_INLINE void bce_bwd_row_impl(const T* __restrict__ x, const TT* __restrict__ tg,
                                   const T* __restrict__ pw, const int64_t* offsets,
                                   int64_t n_groups, const T* w, T* __restrict__ out) {
  using V = target_cmp_t<TT>;
  for (int64_t g = 0; g < n_groups; ++g) {
    const T wg = w[g];
    for (int64_t j = offsets[g]; j < offsets[g + 1]; ++j) {
      const V v = static_cast<V>(tg[j]);
      const T t = v == V(1) ? T(1) : T(0);
      const T p = kPw ? pw[j] : T(1);
      const T gj = bce_grad<T>(x[j], t, p) * wg;
      out[j] = v != V(-1) ? gj : T(0);
    }
  }
}
VCFAST_ISA_DISPATCHED(void, bce_bwd_row, (typename T, typename TT, bool kPw), (T, TT, kPw),
                      (const T* __restrict__ x, const TT* __restrict__ tg,
                       const T* __restrict__ pw, const int64_t* offsets, int64_t n_groups,
                       const T* w, T* __restrict__ out),
                      (x, tg, pw, offsets, n_groups, w, out))

// Target statistics and the class logit of one softmax group.
template <typename T>
struct SoftmaxGroupStats {
  T x_class;
  int32_t status;
};

template <typename T, typename TT>
VCFAST_ALWAYS_INLINE SoftmaxGroupStats<T> softmax_group_stats(const T* __restrict__ x,
                                                const TT* __restrict__ tg, int64_t n) {
  using V = target_cmp_t<TT>;
  T vals[kBlock];
  T x_class = T(0);
  int32_t unknown = 0, pos = 0, bad = 0;
  for (int64_t base = 0; base < n; base += kBlock) {
    const int64_t m = std::min(kBlock, n - base);
    for (int64_t j = 0; j < m; ++j) {
      const V v = static_cast<V>(tg[base + j]);
      const int32_t one = v == V(1);
      const T xv = x[base + j];  // loaded unconditionally, so the select if-converts
      vals[j] = one ? xv : T(0);
      unknown += v == V(-1);
      pos += one;
      bad += target_is_bad(v);
    }
    x_class += lane_sum(vals, m);
  }
  return {x_class, softmax_group_status(n, unknown, pos, bad)};
}

// sum_j exp(x_j - m) over one group; with kKeep the exponentials are also stored in e_out.
// (Two explicit loops: a pointer chosen at run time between e_out and a scratch block
// would keep GCC from vectorising.)
template <typename T, bool kKeep>
VCFAST_ALWAYS_INLINE T softmax_sum_exp(const T* __restrict__ x, T m, int64_t n, T* __restrict__ e_out) {
  T scratch[kBlock];
  T sum = T(0);
  for (int64_t base = 0; base < n; base += kBlock) {
    const int64_t len = std::min(kBlock, n - base);
    if constexpr (kKeep) {
      T* __restrict__ e = e_out + base;
      for (int64_t j = 0; j < len; ++j) e[j] = exp_nonpos(x[base + j] - m);
      sum += lane_sum(e, len);
    } else {
      for (int64_t j = 0; j < len; ++j) scratch[j] = exp_nonpos(x[base + j] - m);
      sum += lane_sum(scratch, len);
    }
  }
  return sum;
}

// Softmax CE forward of one row: s[g] = logsumexp - x[class] and k[g] = 1 for a known
// group, 0 otherwise; status[g] says what is wrong with an invalid group.
template <typename T, typename TT>
VCFAST_ALWAYS_INLINE void softmax_fwd_row_impl(const T* __restrict__ x, const TT* __restrict__ tg,
                                       const int64_t* offsets, int64_t n_groups,
                                       T* __restrict__ s, int32_t* __restrict__ k,
                                       int32_t* __restrict__ status) {
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t off = offsets[g], n = offsets[g + 1] - off;
    const SoftmaxGroupStats<T> st = softmax_group_stats<T, TT>(x + off, tg + off, n);
    status[g] = st.status;
    if (st.status == kGroupOk) {
      const T m = lane_max(x + off, n);
      const T sum = softmax_sum_exp<T, false>(x + off, m, n, nullptr);
      // (max - x_class) first: both may be ~1e4 while the result is O(1), and adding
      // log(sum) to max first would round it to max's grid.
      s[g] = (m - st.x_class) + std::log(sum);
      k[g] = 1;
    } else {
      s[g] = T(0);
      k[g] = 0;
    }
  }
}
VCFAST_ISA_DISPATCHED(void, softmax_fwd_row, (typename T, typename TT), (T, TT),
                      (const T* __restrict__ x, const TT* __restrict__ tg, const int64_t* offsets,
                       int64_t n_groups, T* __restrict__ s, int32_t* __restrict__ k,
                       int32_t* __restrict__ status),
                      (x, tg, offsets, n_groups, s, k, status))

// Softmax CE backward of one row: (softmax - onehot) * w[g] on known groups, 0 elsewhere
// (unknown groups, and invalid ones when the op is called directly with unchecked targets).
template <typename T, typename TT>
VCFAST_ALWAYS_INLINE void softmax_bwd_row_impl(const T* __restrict__ x, const TT* __restrict__ tg,
                                       const int64_t* offsets, int64_t n_groups, const T* w,
                                       T* __restrict__ out) {
  using V = target_cmp_t<TT>;
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t off = offsets[g], n = offsets[g + 1] - off;
    const SoftmaxGroupStats<T> st = softmax_group_stats<T, TT>(x + off, tg + off, n);
    T* __restrict__ o = out + off;
    const TT* t = tg + off;
    if (st.status != kGroupOk) {
      for (int64_t j = 0; j < n; ++j) o[j] = T(0);
      continue;
    }
    const T m = lane_max(x + off, n);
    const T inv = T(1) / softmax_sum_exp<T, true>(x + off, m, n, o);
    const T wg = w[g];
    for (int64_t j = 0; j < n; ++j) {
      const T one = static_cast<V>(t[j]) == V(1) ? T(1) : T(0);
      o[j] = (o[j] * inv - one) * wg;
    }
  }
}
VCFAST_ISA_DISPATCHED(void, softmax_bwd_row, (typename T, typename TT), (T, TT),
                      (const T* __restrict__ x, const TT* __restrict__ tg, const int64_t* offsets,
                       int64_t n_groups, const T* w, T* __restrict__ out),
                      (x, tg, offsets, n_groups, w, out))

// ------------------------------------------------------------------------ reductions

// Turns the per-(row, group) partials into (loss, group_counts), serially and in a fixed order.
template <typename T>
std::tuple<at::Tensor, at::Tensor> finish_forward(const T* s, const int32_t* k, int64_t n_rows,
                                                  int64_t n_groups, int64_t reduction,
                                                  at::Tensor loss_none,
                                                  const at::TensorOptions& options) {
  std::vector<int64_t> counts(n_groups, 0);
  std::vector<double> group_sums(n_groups, 0.0);
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t g = 0; g < n_groups; ++g) {
      counts[g] += k[r * n_groups + g];
      group_sums[g] += static_cast<double>(s[r * n_groups + g]);
    }
  }
  // int64, as every backend returns them (one output schema for the C++ and Triton ops).
  at::Tensor group_counts = at::empty({n_groups}, options.dtype(at::kLong));
  int64_t* c = group_counts.data_ptr<int64_t>();
  int64_t total_count = 0;
  for (int64_t g = 0; g < n_groups; ++g) {
    c[g] = counts[g];
    total_count += counts[g];
  }
  if (reduction == kReduceNone) return {loss_none, group_counts};
  double total = 0.0;
  if (reduction == kReduceGroupMean) {
    int64_t present = 0;
    for (int64_t g = 0; g < n_groups; ++g) {
      if (counts[g] > 0) {
        total += group_sums[g] / static_cast<double>(counts[g]);
        ++present;
      }
    }
    total = present > 0 ? total / static_cast<double>(present) : 0.0;
  } else {
    for (int64_t g = 0; g < n_groups; ++g) total += group_sums[g];
    if (reduction == kReduceMean) {
      total = total_count > 0 ? total / static_cast<double>(total_count) : 0.0;
    }
  }
  at::Tensor loss = at::empty({}, options);
  *loss.data_ptr<T>() = static_cast<T>(total);
  return {loss, group_counts};
}

// The per-(row, group) partial sums s and valid counts k that both forwards fill in parallel.
// For reduction "none" the sums are written straight into the [N, G] loss tensor.
template <typename T>
struct ForwardPartials {
  at::Tensor loss_none;      // the output for reduction "none", else undefined
  std::vector<T> sums_scratch;
  std::vector<int32_t> k;
  T* s;

  ForwardPartials(int64_t n_rows, int64_t n_groups, int64_t reduction, const at::TensorOptions& options)
      : k(n_rows * n_groups) {
    if (reduction == kReduceNone) {
      loss_none = at::empty({n_rows, n_groups}, options);
      s = loss_none.data_ptr<T>();
    } else {
      sums_scratch.resize(n_rows * n_groups);
      s = sums_scratch.data();
    }
  }

  std::tuple<at::Tensor, at::Tensor> finish(int64_t n_rows, int64_t n_groups, int64_t reduction,
                                            const at::TensorOptions& options) const {
    return finish_forward<T>(s, k.data(), n_rows, n_groups, reduction, loss_none, options);
  }
};

// Weights w[g] = dL/dS[row, g] of the backward: the row of grad for "none", else one value
// per group (reduction_weight in classification_math.h times the scalar grad).
template <typename T>
struct BackwardWeights {
  const T* grad = nullptr;  // "none": grad[row * stride0 + g * stride1]
  int64_t stride0 = 0, stride1 = 0, n_groups = 0;
  std::vector<T> per_group;  // otherwise

  // The weights of one row, gathered into `scratch` (n_groups values) when they vary by row.
  const T* row(int64_t r, T* scratch) const {
    if (grad == nullptr) return per_group.data();
    for (int64_t g = 0; g < n_groups; ++g) scratch[g] = grad[r * stride0 + g * stride1];
    return scratch;
  }
};

template <typename T>
BackwardWeights<T> make_weights(const at::Tensor& grad, const at::Tensor& counts_t,
                                int64_t reduction) {
  BackwardWeights<T> w;
  const int64_t n_groups = counts_t.numel();
  w.n_groups = n_groups;
  if (reduction == kReduceNone) {
    // Any strides: the dL/dS of a .sum() is an expanded scalar; copying it would be a waste.
    w.grad = grad.data_ptr<T>();
    w.stride0 = grad.stride(0);
    w.stride1 = grad.stride(1);
    return w;
  }
  const T* counts = counts_t.data_ptr<T>();
  T total = T(0), present = T(0);
  for (int64_t g = 0; g < n_groups; ++g) {
    total += counts[g];
    present += counts[g] > T(0) ? T(1) : T(0);
  }
  const T g0 = *grad.data_ptr<T>();
  w.per_group.resize(n_groups);
  for (int64_t g = 0; g < n_groups; ++g) {
    w.per_group[g] = g0 * reduction_weight<T>(reduction, counts[g], total, present);
  }
  return w;
}

template <typename V>
std::string format_target(V v) {
  std::ostringstream os;
  os << static_cast<double>(v);
  return os.str();
}

}  // namespace

// ------------------------------------------------------------------------ sigmoid CE

std::tuple<at::Tensor, at::Tensor> masked_multigroup_bce_cpu(
    const at::Tensor& logits_in, const at::Tensor& targets_in, at::IntArrayRef groups,
    const std::optional<at::Tensor>& pos_weight_in, int64_t reduction) {
  constexpr const char* kOp = "vcfast.masked_multigroup_bce";
  const std::vector<int64_t> offsets =
      check_loss_args(kOp, logits_in, targets_in, groups, pos_weight_in, reduction);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  const at::ScalarType loss_type = loss_dtype_of(logits);
  const at::TensorOptions options = logits.options().dtype(loss_type);
  const bool has_pw = pos_weight_in.has_value();
  const at::Tensor pos_weight = has_pw ? pos_weight_in->to(loss_type).contiguous() : at::Tensor();

  std::tuple<at::Tensor, at::Tensor> result;
  std::atomic<int64_t> first_bad_row{std::numeric_limits<int64_t>::max()};
  dispatch_logits(logits.scalar_type(), [&](auto* lt_tag) {
    using LT = std::remove_pointer_t<decltype(lt_tag)>;
    using T = compute_t<LT>;
    ForwardPartials<T> partials(n_rows, n_groups, reduction, options);
    T* s = partials.s;
    int32_t* k = partials.k.data();
    const LT* x_ptr = logits.data_ptr<LT>();
    const T* pw_ptr = has_pw ? pos_weight.data_ptr<T>() : nullptr;
    dispatch_targets(targets.scalar_type(), [&](auto* tt_tag) {
      using TT = std::remove_pointer_t<decltype(tt_tag)>;
      const TT* t_ptr = targets.data_ptr<TT>();
      auto run = [&](auto pw_c) {
        constexpr bool kPw = decltype(pw_c)::value;
        at::parallel_for(0, n_rows, rows_grain(n_cols), [&](int64_t begin, int64_t end) {
          std::vector<T> buf(std::is_same_v<LT, T> ? 0 : n_cols);
          int64_t local_bad = std::numeric_limits<int64_t>::max();
          for (int64_t r = begin; r < end; ++r) {
            const T* xr = row_in_compute_type<LT, T>(x_ptr + r * n_cols, n_cols, buf);
            const int32_t bad = bce_fwd_row<T, TT, kPw>(xr, t_ptr + r * n_cols, pw_ptr,
                                                        offsets.data(), n_groups,
                                                        s + r * n_groups, k + r * n_groups);
            if (bad && r < local_bad) local_bad = r;
          }
          atomic_min(first_bad_row, local_bad);
        });
      };
      if (has_pw) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
      const int64_t bad_row = first_bad_row.load();
      if (bad_row != std::numeric_limits<int64_t>::max()) {
        // Only now is the offending row scanned again, to name the entry.
        using V = target_cmp_t<TT>;
        const TT* tr = t_ptr + bad_row * n_cols;
        int64_t j = 0;
        while (j < n_cols - 1 && !target_is_bad(static_cast<V>(tr[j]))) ++j;
        TORCH_CHECK_VALUE(false, kOp, ": `targets` must hold only -1 (unknown), 0 or 1; found ",
                          format_target(static_cast<V>(tr[j])), " at sample ", bad_row,
                          ", column ", j);
      }
    });
    result = partials.finish(n_rows, n_groups, reduction, options);
  });
  return result;
}

at::Tensor masked_multigroup_bce_backward_cpu(const at::Tensor& grad_in,
                                              const at::Tensor& logits_in,
                                              const at::Tensor& targets_in,
                                              at::IntArrayRef groups,
                                              const std::optional<at::Tensor>& pos_weight_in,
                                              int64_t reduction,
                                              const at::Tensor& group_counts_in) {
  constexpr const char* kOp = "vcfast.masked_multigroup_bce_backward";
  const std::vector<int64_t> offsets =
      check_loss_args(kOp, logits_in, targets_in, groups, pos_weight_in, reduction);
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  check_loss_backward_args(kOp, grad_in, logits_in, n_groups, reduction, group_counts_in);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const at::ScalarType loss_type = loss_dtype_of(logits);
  const at::Tensor grad = grad_in.to(loss_type);
  const at::Tensor counts = group_counts_in.to(loss_type).contiguous();
  const bool has_pw = pos_weight_in.has_value();
  const at::Tensor pos_weight = has_pw ? pos_weight_in->to(loss_type).contiguous() : at::Tensor();
  at::Tensor grad_logits = at::empty_like(logits);

  dispatch_logits(logits.scalar_type(), [&](auto* lt_tag) {
    using LT = std::remove_pointer_t<decltype(lt_tag)>;
    using T = compute_t<LT>;
    const BackwardWeights<T> weights = make_weights<T>(grad, counts, reduction);
    const LT* x_ptr = logits.data_ptr<LT>();
    LT* out_ptr = grad_logits.data_ptr<LT>();
    const T* pw_ptr = has_pw ? pos_weight.data_ptr<T>() : nullptr;
    dispatch_targets(targets.scalar_type(), [&](auto* tt_tag) {
      using TT = std::remove_pointer_t<decltype(tt_tag)>;
      const TT* t_ptr = targets.data_ptr<TT>();
      auto run = [&](auto pw_c) {
        constexpr bool kPw = decltype(pw_c)::value;
        at::parallel_for(0, n_rows, rows_grain(n_cols), [&](int64_t begin, int64_t end) {
          constexpr bool kSame = std::is_same_v<LT, T>;
          std::vector<T> buf(kSame ? 0 : n_cols), out_buf(kSame ? 0 : n_cols);
          std::vector<T> w_scratch(n_groups);
          for (int64_t r = begin; r < end; ++r) {
            const T* xr = row_in_compute_type<LT, T>(x_ptr + r * n_cols, n_cols, buf);
            T* outr;
            if constexpr (kSame) {
              outr = out_ptr + r * n_cols;
            } else {
              outr = out_buf.data();
            }
            bce_bwd_row<T, TT, kPw>(xr, t_ptr + r * n_cols, pw_ptr, offsets.data(), n_groups,
                                    weights.row(r, w_scratch.data()), outr);
            if constexpr (!kSame) {
              LT* dst = out_ptr + r * n_cols;
              for (int64_t j = 0; j < n_cols; ++j) dst[j] = static_cast<LT>(outr[j]);
            }
          }
        });
      };
      if (has_pw) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  });
  return grad_logits;
}

// ------------------------------------------------------------------------ softmax CE

std::tuple<at::Tensor, at::Tensor> masked_multigroup_softmax_ce_cpu(const at::Tensor& logits_in,
                                                                    const at::Tensor& targets_in,
                                                                    at::IntArrayRef groups,
                                                                    int64_t reduction) {
  constexpr const char* kOp = "vcfast.masked_multigroup_softmax_ce";
  const std::vector<int64_t> offsets =
      check_loss_args(kOp, logits_in, targets_in, groups, std::nullopt, reduction);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  const at::TensorOptions options = logits.options().dtype(loss_dtype_of(logits));

  std::tuple<at::Tensor, at::Tensor> result;
  // Flat index r * G + g of the first (sample, group) whose targets are not valid.
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  dispatch_logits(logits.scalar_type(), [&](auto* lt_tag) {
    using LT = std::remove_pointer_t<decltype(lt_tag)>;
    using T = compute_t<LT>;
    ForwardPartials<T> partials(n_rows, n_groups, reduction, options);
    T* s = partials.s;
    int32_t* k = partials.k.data();
    const LT* x_ptr = logits.data_ptr<LT>();
    dispatch_targets(targets.scalar_type(), [&](auto* tt_tag) {
      using TT = std::remove_pointer_t<decltype(tt_tag)>;
      const TT* t_ptr = targets.data_ptr<TT>();
      at::parallel_for(0, n_rows, rows_grain(n_cols), [&](int64_t begin, int64_t end) {
        std::vector<T> buf(std::is_same_v<LT, T> ? 0 : n_cols);
        std::vector<int32_t> status(n_groups);
        int64_t local_bad = std::numeric_limits<int64_t>::max();
        for (int64_t r = begin; r < end; ++r) {
          const T* xr = row_in_compute_type<LT, T>(x_ptr + r * n_cols, n_cols, buf);
          softmax_fwd_row<T, TT>(xr, t_ptr + r * n_cols, offsets.data(), n_groups,
                                 s + r * n_groups, k + r * n_groups, status.data());
          for (int64_t g = 0; g < n_groups && local_bad == std::numeric_limits<int64_t>::max();
               ++g) {
            if (softmax_status_is_error(status[g])) local_bad = r * n_groups + g;
          }
        }
        atomic_min(first_bad, local_bad);
      });
      const int64_t bad = first_bad.load();
      if (bad != std::numeric_limits<int64_t>::max()) {
        using V = target_cmp_t<TT>;
        const int64_t r = bad / n_groups, g = bad % n_groups;
        const int64_t off = offsets[g], size = offsets[g + 1] - off;
        int64_t n_unknown = 0, n_pos = 0, n_bad = 0;
        std::string bad_value;
        for (int64_t j = 0; j < size; ++j) {
          const V v = static_cast<V>(t_ptr[r * n_cols + off + j]);
          n_unknown += v == V(-1);
          n_pos += v == V(1);
          if (target_is_bad(v) && n_bad++ == 0) {
            bad_value = " (found " + format_target(v) + " at column " + std::to_string(off + j) + ")";
          }
        }
        const int32_t status = softmax_group_status(size, n_unknown, n_pos, n_bad);
        TORCH_CHECK_VALUE(false, kOp, ": `targets` of sample ", r, ", group ", g, " (columns ",
                          off, "..", off + size - 1, ") ", softmax_status_reason(status),
                          bad_value);
      }
    });
    result = partials.finish(n_rows, n_groups, reduction, options);
  });
  return result;
}

at::Tensor masked_multigroup_softmax_ce_backward_cpu(const at::Tensor& grad_in,
                                                     const at::Tensor& logits_in,
                                                     const at::Tensor& targets_in,
                                                     at::IntArrayRef groups, int64_t reduction,
                                                     const at::Tensor& group_counts_in) {
  constexpr const char* kOp = "vcfast.masked_multigroup_softmax_ce_backward";
  const std::vector<int64_t> offsets =
      check_loss_args(kOp, logits_in, targets_in, groups, std::nullopt, reduction);
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  check_loss_backward_args(kOp, grad_in, logits_in, n_groups, reduction, group_counts_in);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t n_rows = logits.size(0), n_cols = logits.size(1);
  const at::ScalarType loss_type = loss_dtype_of(logits);
  const at::Tensor grad = grad_in.to(loss_type);
  const at::Tensor counts = group_counts_in.to(loss_type).contiguous();
  at::Tensor grad_logits = at::empty_like(logits);

  dispatch_logits(logits.scalar_type(), [&](auto* lt_tag) {
    using LT = std::remove_pointer_t<decltype(lt_tag)>;
    using T = compute_t<LT>;
    const BackwardWeights<T> weights = make_weights<T>(grad, counts, reduction);
    const LT* x_ptr = logits.data_ptr<LT>();
    LT* out_ptr = grad_logits.data_ptr<LT>();
    dispatch_targets(targets.scalar_type(), [&](auto* tt_tag) {
      using TT = std::remove_pointer_t<decltype(tt_tag)>;
      const TT* t_ptr = targets.data_ptr<TT>();
      at::parallel_for(0, n_rows, rows_grain(n_cols), [&](int64_t begin, int64_t end) {
        constexpr bool kSame = std::is_same_v<LT, T>;
        std::vector<T> buf(kSame ? 0 : n_cols), out_buf(kSame ? 0 : n_cols);
        std::vector<T> w_scratch(n_groups);
        for (int64_t r = begin; r < end; ++r) {
          const T* xr = row_in_compute_type<LT, T>(x_ptr + r * n_cols, n_cols, buf);
          T* outr;
          if constexpr (kSame) {
            outr = out_ptr + r * n_cols;
          } else {
            outr = out_buf.data();
          }
          softmax_bwd_row<T, TT>(xr, t_ptr + r * n_cols, offsets.data(), n_groups,
                                 weights.row(r, w_scratch.data()), outr);
          if constexpr (!kSame) {
            LT* dst = out_ptr + r * n_cols;
            for (int64_t j = 0; j < n_cols; ++j) dst[j] = static_cast<LT>(outr[j]);
          }
        }
      });
    });
  });
  return grad_logits;
}

}  // namespace vcfast
