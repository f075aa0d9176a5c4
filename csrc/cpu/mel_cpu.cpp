// Fused log-mel spectrogram on the CPU: waveform -> windowed frames -> FFT -> |X|^power ->
// mel filterbank -> log -> per-band affine normalisation, in one pass over blocks of frames
// (docs/ops.md#log-mel-spectrogram).
//
// The same blocking as the log-spectrogram kernel (csrc/cpu/spectrogram_cpu.cpp): each
// parallel task windows a block of frames of one clip into a private buffer, runs ATen's
// real FFT on it, forms the power spectrum, multiplies it by the filterbank (one at::mm, or,
// for a filterbank of narrow bands such as the mel triangles, sums over the bands only), and
// writes only the final [n_mels] values of each frame. Nothing spectrum-sized exists for
// the whole batch; the centre padding is done by the caller (vcfast/ops/mel.py), whose
// autograd folds the padded samples' gradient back.
//
// Backward recomputes the block's FFT and mel values from the waveform (only the waveform is
// saved), maps dL/dy -> dL/dmel (log and floor) -> dL/dP (the filterbank product transposed,
// banded or one at::mm) -> dL/dX, and applies the adjoint of the windowed real DFT (a scaled
// inverse real FFT, DC and Nyquist counted as in spectrogram_cpu.cpp) before overlap-adding
// into dL/dwave. Threads own disjoint ranges of output samples, so the overlap-add needs no
// atomics and is deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/complex.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "framing.h"
#include "mel_cpu.h"
#include "vcfast/cpu_isa.h"

namespace vcfast {
namespace {

constexpr int64_t kFramesPerBlock = 32;

struct MelProblem {
  at::Tensor wave, window, filterbank, shift, scale;
  int64_t batch, samples, n_frames, n_freqs, n_mels;
};

MelProblem prepare_mel(const at::Tensor& wave, const at::Tensor& window,
                       const at::Tensor& filterbank, const at::Tensor& shift,
                       const at::Tensor& scale, int64_t n_fft, int64_t hop, double power,
                       double log_floor, double log_multiplier) {
  const char* fn = "vcfast::log_mel_spectrogram";
  TORCH_CHECK_VALUE(n_fft >= 2, fn, ": `n_fft` must be >= 2, got ", n_fft);
  TORCH_CHECK_VALUE(hop >= 1, fn, ": `hop` must be >= 1, got ", hop);
  TORCH_CHECK_VALUE(power > 0 && std::isfinite(power), fn, ": `power` must be > 0, got ",
                    power);
  TORCH_CHECK_VALUE(log_floor > 0 && std::isfinite(log_floor), fn,
                    ": `log_floor` must be > 0, got ", log_floor);
  TORCH_CHECK_VALUE(std::isfinite(log_multiplier), fn,
                    ": `log_multiplier` must be finite, got ", log_multiplier);
  TORCH_CHECK_TYPE(wave.scalar_type() == at::kFloat || wave.scalar_type() == at::kDouble, fn,
                   ": `wave` must be float32 or float64, got ", wave.scalar_type());
  TORCH_CHECK_VALUE(wave.dim() == 2, fn, ": `wave` must be [batch, samples], got ",
                    wave.sizes());
  TORCH_CHECK_VALUE(wave.size(1) >= n_fft, fn, ": `wave` has ", wave.size(1),
                    " samples, shorter than one frame of n_fft=", n_fft);
  const int64_t n_freqs = n_fft / 2 + 1;
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"window", &window}, {"filterbank", &filterbank}, {"shift", &shift}, {"scale", &scale}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK_TYPE(t->scalar_type() == wave.scalar_type(), fn, ": `", name,
                     "` must have wave's dtype ", wave.scalar_type(), ", got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == wave.device(), fn, ": `", name,
                      "` must be on wave's device ", wave.device(), ", got ", t->device());
  }
  TORCH_CHECK_VALUE(window.dim() == 1 && window.size(0) == n_fft, fn,
                    ": `window` must be [n_fft]=[", n_fft, "], got ", window.sizes());
  TORCH_CHECK_VALUE(filterbank.dim() == 2 && filterbank.size(0) == n_freqs &&
                        filterbank.size(1) >= 1,
                    fn, ": `filterbank` must be [n_fft // 2 + 1, n_mels]=[", n_freqs,
                    ", n_mels], got ", filterbank.sizes());
  const int64_t n_mels = filterbank.size(1);
  TORCH_CHECK_VALUE(shift.dim() == 1 && shift.size(0) == n_mels, fn,
                    ": `shift` must be [n_mels]=[", n_mels, "], got ", shift.sizes());
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == n_mels, fn,
                    ": `scale` must be [n_mels]=[", n_mels, "], got ", scale.sizes());
  MelProblem p;
  p.wave = wave.contiguous();
  p.window = window.contiguous();
  p.filterbank = filterbank.contiguous();
  p.shift = shift.contiguous();
  p.scale = scale.contiguous();
  p.batch = wave.size(0);
  p.samples = wave.size(1);
  p.n_frames = (p.samples - n_fft) / hop + 1;
  p.n_freqs = n_freqs;
  p.n_mels = n_mels;
  return p;
}

