// Slope-bit kernels of the lean gradient penalty (vcfast/ops/gradient_penalty.py), CPU.
//
// A LeakyReLU's derivative is 1 where its input was > 0 and the negative slope elsewhere, so
// the backward-with-ones and tangent passes need one bit per element from the forward:
//   leaky_relu_with_bits : z -> (leaky_relu(z), packed bits of z > 0)       one pass
//   scale_by_slope_bits  : (x, bits) -> x * (bit ? 1 : slope)               one pass
//   penalty_terms        : g -> (gp, u) with per-sample norms               one kernel
// Bit layout: element e is bit (e % 8) of byte (e / 8). Work is split in whole bytes
// (8 elements), so threads never share a byte and no atomics are needed.
#include "gradient_penalty_cpu.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "vcfast/cpu_isa.h"

namespace vcfast {
namespace {

constexpr int64_t kBytesPerTask = 4096;  // 32 768 elements per parallel task

// The loops of one parallel task, each compiled at three instruction-set levels
// (csrc/include/vcfast/cpu_isa.h); the ops below call them per task.

// leaky_relu(z) and the packed bits of z > 0 for bytes [byte_begin, byte_end).
// Two simple passes over the task's elements instead of one loop with a variable trip count
// per byte: the first (branch-free select) and the second (8 compares per byte, a constant
// trip count) are loops the compiler vectorises; the task's data stays in L2.
template <typename T>
VCFAST_ALWAYS_INLINE void leaky_relu_bits_task_impl(const T* __restrict__ src, T* __restrict__ dst,
                                                    uint8_t* __restrict__ packed, int64_t n,
                                                    int64_t byte_begin, int64_t byte_end,
                                                    at::opmath_type<T> slope) {
  using Acc = at::opmath_type<T>;
  const int64_t begin = byte_begin * 8, end = std::min<int64_t>(byte_end * 8, n);
  for (int64_t e = begin; e < end; ++e) {
    const Acc v = static_cast<Acc>(src[e]);
    dst[e] = static_cast<T>(v > Acc(0) ? v : v * slope);
  }
  const int64_t full_end = std::min<int64_t>(byte_end, n / 8);
  for (int64_t byte = byte_begin; byte < full_end; ++byte) {
    const T* v = src + byte * 8;
    uint8_t mask = 0;
    for (int i = 0; i < 8; ++i) {
      mask |= static_cast<uint8_t>(static_cast<Acc>(v[i]) > Acc(0)) << i;
    }
    packed[byte] = mask;
  }
  for (int64_t byte = std::max(byte_begin, full_end); byte < byte_end; ++byte) {  // tail
    uint8_t mask = 0;
    for (int64_t e = byte * 8; e < n; ++e) {
      mask |= static_cast<uint8_t>(static_cast<Acc>(src[e]) > Acc(0)) << (e - byte * 8);
    }
    packed[byte] = mask;
  }
}
VCFAST_ISA_DISPATCHED(void, leaky_relu_bits_task, (typename T), (T),
                      (const T* __restrict__ src, T* __restrict__ dst,
                       uint8_t* __restrict__ packed, int64_t n, int64_t byte_begin,
                       int64_t byte_end, at::opmath_type<T> slope),
                      (src, dst, packed, n, byte_begin, byte_end, slope))

// x * (bit ? 1 : slope) for bytes [byte_begin, byte_end): whole bytes with a constant trip
// count of 8 (vectorisable), then the tail byte.
template <typename T>
VCFAST_ALWAYS_INLINE void scale_by_bits_task_impl(const T* __restrict__ src, T* __restrict__ dst,
                                                  const uint8_t* __restrict__ packed, int64_t n,
                                                  int64_t byte_begin, int64_t byte_end,
                                                  at::opmath_type<T> slope) {
  using Acc = at::opmath_type<T>;
  const int64_t full_end = std::min<int64_t>(byte_end, n / 8);
  for (int64_t byte = byte_begin; byte < full_end; ++byte) {
    const uint8_t mask = packed[byte];
    const T* v = src + byte * 8;
    T* o = dst + byte * 8;
    for (int i = 0; i < 8; ++i) {
      const Acc x = static_cast<Acc>(v[i]);
      o[i] = static_cast<T>(((mask >> i) & 1) ? x : x * slope);
    }
  }
  for (int64_t byte = std::max(byte_begin, full_end); byte < byte_end; ++byte) {  // tail
    const uint8_t mask = packed[byte];
    for (int64_t e = byte * 8; e < n; ++e) {
      const Acc x = static_cast<Acc>(src[e]);
      dst[e] = static_cast<T>(((mask >> (e - byte * 8)) & 1) ? x : x * slope);
    }
  }
}
VCFAST_ISA_DISPATCHED(void, scale_by_bits_task, (typename T), (T),
                      (const T* __restrict__ src, T* __restrict__ dst,
                       const uint8_t* __restrict__ packed, int64_t n, int64_t byte_begin,
                       int64_t byte_end, at::opmath_type<T> slope),
                      (src, dst, packed, n, byte_begin, byte_end, slope))

// Sum of squares of one sample, in double. Eight independent partial sums: one running sum
// is a chain of dependent adds (its latency, not the arithmetic, sets the speed), and eight
// lanes also vectorise. The order is fixed, so the result is deterministic for a given
// instruction-set level (the AVX2/AVX-512 builds may fuse v * v + lane into one FMA).
template <typename T>
VCFAST_ALWAYS_INLINE double sum_of_squares_impl(const T* __restrict__ row, int64_t n) {
  using Acc = at::opmath_type<T>;
  constexpr int kLanes = 8;
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double v = static_cast<double>(static_cast<Acc>(row[i + j]));
      lane[j] += v * v;
    }
  }
  double sum = 0.0;
  for (int j = 0; j < kLanes; ++j) sum += lane[j];
  for (; i < n; ++i) {
    const double v = static_cast<double>(static_cast<Acc>(row[i]));
    sum += v * v;
  }
  return sum;
}
VCFAST_ISA_DISPATCHED(double, sum_of_squares, (typename T), (T),
                      (const T* __restrict__ row, int64_t n), (row, n))

