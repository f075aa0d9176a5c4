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

template <typename T>
VCFAST_HD T logspec_power(T m, T power) {
  // pow(m, 1) and pow(m, 2) are the common cases; avoid the transcendental there.
  if (power == T(1)) return m;
  if (power == T(2)) return m * m;
  return pow(m, power);
}

// The forward is split around the logarithm so the CPU kernel can run the log itself
// vectorised over a block (ATen's SIMD log) while still using these exact formulas.
template <typename T>
VCFAST_HD T logspec_prelog(T re, T im, const LogSpecParams<T>& p) {
  const T m = sqrt(re * re + im * im) / p.magnitude_scale;
  const T u = logspec_power(m, p.power) + p.log_offset;
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
  return logspec_postlog(log(logspec_prelog(re, im, p)), p, shift, scale);
}

template <typename T>
VCFAST_HD T logspec_power_grad(T m, T power) {
  if (power == T(1)) return T(1);
  if (power == T(2)) return T(2) * m;
  return power * pow(m, power - T(1));
}

// Branch-free apart from loop-invariant tests on the parameters, so a CPU loop over bins
// vectorises; every path computes the same values a branchy version would.
template <typename T>
VCFAST_HD void logspec_backward(T re, T im, T grad_y, const LogSpecParams<T>& p, T shift, T scale,
                                T* grad_re, T* grad_im) {
  const T abs_x = sqrt(re * re + im * im);
  const T m = abs_x / p.magnitude_scale;
  const T u = logspec_power(m, p.power) + p.log_offset;
  const bool floor_passes = u >= p.log_floor;
  const T v = floor_passes ? u : p.log_floor;
  // The log is only needed to test the clip bounds; skip it when there are none.
  const bool unclipped = p.clip_lo == T(-INFINITY) && p.clip_hi == T(INFINITY);
  bool clip_passes = true;
  if (!unclipped) {
    const T z = (log(v) - shift) * scale;
    clip_passes = z >= p.clip_lo && z <= p.clip_hi;
  }
  // d y / d|X| = scale / v * power * m^(power-1) / magnitude_scale; d|X|/d(re, im) = (re, im)/|X|
  const T g_abs = grad_y * scale / v * logspec_power_grad(m, p.power) / p.magnitude_scale;
  const bool passes = floor_passes && clip_passes && abs_x > T(0);
  const T g_over_abs = passes ? g_abs / abs_x : T(0);
  *grad_re = g_over_abs * re;
  *grad_im = g_over_abs * im;
}

}  // namespace vcfast