// The elementwise loops, each compiled at three instruction-set levels
// (csrc/include/vcfast/cpu_isa.h). kPower: 2 (re^2 + im^2), 1 (|X|) or 0 (|X|^power).

// |X|^power of `n` interleaved complex values.
template <typename T, int kPower>
VCFAST_ALWAYS_INLINE void mel_power_impl(const T* __restrict__ spec, int64_t n, T power,
                                         T* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) {
    const T re = spec[2 * i], im = spec[2 * i + 1];
    const T sq = re * re + im * im;
    if constexpr (kPower == 2) {
      out[i] = sq;
    } else if constexpr (kPower == 1) {
      out[i] = std::sqrt(sq);
    } else {
      out[i] = std::pow(std::sqrt(sq), power);
    }
  }
}
VCFAST_ISA_DISPATCHED(void, mel_power, (typename T, int kPower), (T, kPower),
                      (const T* __restrict__ spec, int64_t n, T power, T* __restrict__ out),
                      (spec, n, power, out))

// (multiplier * logged - shift) * scale, from the block's [count, n_mels] into out_row's
// [mel, frame] layout (the transpose happens here).
template <typename T>
VCFAST_ALWAYS_INLINE void mel_postlog_impl(const T* __restrict__ logged, int64_t count,
                                           int64_t n_mels, int64_t n_frames, int64_t f0,
                                           T multiplier, const T* __restrict__ shift,
                                           const T* __restrict__ scale, T* __restrict__ out_row) {
  for (int64_t m = 0; m < n_mels; ++m) {
    const T sh = shift[m];
    const T sc = scale[m];
    T* __restrict__ dst = out_row + m * n_frames + f0;
    const T* src = logged + m;
    for (int64_t j = 0; j < count; ++j) {
      dst[j] = (multiplier * src[j * n_mels] - sh) * sc;
    }
  }
}
VCFAST_ISA_DISPATCHED(void, mel_postlog, (typename T), (T),
                      (const T* __restrict__ logged, int64_t count, int64_t n_mels,
                       int64_t n_frames, int64_t f0, T multiplier, const T* __restrict__ shift,
                       const T* __restrict__ scale, T* __restrict__ out_row),
                      (logged, count, n_mels, n_frames, f0, multiplier, shift, scale, out_row))

// dL/dmel in place over gy ([count, n_mels]): gy * scale * multiplier / mel where
// mel >= log_floor (the floor's clamp passes the gradient there, as torch.clamp_min does),
// else 0.
template <typename T>
VCFAST_ALWAYS_INLINE void mel_grad_impl(const T* __restrict__ mel, T* __restrict__ gy,
                                        int64_t count, int64_t n_mels, T multiplier,
                                        T log_floor, const T* __restrict__ scale) {
  for (int64_t j = 0; j < count; ++j) {
    const T* __restrict__ mrow = mel + j * n_mels;
    T* __restrict__ grow = gy + j * n_mels;
    for (int64_t m = 0; m < n_mels; ++m) {
      const T v = mrow[m];
      const T g = grow[m] * scale[m] * multiplier / v;
      grow[m] = v >= log_floor ? g : T(0);
    }
  }
}
VCFAST_ISA_DISPATCHED(void, mel_grad, (typename T), (T),
                      (const T* __restrict__ mel, T* __restrict__ gy, int64_t count,
                       int64_t n_mels, T multiplier, T log_floor, const T* __restrict__ scale),
                      (mel, gy, count, n_mels, multiplier, log_floor, scale))

