// Per-element math of the fused masked multi-group losses, shared by the CPU and CUDA
// kernels (the contract is docs/ops.md#masked-multi-group-losses and
// vcfast/ops/classification.py).
//
// Targets t are -1 (unknown: the entry is ignored), 0 or 1. For a valid entry with logit x
// and positive weight pw (1 without pos_weight):
//   sigmoid CE:  c = 1 + (pw - 1) t
//                l = (1 - t) x + c (log1p(exp(-|x|)) + max(-x, 0))      stable for |x| = 1e4
//                dl/dx = c sigmoid(x) - pw t
//   softmax CE (one group, one-hot t):  S = logsumexp(x) - x[class],  dS/dx = softmax(x) - t
//
// The transcendental functions are written out as branch-free polynomials for float (the
// Cephes expf/logf kernels, within 2 ulp) so that the CPU loops calling them vectorise:
// glibc's expf/log1pf are scalar calls that GCC cannot vectorise without -ffast-math, and a
// scalar call per element would cost more than the whole memory traffic of the loss. The
// CUDA kernels run the same code, so the CPU tests cover the math the GPU runs. double
// keeps the libm functions (it is the gradcheck/test precision, not a hot path).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef VCFAST_HD
#if defined(__CUDACC__) || defined(__HIPCC__)
#define VCFAST_HD __host__ __device__ __forceinline__
#else
#define VCFAST_HD inline
#endif
#endif

namespace vcfast {

// Reduction codes of the registered ops (vcfast/ops/classification.py: _REDUCTIONS).
enum LossReduction : int64_t {
  kReduceNone = 0,
  kReduceSum = 1,
  kReduceMean = 2,
  kReduceGroupMean = 3,
};

VCFAST_HD float int_bits_as_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof f);  // compiles to a register move; vectorises
  return f;
#endif
}

// exp(x) for x <= 0 (the only range the losses need: exp(-|x|) and exp(x - max)).
// Results below FLT_MIN flush to 0; a NaN stays NaN.
VCFAST_HD float exp_nonpos(float x) {
  const float kMin = -87.33654475f;  // ln(FLT_MIN): 2^n below stays a normal float
  const float xc = x < kMin ? kMin : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (no floor/round call, so it vectorises).
  const float kShifter = 12582912.0f;
  const float nf = (xc * 1.44269504088896341f + kShifter) - kShifter;
  // r = x - n ln 2 in two parts, so r is exact enough for a 1-ulp result.
  const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r * r + r) + 1.0f;
  const float scale = int_bits_as_float((static_cast<int32_t>(nf) + 127) << 23);
  const float result = y * scale;
  return x < kMin ? 0.0f : result;  // NaN compares false and keeps the NaN result
}

VCFAST_HD double exp_nonpos(double x) { return exp(x); }

// log1p(e) for e in [0, 1] (the argument is exp(-|x|)).
// log(1 + e) = k ln 2 + log1p(f) with 1 + f = (1 + e) / 2^k in [sqrt(1/2), sqrt(2)]. f is
// formed from e directly (f = e, or (e - 1) / 2), never as (1 + e) - 1, so tiny e keep
// full precision (log1p(e) ~ e) and no division is needed.
VCFAST_HD float log1p_unit(float e) {
  const float k = e > 0.41421356237f ? 1.0f : 0.0f;  // 1 + e > sqrt(2)
  // A blend by multiplication (exact for k in {0, 1}): with a select here GCC evaluates the
  // polynomial below once per arm.
  const float f = e * (1.0f - k) + ((e - 1.0f) * 0.5f) * k;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = f * z * p;
  y += k * -2.12194440e-4f;
  y += -0.5f * z;
  return (f + y) + k * 0.693359375f;
}

VCFAST_HD double log1p_unit(double e) { return log1p(e); }

// ---------------------------------------------------------------------------------------
// Sigmoid cross-entropy (per entry). t is 0 or 1 here: the kernels turn a target into
// (valid, t) first, and an entry with valid == false contributes nothing.

template <typename T>
VCFAST_HD T bce_weight_c(T t, T pw) {
  return T(1) + (pw - T(1)) * t;
}