// out = row * c.
template <typename T>
VCFAST_ALWAYS_INLINE void scale_row_impl(const T* __restrict__ row, T* __restrict__ out, int64_t n,
                                         at::opmath_type<T> c) {
  using Acc = at::opmath_type<T>;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<Acc>(row[i]) * c);
}
VCFAST_ISA_DISPATCHED(void, scale_row, (typename T), (T),
                      (const T* __restrict__ row, T* __restrict__ out, int64_t n,
                       at::opmath_type<T> c),
                      (row, out, n, c))

}  // namespace

std::tuple<at::Tensor, at::Tensor> leaky_relu_with_bits_cpu(const at::Tensor& z_in,
                                                            double negative_slope) {
  TORCH_CHECK_TYPE(z_in.is_floating_point(),
                   "vcfast::leaky_relu_with_bits: z must be floating point, got ", z_in.scalar_type());
  const at::Tensor z = z_in.contiguous();
  const int64_t n = z.numel();
  at::Tensor out = at::empty_like(z);
  at::Tensor bits = at::empty({(n + 7) / 8}, z.options().dtype(at::kByte));
  const int64_t n_bytes = bits.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vcfast_leaky_relu_with_bits", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const T* src = z.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    uint8_t* packed = bits.data_ptr<uint8_t>();
    const Acc slope = static_cast<Acc>(negative_slope);
    at::parallel_for(0, n_bytes, kBytesPerTask, [&](int64_t byte_begin, int64_t byte_end) {
      leaky_relu_bits_task<T>(src, dst, packed, n, byte_begin, byte_end, slope);
    });
  });
  return {out, bits};
}

at::Tensor scale_by_slope_bits_cpu(const at::Tensor& x_in, const at::Tensor& bits,
                                   double negative_slope) {
  TORCH_CHECK_TYPE(x_in.is_floating_point(),
                   "vcfast::scale_by_slope_bits: x must be floating point, got ", x_in.scalar_type());
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte,
                   "vcfast::scale_by_slope_bits: bits must be uint8, got ", bits.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor packed_bits = bits.contiguous();
  const int64_t n = x.numel();
  TORCH_CHECK_VALUE(packed_bits.numel() * 8 >= n, "vcfast::scale_by_slope_bits: bits holds ",
                    packed_bits.numel() * 8, " flags, fewer than x's ", n, " elements");
  at::Tensor out = at::empty_like(x);
  const int64_t n_bytes = (n + 7) / 8;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vcfast_scale_by_slope_bits", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const T* src = x.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    const uint8_t* packed = packed_bits.data_ptr<uint8_t>();
    const Acc slope = static_cast<Acc>(negative_slope);
    at::parallel_for(0, n_bytes, kBytesPerTask, [&](int64_t byte_begin, int64_t byte_end) {
      scale_by_bits_task<T>(src, dst, packed, n, byte_begin, byte_end, slope);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> penalty_terms_cpu(const at::Tensor& g_in, double target,
                                                     double weight) {
  TORCH_CHECK_TYPE(g_in.is_floating_point(),
                   "vcfast::penalty_terms: g must be floating point, got ", g_in.scalar_type());
  TORCH_CHECK_VALUE(g_in.dim() >= 1 && g_in.size(0) >= 1,
                    "vcfast::penalty_terms: g must be [N, ...] with N >= 1, got ", g_in.sizes());
  const at::Tensor g = g_in.contiguous();
  const int64_t batch = g.size(0);
  const int64_t per_sample = batch == 0 ? 0 : g.numel() / batch;
  at::Tensor u = at::empty_like(g);
  // The penalty is a float32 scalar for half inputs (reduced in float32), else g's dtype.
  const auto loss_dtype = at::toOpMathType(g.scalar_type());
  at::Tensor gp = at::empty({}, g.options().dtype(loss_dtype));
  at::Tensor norms = at::empty({batch}, g.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "vcfast_penalty_terms", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const T* src = g.data_ptr<T>();
    T* dst = u.data_ptr<T>();
    double* norm = norms.data_ptr<double>();
    // Per-sample sums of squares in double: the penalty compares a norm with 1, and a
    // float32 sum over 65 536 elements would carry needless rounding.
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const double sum = sum_of_squares<T>(src + b * per_sample, per_sample);
        norm[b] = std::sqrt(sum);
      }
    });
    double total = 0.0;
    for (int64_t b = 0; b < batch; ++b) total += (norm[b] - target) * (norm[b] - target);
    gp.fill_(weight * total / static_cast<double>(batch));
    // u_i = weight * 2 (n_i - target) / n_i * g_i / N; 0 where n_i = 0 (direction undefined).
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const double coeff = norm[b] > 0.0
                                 ? weight * 2.0 * (norm[b] - target) / norm[b] / static_cast<double>(batch)
                                 : 0.0;
        const Acc c = static_cast<Acc>(coeff);
        scale_row<T>(src + b * per_sample, dst + b * per_sample, per_sample, c);
      }
    });
  });
  return {gp, u};
}

}  // namespace vcfast