// dL/dX (interleaved re/im) of `n` bins from dL/dP, times `factor` (the adjoint's N/2).
// d|X|^p / d(re, im) = p |X|^(p - 2) (re, im); zero at X = 0 for p != 2, as the autograd of
// torch's complex abs gives.
template <typename T, int kPower>
VCFAST_ALWAYS_INLINE void mel_spectrum_grad_impl(const T* __restrict__ spec,
                                                 const T* __restrict__ gp, int64_t n, T power,
                                                 T factor, T* __restrict__ sg) {
  for (int64_t i = 0; i < n; ++i) {
    const T re = spec[2 * i], im = spec[2 * i + 1];
    T d;
    if constexpr (kPower == 2) {
      d = T(2) * gp[i] * factor;
    } else {
      const T sq = re * re + im * im;
      T per;
      if constexpr (kPower == 1) {
        per = T(1) / std::sqrt(sq);
      } else {
        per = power * std::pow(sq, (power - T(2)) / T(2));
      }
      d = sq > T(0) ? per * gp[i] * factor : T(0);
    }
    sg[2 * i] = d * re;
    sg[2 * i + 1] = d * im;
  }
}
VCFAST_ISA_DISPATCHED(void, mel_spectrum_grad, (typename T, int kPower), (T, kPower),
                      (const T* __restrict__ spec, const T* __restrict__ gp, int64_t n, T power,
                       T factor, T* __restrict__ sg),
                      (spec, gp, n, power, factor, sg))

// Mel filters are triangles a few bins wide: filter m is nonzero only on bins [lo[m], hi[m]).
// When the bands cover a small part of the matrix, the filterbank products run over the bands
// alone (a few percent of the dense matmul's work for the presets); a dense filterbank goes
// to at::mm.
template <typename T>
struct MelBands {
  std::vector<int64_t> lo, hi, offset;  // offset[m]: filter m's first weight in `weights`
  std::vector<T> weights;               // filter m's band, contiguous
};

template <typename T>
bool make_bands(const T* fb, int64_t n_freqs, int64_t n_mels, MelBands<T>* bands) {
  bands->lo.assign(n_mels, 0);
  bands->hi.assign(n_mels, 0);
  bands->offset.assign(n_mels, 0);
  int64_t total = 0;
  for (int64_t m = 0; m < n_mels; ++m) {
    int64_t lo = n_freqs, hi = 0;
    for (int64_t k = 0; k < n_freqs; ++k) {
      if (fb[k * n_mels + m] != T(0)) {
        lo = std::min(lo, k);
        hi = k + 1;
      }
    }
    if (hi == 0) lo = 0;  // an all-zero filter
    bands->lo[m] = lo;
    bands->hi[m] = hi;
    bands->offset[m] = total;
    total += hi - lo;
  }
  if (4 * total > n_freqs * n_mels) return false;
  bands->weights.resize(total);
  for (int64_t m = 0; m < n_mels; ++m) {
    for (int64_t k = bands->lo[m]; k < bands->hi[m]; ++k) {
      bands->weights[bands->offset[m] + k - bands->lo[m]] = fb[k * n_mels + m];
    }
  }
  return true;
}

// mel[j, m] = sum_k pw[j, k] fb[k, m] over the bands.
template <typename T>
VCFAST_ALWAYS_INLINE void mel_banded_mm_impl(const T* __restrict__ pw, int64_t count,
                                             int64_t n_freqs, int64_t n_mels,
                                             const int64_t* __restrict__ lo,
                                             const int64_t* __restrict__ hi,
                                             const int64_t* __restrict__ offset,
                                             const T* __restrict__ weights, T* __restrict__ mel) {
  for (int64_t j = 0; j < count; ++j) {
    const T* __restrict__ row = pw + j * n_freqs;
    for (int64_t m = 0; m < n_mels; ++m) {
      const T* __restrict__ w = weights + offset[m] - lo[m];
      T acc = T(0);
      for (int64_t k = lo[m]; k < hi[m]; ++k) acc += row[k] * w[k];
      mel[j * n_mels + m] = acc;
    }
  }
}
VCFAST_ISA_DISPATCHED(void, mel_banded_mm, (typename T), (T),
                      (const T* __restrict__ pw, int64_t count, int64_t n_freqs, int64_t n_mels,
                       const int64_t* __restrict__ lo, const int64_t* __restrict__ hi,
                       const int64_t* __restrict__ offset, const T* __restrict__ weights,
                       T* __restrict__ mel),
                      (pw, count, n_freqs, n_mels, lo, hi, offset, weights, mel))

