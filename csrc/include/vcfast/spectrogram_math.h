// Per-bin math of the fused log-spectrogram, shared by the CPU and CUDA kernels.
//
// For one complex STFT coefficient X = re + i*im of a kept bin:
//   m = |X| / magnitude_scale
//   s = m ** power
//   l = ln(max(s + log_offset, log_floor))
//   z = (l - shift[bin]) * scale[bin]
//   y = clamp(z, clip_lo, clip_hi)            (clip bounds may be +-inf)
//
// The backward maps dL/dy to (dL/dre, dL/dim). Subgradient conventions follow
// PyTorch's own ops so the fused kernels agree with the reference chain:
//   * clamp passes the gradient where clip_lo <= z <= clip_hi (torch.clamp);
//   * max(u, floor) passes it where u >= floor (torch.clamp_min);
//   * |X| has gradient 0 at X = 0 (torch.abs uses sgn(0) = 0).
#pragma once

#include <cmath>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define VCFAST_HD __host__ __device__ __forceinline__
#else
#define VCFAST_HD inline
#endif

namespace vcfast {

template <typename T>
struct LogSpecParams {
  T magnitude_scale;  // |X| is divided by this (1024 for stargan_vc)
  T power;            // 1 = magnitude, 2 = power spectrum
  T log_offset;       // added before the log (1e-6 for specgan, 0 for stargan_vc)
  T log_floor;        // clamp_min before the log (1e-3 for stargan_vc, 0 for specgan)
  T clip_lo;          // final clamp; -inf disables
  T clip_hi;          // final clamp; +inf disables
};

// The op's scalar arguments arrive as doubles; kernels compute in T.
template <typename T>
inline LogSpecParams<T> make_logspec_params(double magnitude_scale, double power, double log_offset,
                                            double log_floor, double clip_lo, double clip_hi) {
  return LogSpecParams<T>{T(magnitude_scale), T(power), T(log_offset),
                          T(log_floor),       T(clip_lo), T(clip_hi)};
}

// Exponent of the magnitude, known at compile time for the common cases so the CPU loops
// over bins contain no branches and vectorise. kPowerAny uses pow() with the runtime value.
enum LogSpecPower : int { kPowerAny = 0, kPowerOne = 1, kPowerTwo = 2 };

template <int kPower, typename T>
VCFAST_HD T logspec_power(T m, T power) {
  if constexpr (kPower == kPowerOne) {
    return m;
  } else if constexpr (kPower == kPowerTwo) {
    return m * m;
  } else {
    return pow(m, power);
  }
}

// d(m^power)/dm
template <int kPower, typename T>
VCFAST_HD T logspec_power_grad(T m, T power) {
  if constexpr (kPower == kPowerOne) {
    return T(1);
  } else if constexpr (kPower == kPowerTwo) {
    return T(2) * m;
  } else {
    return power * pow(m, power - T(1));
  }
}

template <typename T>
VCFAST_HD int logspec_power_kind(const LogSpecParams<T>& p) {
  return p.power == T(1) ? kPowerOne : (p.power == T(2) ? kPowerTwo : kPowerAny);
}

template <typename T>
VCFAST_HD bool logspec_is_clipped(const LogSpecParams<T>& p) {
  return !(p.clip_lo == T(-INFINITY) && p.clip_hi == T(INFINITY));
}

// The forward is split around the logarithm so the CPU kernel can run the log itself
// vectorised over a block (ATen's SIMD log) while still using these exact formulas.
template <int kPower, typename T>
VCFAST_HD T logspec_prelog(T re, T im, const LogSpecParams<T>& p) {
  const T m = sqrt(re * re + im * im) / p.magnitude_scale;
  const T u = logspec_power<kPower>(m, p.power) + p.log_offset;
  // Written so a NaN u stays NaN (the comparison is false), matching torch.clamp_min.
  return u < p.log_floor ? p.log_floor : u;
}

template <typename T>
VCFAST_HD T logspec_postlog(T log_v, const LogSpecParams<T>& p, T shift, T scale) {
  const T z = (log_v - shift) * scale;
  // Comparisons with NaN are false, so a NaN z falls through unchanged, as torch.clamp does.
  if (z < p.clip_lo) return p.clip_lo;
  if (z > p.clip_hi) return p.clip_hi;
  return z;
}

template <typename T>
VCFAST_HD T logspec_forward(T re, T im, const LogSpecParams<T>& p, T shift, T scale) {
  T v;
  switch (logspec_power_kind(p)) {
    case kPowerOne: v = logspec_prelog<kPowerOne>(re, im, p); break;
    case kPowerTwo: v = logspec_prelog<kPowerTwo>(re, im, p); break;
    default: v = logspec_prelog<kPowerAny>(re, im, p); break;
  }
  return logspec_postlog(log(v), p, shift, scale);
}

// Branch-free for fixed (kPower, kClipped), so a CPU loop over bins vectorises.
template <int kPower, bool kClipped, typename T>
VCFAST_HD void logspec_backward_impl(T re, T im, T grad_y, const LogSpecParams<T>& p, T shift,
                                     T scale, T* grad_re, T* grad_im) {
  const T abs_x = sqrt(re * re + im * im);
  const T m = abs_x / p.magnitude_scale;
  const T u = logspec_power<kPower>(m, p.power) + p.log_offset;
  const bool floor_passes = u >= p.log_floor;
  const T v = floor_passes ? u : p.log_floor;
  bool clip_passes = true;
  if constexpr (kClipped) {  // the log is only needed to test the clip bounds
    const T z = (log(v) - shift) * scale;
    clip_passes = z >= p.clip_lo && z <= p.clip_hi;
  }
  // dy/d|X| = scale / v * power * m^(power-1) / magnitude_scale and d|X|/d(re, im) = (re, im)/|X|,
  // folded into one division (divisions, not the FFT, bound the CPU backward).
  const T g_over_abs_raw = grad_y * scale * logspec_power_grad<kPower>(m, p.power) /
                           (v * p.magnitude_scale * abs_x);
  const bool passes = floor_passes && clip_passes && abs_x > T(0);
  const T g_over_abs = passes ? g_over_abs_raw : T(0);
  *grad_re = g_over_abs * re;
  *grad_im = g_over_abs * im;
}

template <typename T>
VCFAST_HD void logspec_backward(T re, T im, T grad_y, const LogSpecParams<T>& p, T shift, T scale,
                                T* grad_re, T* grad_im) {
  const bool clipped = logspec_is_clipped(p);
  switch (logspec_power_kind(p) * 2 + (clipped ? 1 : 0)) {
    case kPowerOne * 2: return logspec_backward_impl<kPowerOne, false>(re, im, grad_y, p, shift, scale, grad_re, grad_im);
    case kPowerOne * 2 + 1: return logspec_backward_impl<kPowerOne, true>(re, im, grad_y, p, shift, scale, grad_re, grad_im);
    case kPowerTwo * 2: return logspec_backward_impl<kPowerTwo, false>(re, im, grad_y, p, shift, scale, grad_re, grad_im);
    case kPowerTwo * 2 + 1: return logspec_backward_impl<kPowerTwo, true>(re, im, grad_y, p, shift, scale, grad_re, grad_im);
    case kPowerAny * 2: return logspec_backward_impl<kPowerAny, false>(re, im, grad_y, p, shift, scale, grad_re, grad_im);
    default: return logspec_backward_impl<kPowerAny, true>(re, im, grad_y, p, shift, scale, grad_re, grad_im);
  }
}

// Calls f(std::integral_constant<int, kPower>, std::bool_constant<kClipped>) with the
// compile-time case matching p, so a host loop can be instantiated once per case.
template <typename T, typename F>
inline void logspec_dispatch(const LogSpecParams<T>& p, F&& f) {
  const bool clipped = logspec_is_clipped(p);
  const int power = logspec_power_kind(p);
  auto with_clip = [&](auto power_c) {
    if (clipped) {
      f(power_c, std::true_type{});
    } else {
      f(power_c, std::false_type{});
    }
  };
  if (power == kPowerOne) {
    with_clip(std::integral_constant<int, kPowerOne>{});
  } else if (power == kPowerTwo) {
    with_clip(std::integral_constant<int, kPowerTwo>{});
  } else {
    with_clip(std::integral_constant<int, kPowerAny>{});
  }
}

}  // namespace vcfast