template <typename T>
VCFAST_HD T bce_loss(T x, T t, T pw) {
  const T abs_x = x < T(0) ? -x : x;
  const T neg_part = x < T(0) ? -x : T(0);  // max(-x, 0)
  return (T(1) - t) * x + bce_weight_c(t, pw) * (log1p_unit(exp_nonpos(-abs_x)) + neg_part);
}

// sigmoid(x) from e = exp(-|x|) without overflow: 1/(1+e) for x >= 0, e/(1+e) otherwise.
template <typename T>
VCFAST_HD T sigmoid_from_exp(T x, T e) {
  const T r = T(1) / (T(1) + e);
  return x >= T(0) ? r : e * r;
}

template <typename T>
VCFAST_HD T bce_grad(T x, T t, T pw) {
  const T abs_x = x < T(0) ? -x : x;
  const T s = sigmoid_from_exp(x, exp_nonpos(-abs_x));
  return bce_weight_c(t, pw) * s - pw * t;
}

// ---------------------------------------------------------------------------------------
// Target classification, the same on every backend. A target is compared in its own type
// (a float64 1.0000001 is not 1, an int64 2**40 is not 0), so validation is exact.

template <typename TT>
VCFAST_HD float target_as_float(TT v) {
  return static_cast<float>(v);
}

// 1 when v is not -1, 0 or 1 (NaN included).
template <typename V>
VCFAST_HD int32_t target_is_bad(V v) {
  return static_cast<int32_t>((v != V(-1)) & (v != V(0)) & (v != V(1)));
}

// Softmax CE: what is wrong with one (sample, group), from the counts of its targets.
enum SoftmaxGroupStatus : int32_t {
  kGroupOk = 0,           // exactly one 1, the rest 0
  kGroupUnknown = 1,      // all -1: skipped (S = 0, K = 0)
  kGroupBadValue = 2,     // a value outside {-1, 0, 1}
  kGroupMixed = 3,        // -1 mixed with 0/1
  kGroupNoPositive = 4,   // all 0
  kGroupTwoPositives = 5, // two or more 1
};

VCFAST_HD int32_t softmax_group_status(int64_t size, int64_t n_unknown, int64_t n_pos,
                                       int64_t n_bad) {
  if (n_bad > 0) return kGroupBadValue;
  if (n_unknown == size) return kGroupUnknown;
  if (n_unknown > 0) return kGroupMixed;
  if (n_pos == 0) return kGroupNoPositive;
  if (n_pos > 1) return kGroupTwoPositives;
  return kGroupOk;
}

VCFAST_HD bool softmax_status_is_error(int32_t status) {
  return status >= kGroupBadValue;
}

// Online softmax statistics (running max m and sum of exp(x - m)); merging two partial
// states is how the CUDA block reduction combines threads.
template <typename T>
struct MaxSumExp {
  T max;
  T sum;
};

template <typename T>
VCFAST_HD MaxSumExp<T> max_sum_exp_merge(MaxSumExp<T> a, MaxSumExp<T> b) {
  // An empty side has max = -inf and sum = 0; exp_nonpos(-inf) is 0, never NaN.
  const T m = a.max > b.max ? a.max : b.max;
  const T da = a.max - m;
  const T db = b.max - m;
  const T sa = a.sum == T(0) ? T(0) : a.sum * exp_nonpos(da);
  const T sb = b.sum == T(0) ? T(0) : b.sum * exp_nonpos(db);
  return MaxSumExp<T>{m, sa + sb};
}

template <typename T>
VCFAST_HD MaxSumExp<T> max_sum_exp_push(MaxSumExp<T> s, T x) {
  return max_sum_exp_merge(s, MaxSumExp<T>{x, T(1)});
}

// Weight of dL/dS[n, g] for the reductions other than "none" (which uses grad[n, g]):
// sum -> 1, mean -> 1 / sum_g counts[g], group_mean -> 1 / (|P| counts[g]) for g in P,
// P = {g : counts[g] > 0}; 0 wherever the divisor would be 0, so no NaN ever appears.
template <typename T>
VCFAST_HD T reduction_weight(int64_t reduction, T count_g, T total_count, T n_present) {
  if (reduction == kReduceSum) return T(1);
  if (reduction == kReduceMean) return total_count > T(0) ? T(1) / total_count : T(0);
  if (reduction == kReduceGroupMean) {
    return count_g > T(0) ? T(1) / (n_present * count_g) : T(0);
  }
  return T(1);
}

}  // namespace vcfast