// gp[j, k] = sum_m gm[j, m] fb[k, m] over the bands.
template <typename T>
VCFAST_ALWAYS_INLINE void mel_banded_mm_t_impl(const T* __restrict__ gm, int64_t count,
                                               int64_t n_freqs, int64_t n_mels,
                                               const int64_t* __restrict__ lo,
                                               const int64_t* __restrict__ hi,
                                               const int64_t* __restrict__ offset,
                                               const T* __restrict__ weights,
                                               T* __restrict__ gp) {
  for (int64_t j = 0; j < count; ++j) {
    T* __restrict__ row = gp + j * n_freqs;
    for (int64_t k = 0; k < n_freqs; ++k) row[k] = T(0);
    for (int64_t m = 0; m < n_mels; ++m) {
      const T g = gm[j * n_mels + m];
      const T* __restrict__ w = weights + offset[m] - lo[m];
      for (int64_t k = lo[m]; k < hi[m]; ++k) row[k] += g * w[k];
    }
  }
}
VCFAST_ISA_DISPATCHED(void, mel_banded_mm_t, (typename T), (T),
                      (const T* __restrict__ gm, int64_t count, int64_t n_freqs, int64_t n_mels,
                       const int64_t* __restrict__ lo, const int64_t* __restrict__ hi,
                       const int64_t* __restrict__ offset, const T* __restrict__ weights,
                       T* __restrict__ gp),
                      (gm, count, n_freqs, n_mels, lo, hi, offset, weights, gp))

template <typename F>
void power_dispatch(double power, F&& body) {
  if (power == 2.0) {
    body(std::integral_constant<int, 2>{});
  } else if (power == 1.0) {
    body(std::integral_constant<int, 1>{});
  } else {
    body(std::integral_constant<int, 0>{});
  }
}

// The forward of one block, shared by the forward and the backward (which recomputes it):
// `count` windowed frames from frame f0 of one waveform -> rfft -> |X|^power (into pw) ->
// mel energies (into mel's first `count` rows). Returns the block's spectrum.
template <typename T>
at::Tensor block_mel(const T* wave_row, const T* window, int64_t f0, int64_t count,
                     int64_t n_fft, int64_t hop, int64_t n_freqs, int64_t n_mels, double power,
                     bool banded, const MelBands<T>& bands, const at::Tensor& filterbank,
                     at::Tensor& frames, at::Tensor& pw, at::Tensor& mel) {
  window_frames(wave_row, window, f0, count, n_fft, hop, frames.data_ptr<T>());
  at::Tensor spectrum = at::fft_rfft(frames.narrow(0, 0, count), n_fft, -1);
  const T* spec = reinterpret_cast<const T*>(spectrum.data_ptr<c10::complex<T>>());
  power_dispatch(power, [&](auto power_c) {
    constexpr int kPower = decltype(power_c)::value;
    mel_power<T, kPower>(spec, count * n_freqs, T(power), pw.data_ptr<T>());
  });
  if (banded) {
    mel_banded_mm<T>(pw.data_ptr<T>(), count, n_freqs, n_mels, bands.lo.data(), bands.hi.data(),
                     bands.offset.data(), bands.weights.data(), mel.data_ptr<T>());
  } else {
    at::Tensor mel_block = mel.narrow(0, 0, count);
    at::mm_out(mel_block, pw.narrow(0, 0, count), filterbank);
  }
  return spectrum;
}

}  // namespace

at::Tensor log_mel_spectrogram_cpu(const at::Tensor& wave_in, const at::Tensor& window_in,
                                   const at::Tensor& filterbank_in, const at::Tensor& shift_in,
                                   const at::Tensor& scale_in, int64_t n_fft, int64_t hop,
                                   double power, double log_floor, double log_multiplier) {
  const MelProblem problem = prepare_mel(wave_in, window_in, filterbank_in, shift_in, scale_in,
                                         n_fft, hop, power, log_floor, log_multiplier);
  const at::Tensor& wave = problem.wave;
  const at::Tensor& filterbank = problem.filterbank;
  const int64_t batch = problem.batch, samples = problem.samples, n_frames = problem.n_frames;
  const int64_t n_freqs = problem.n_freqs, n_mels = problem.n_mels;
  at::Tensor out = at::empty({batch, n_mels, n_frames}, wave.options());
  if (batch == 0) return out;
  const int64_t blocks_per_row = (n_frames + kFramesPerBlock - 1) / kFramesPerBlock;

  AT_DISPATCH_FLOATING_TYPES(wave.scalar_type(), "vcfast_log_mel_spectrogram_cpu", [&] {
    using T = scalar_t;
    const T* wave_ptr = wave.data_ptr<T>();
    const T* window_ptr = problem.window.data_ptr<T>();
    const T* shift_ptr = problem.shift.data_ptr<T>();
    const T* scale_ptr = problem.scale.data_ptr<T>();
    T* out_ptr = out.data_ptr<T>();
    MelBands<T> bands;
    const bool banded = make_bands(filterbank.data_ptr<T>(), n_freqs, n_mels, &bands);

    at::parallel_for(0, batch * blocks_per_row, 1, [&](int64_t task_begin, int64_t task_end) {
      at::Tensor frames = at::empty({kFramesPerBlock, n_fft}, wave.options());
      at::Tensor pw = at::empty({kFramesPerBlock, n_freqs}, wave.options());
      at::Tensor mel = at::empty({kFramesPerBlock, n_mels}, wave.options());
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t b = task / blocks_per_row;
        const int64_t f0 = (task % blocks_per_row) * kFramesPerBlock;
        const int64_t count = std::min(kFramesPerBlock, n_frames - f0);
        block_mel<T>(wave_ptr + b * samples, window_ptr, f0, count, n_fft, hop, n_freqs, n_mels,
                     power, banded, bands, filterbank, frames, pw, mel);
        at::Tensor mel_block = mel.narrow(0, 0, count);
        // ATen's vectorised clamp and log (the log dominates the epilogue).
        mel_block.clamp_min_(log_floor).log_();
        mel_postlog<T>(mel.data_ptr<T>(), count, n_mels, n_frames, f0, T(log_multiplier),
                       shift_ptr, scale_ptr, out_ptr + b * n_mels * n_frames);
      }
    });
  });
  return out;
}

at::Tensor log_mel_spectrogram_backward_cpu(const at::Tensor& grad_in, const at::Tensor& wave_in,
                                            const at::Tensor& window_in,
                                            const at::Tensor& filterbank_in,
                                            const at::Tensor& shift_in, const at::Tensor& scale_in,
                                            int64_t n_fft, int64_t hop, double power,
                                            double log_floor, double log_multiplier) {
  const MelProblem problem = prepare_mel(wave_in, window_in, filterbank_in, shift_in, scale_in,
                                         n_fft, hop, power, log_floor, log_multiplier);
  const at::Tensor& wave = problem.wave;
  const at::Tensor& filterbank = problem.filterbank;
  const int64_t batch = problem.batch, samples = problem.samples, n_frames = problem.n_frames;
  const int64_t n_freqs = problem.n_freqs, n_mels = problem.n_mels;
  TORCH_CHECK_VALUE(grad_in.dim() == 3 && grad_in.size(0) == batch &&
                        grad_in.size(1) == n_mels && grad_in.size(2) == n_frames,
                    "vcfast::log_mel_spectrogram_backward: `grad` must be [batch, n_mels, "
                    "n_frames]=[", batch, ", ", n_mels, ", ", n_frames, "], got ",
                    grad_in.sizes());
  TORCH_CHECK_TYPE(grad_in.is_floating_point(),
                   "vcfast::log_mel_spectrogram_backward: `grad` must be floating, got ",
                   grad_in.scalar_type());
  // Any strides: the dL/dy of a .sum() is an expanded scalar, and making it contiguous would
  // allocate a spectrogram-sized tensor for nothing.
  const at::Tensor grad = grad_in.to(wave.scalar_type());
  const int64_t grad_stride_b = grad.stride(0);
  const int64_t grad_stride_m = grad.stride(1);
  const int64_t grad_stride_f = grad.stride(2);
  // Each task zeroes the samples it owns before adding into them (in parallel, and the
  // first touch of the pages is by the thread that writes them).
  at::Tensor grad_wave = at::empty_like(wave);
  if (batch == 0) return grad_wave;
  const at::Tensor filterbank_t = filterbank.t();

  // Output samples are split into ranges of kFramesPerBlock hops; the last range also owns
  // the tail after the last hop boundary. Frames overlapping a range are those with
  // f*hop < range_end and f*hop + n_fft > range_begin.
  const int64_t ranges_per_row = (n_frames + kFramesPerBlock - 1) / kFramesPerBlock;
  const int64_t max_frames = kFramesPerBlock + (n_fft + hop - 1) / hop;

  AT_DISPATCH_FLOATING_TYPES(wave.scalar_type(), "vcfast_log_mel_spectrogram_backward_cpu", [&] {
    using T = scalar_t;
    using C = c10::complex<T>;
    const T* wave_ptr = wave.data_ptr<T>();
    const T* window_ptr = problem.window.data_ptr<T>();
    const T* scale_ptr = problem.scale.data_ptr<T>();
    const T* grad_ptr = grad.data_ptr<T>();
    T* grad_wave_ptr = grad_wave.data_ptr<T>();
    const T interior_factor = T(n_fft) / T(2);
    const bool has_nyquist = n_fft % 2 == 0;
    MelBands<T> bands;
    const bool banded = make_bands(filterbank.data_ptr<T>(), n_freqs, n_mels, &bands);

    at::parallel_for(0, batch * ranges_per_row, 1, [&](int64_t task_begin, int64_t task_end) {
      at::Tensor frames = at::empty({max_frames, n_fft}, wave.options());
      at::Tensor pw = at::empty({max_frames, n_freqs}, wave.options());
      at::Tensor mel = at::empty({max_frames, n_mels}, wave.options());
      at::Tensor gy = at::empty({max_frames, n_mels}, wave.options());
      at::Tensor spec_grad =
          at::empty({max_frames, n_freqs}, wave.options().dtype(c10::toComplexType(
                                                wave.scalar_type())));
      for (int64_t task = task_begin; task < task_end; ++task) {
        const OutputRange range = output_range(task, ranges_per_row, kFramesPerBlock, hop, n_fft,
                                               samples, n_frames);
        const int64_t b = range.b, f_first = range.f_first, f_last = range.f_last;
        T* gw_row = grad_wave_ptr + b * samples;
        std::fill(gw_row + range.begin, gw_row + range.end, T(0));
        if (f_last < f_first) continue;
        const int64_t count = f_last - f_first + 1;
        const at::Tensor spectrum =
            block_mel<T>(wave_ptr + b * samples, window_ptr, f_first, count, n_fft, hop, n_freqs,
                         n_mels, power, banded, bands, filterbank, frames, pw, mel);
        const T* spec = reinterpret_cast<const T*>(spectrum.data_ptr<C>());
        // This block's dL/dy as [count, n_mels], so the loops below run over contiguous rows.
        const T* grad_row = grad_ptr + b * grad_stride_b + f_first * grad_stride_f;
        T* gy_ptr = gy.data_ptr<T>();
        for (int64_t j = 0; j < count; ++j) {
          for (int64_t m = 0; m < n_mels; ++m) {
            gy_ptr[j * n_mels + m] = grad_row[m * grad_stride_m + j * grad_stride_f];
          }
        }
        mel_grad<T>(mel.data_ptr<T>(), gy_ptr, count, n_mels, T(log_multiplier), T(log_floor),
                    scale_ptr);
        // dL/dP = dL/dmel @ fb^T, into pw (the power spectrum is no longer needed).
        if (banded) {
          mel_banded_mm_t<T>(gy_ptr, count, n_freqs, n_mels, bands.lo.data(), bands.hi.data(),
                             bands.offset.data(), bands.weights.data(), pw.data_ptr<T>());
        } else {
          at::Tensor power_grad = pw.narrow(0, 0, count);
          at::mm_out(power_grad, gy.narrow(0, 0, count), filterbank_t);
        }
        T* sg = reinterpret_cast<T*>(spec_grad.data_ptr<C>());
        power_dispatch(power, [&](auto power_c) {
          constexpr int kPower = decltype(power_c)::value;
          mel_spectrum_grad<T, kPower>(spec, pw.data_ptr<T>(), count * n_freqs, T(power),
                                       interior_factor, sg);
        });
        // irfft(G')[n] equals the DFT adjoint sum_k (Gr_k cos - Gi_k sin) when G'_k = G_k * N/2
        // (applied above), except at DC (and Nyquist for even N), which irfft counts once
        // rather than twice.
        spec_grad.select(1, 0).narrow(0, 0, count).mul_(T(2));
        if (has_nyquist) spec_grad.select(1, n_freqs - 1).narrow(0, 0, count).mul_(T(2));
        const at::Tensor frame_grad = at::fft_irfft(spec_grad.narrow(0, 0, count), n_fft, -1);
        const T* fg = frame_grad.data_ptr<T>();
        overlap_add_windowed(fg, count, range, hop, n_fft, window_ptr, gw_row);
      }
    });
  });
  return grad_wave;
}

}  // namespace vcfast
