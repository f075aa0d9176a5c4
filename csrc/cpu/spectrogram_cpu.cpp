// Fused log-spectrogram on the CPU: waveform -> windowed frames -> FFT -> kept bins ->
// magnitude/log/normalisation, in one pass over blocks of frames.
//
// Why blocks: the torch.stft chain materialises the full complex spectrum (513 bins x
// frames) and then makes one memory pass per elementwise op; at these sizes that
// memory traffic, not the FFT, is the cost. Here each thread windows a small block of
// frames into a private buffer, runs the FFT on it (ATen's FFT: MKL or pocketfft), and
// writes only the final values of the kept bins. Nothing spectrum-sized outlives a block.
//
// Backward recomputes the block's FFT from the waveform (only the waveform is saved),
// maps dL/dy to dL/dX with the shared per-bin math, and applies the adjoint of the
// windowed real DFT (a scaled inverse real FFT) before overlap-adding into dL/dwave.
// Threads own disjoint ranges of output samples, so the overlap-add needs no atomics
// and is deterministic; frames straddling two ranges are recomputed by both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "framing.h"
#include "vcfast/cpu_isa.h"
#include "vcfast/spectrogram_math.h"
#include "spectrogram_cpu.h"

namespace vcfast {
namespace {

constexpr int64_t kFramesPerBlock = 32;

// The forward's two elementwise loops over a block, each compiled at three instruction-set
// levels (csrc/include/vcfast/cpu_isa.h).

// Pre-log values of the kept bins of `count` frames, [count, n_bins] in the spectrum's own
// order (so the loop streams and vectorises). Returns nonzero when one is NaN or +Inf: a
// NaN or Inf sample makes every bin of its frame non-finite (Inf * twiddle and 0 * Inf are
// NaN), so checking the kept bins checks the input without another pass.
template <typename T, int kPower>
VCFAST_ALWAYS_INLINE int spectrum_prelog_impl(const T* __restrict__ spec, int64_t count,
                                              int64_t n_rfft, int64_t bin_lo, int64_t n_bins,
                                              const LogSpecParams<T>& params,
                                              T* __restrict__ pre) {
  int nonfinite = 0;  // an int OR-reduction vectorises; a bool one does not
  const T largest = std::numeric_limits<T>::max();
  for (int64_t j = 0; j < count; ++j) {
    const T* __restrict__ src = spec + 2 * (j * n_rfft + bin_lo);
    T* __restrict__ dst = pre + j * n_bins;
    for (int64_t k = 0; k < n_bins; ++k) {
      const T v = logspec_prelog<kPower>(src[2 * k], src[2 * k + 1], params);
      nonfinite |= !(v <= largest);  // true for NaN and +Inf
      dst[k] = v;
    }
  }
  return nonfinite;
}
VCFAST_ISA_DISPATCHED(int, spectrum_prelog, (typename T, int kPower), (T, kPower),
                      (const T* __restrict__ spec, int64_t count, int64_t n_rfft,
                       int64_t bin_lo, int64_t n_bins, const LogSpecParams<T>& params,
                       T* __restrict__ pre),
                      (spec, count, n_rfft, bin_lo, n_bins, params, pre))

// Shift, scale and clip the logged block into out_row's [bin, frame] layout (the transpose
// happens here, in the cheapest pass).
template <typename T>
VCFAST_ALWAYS_INLINE void spectrum_postlog_impl(const T* __restrict__ pre, int64_t count,
                                                int64_t n_bins, int64_t n_frames, int64_t f0,
                                                const LogSpecParams<T>& params,
                                                const T* __restrict__ shift,
                                                const T* __restrict__ scale,
                                                T* __restrict__ out_row) {
  for (int64_t k = 0; k < n_bins; ++k) {
    const T sh = shift[k];
    const T sc = scale[k];
    T* dst = out_row + k * n_frames + f0;
    const T* src = pre + k;
    for (int64_t j = 0; j < count; ++j) {
      dst[j] = logspec_postlog<T>(src[j * n_bins], params, sh, sc);
    }
  }
}
VCFAST_ISA_DISPATCHED(void, spectrum_postlog, (typename T), (T),
                      (const T* __restrict__ pre, int64_t count, int64_t n_bins,
                       int64_t n_frames, int64_t f0, const LogSpecParams<T>& params,
                       const T* __restrict__ shift, const T* __restrict__ scale,
                       T* __restrict__ out_row),
                      (pre, count, n_bins, n_frames, f0, params, shift, scale, out_row))

// dL/dX of the kept bins of `count` frames from dL/dy ([count, n_bins]), times
// interior_factor (see the backward), in the spectrum's interleaved re/im layout.
template <typename T, int kPower, bool kClipped>
VCFAST_ALWAYS_INLINE void spectrum_grad_impl(const T* __restrict__ spec, T* __restrict__ sg,
                                             const T* __restrict__ gy, int64_t count,
                                             int64_t n_rfft, int64_t bin_lo, int64_t n_bins,
                                             const LogSpecParams<T>& params,
                                             const T* __restrict__ shift,
                                             const T* __restrict__ scale, T interior_factor) {
  for (int64_t j = 0; j < count; ++j) {
    const T* x = spec + 2 * (j * n_rfft + bin_lo);
    T* g = sg + 2 * (j * n_rfft + bin_lo);
    const T* gy_row = gy + j * n_bins;
    for (int64_t k = 0; k < n_bins; ++k) {
      T gr, gi;
      logspec_backward_impl<kPower, kClipped>(x[2 * k], x[2 * k + 1], gy_row[k], params,
                                              shift[k], scale[k], &gr, &gi);
      g[2 * k] = gr * interior_factor;
      g[2 * k + 1] = gi * interior_factor;
    }
  }
}
VCFAST_ISA_DISPATCHED(void, spectrum_grad, (typename T, int kPower, bool kClipped),
                      (T, kPower, kClipped),
                      (const T* __restrict__ spec, T* __restrict__ sg, const T* __restrict__ gy,
                       int64_t count, int64_t n_rfft, int64_t bin_lo, int64_t n_bins,
                       const LogSpecParams<T>& params, const T* __restrict__ shift,
                       const T* __restrict__ scale, T interior_factor),
                      (spec, sg, gy, count, n_rfft, bin_lo, n_bins, params, shift, scale,
                       interior_factor))

}  // namespace

at::Tensor log_spectrogram_cpu(const at::Tensor& wave_in, const at::Tensor& window_in,
                               const at::Tensor& shift_in, const at::Tensor& scale_in,
                               int64_t n_fft, int64_t hop, int64_t bin_lo, int64_t bin_hi,
                               double magnitude_scale, double power, double log_offset,
                               double log_floor, double clip_lo, double clip_hi,
                               bool check_finite) {
  const SpectrogramProblem problem =
      prepare_spectrogram(wave_in, window_in, shift_in, scale_in, n_fft, hop, bin_lo, bin_hi);
  const at::Tensor& wave = problem.wave;
  const at::Tensor& window = problem.window;
  const at::Tensor& shift = problem.shift;
  const at::Tensor& scale = problem.scale;
  const int64_t batch = problem.batch, samples = problem.samples, n_frames = problem.n_frames;
  const int64_t n_bins = problem.n_bins, n_rfft = problem.n_rfft;
  at::Tensor out = at::empty({batch, n_bins, n_frames}, wave.options());
  if (batch == 0) return out;

  const int64_t blocks_per_row = (n_frames + kFramesPerBlock - 1) / kFramesPerBlock;
  std::atomic<bool> all_finite{true};

  AT_DISPATCH_FLOATING_TYPES(wave.scalar_type(), "vcfast_log_spectrogram_cpu", [&] {
    using T = scalar_t;
    const auto params =
        make_logspec_params<T>(magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi);
    const T* wave_ptr = wave.data_ptr<T>();
    const T* window_ptr = window.data_ptr<T>();
    const T* shift_ptr = shift.data_ptr<T>();
    const T* scale_ptr = scale.data_ptr<T>();
    T* out_ptr = out.data_ptr<T>();

    at::parallel_for(0, batch * blocks_per_row, 1, [&](int64_t task_begin, int64_t task_end) {
      at::Tensor frames = at::empty({kFramesPerBlock, n_fft}, wave.options());
      at::Tensor prelog = at::empty({n_bins * kFramesPerBlock}, wave.options());
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t b = task / blocks_per_row;
        const int64_t f0 = (task % blocks_per_row) * kFramesPerBlock;
        const int64_t count = std::min(kFramesPerBlock, n_frames - f0);
        const T* wave_row = wave_ptr + b * samples;
        window_frames(wave_row, window_ptr, f0, count, n_fft, hop, frames.data_ptr<T>());
        const at::Tensor spectrum = at::fft_rfft(frames.narrow(0, 0, count), n_fft, -1);
        const c10::complex<T>* spec = spectrum.data_ptr<c10::complex<T>>();
        T* pre = prelog.data_ptr<T>();
        int nonfinite = 0;
        logspec_dispatch(params, [&](auto power_c, auto /*clipped*/) {
          constexpr int kPower = decltype(power_c)::value;
          nonfinite = spectrum_prelog<T, kPower>(reinterpret_cast<const T*>(spec), count, n_rfft,
                                                 bin_lo, n_bins, params, pre);
        });
        if (nonfinite) all_finite.store(false, std::memory_order_relaxed);
        // The log dominates the epilogue; ATen's vectorised log is several times faster
        // than a scalar loop.
        prelog.narrow(0, 0, n_bins * count).log_();
        spectrum_postlog<T>(pre, count, n_bins, n_frames, f0, params, shift_ptr, scale_ptr,
                            out_ptr + b * n_bins * n_frames);
      }
    });
  });
  TORCH_CHECK_VALUE(!check_finite || all_finite.load(),
                    "vcfast.log_spectrogram: wave contains NaN or Inf (nan_policy='raise'); "
                    "clean the audio or pass nan_policy='propagate'");
  return out;
}

at::Tensor log_spectrogram_backward_cpu(const at::Tensor& grad_in, const at::Tensor& wave_in,
                                        const at::Tensor& window_in, const at::Tensor& shift_in,
                                        const at::Tensor& scale_in, int64_t n_fft, int64_t hop,
                                        int64_t bin_lo, int64_t bin_hi, double magnitude_scale,
                                        double power, double log_offset, double log_floor,
                                        double clip_lo, double clip_hi) {
  const SpectrogramProblem problem =
      prepare_spectrogram(wave_in, window_in, shift_in, scale_in, n_fft, hop, bin_lo, bin_hi);
  const at::Tensor& wave = problem.wave;
  const at::Tensor& window = problem.window;
  const at::Tensor& shift = problem.shift;
  const at::Tensor& scale = problem.scale;
  const int64_t batch = problem.batch, samples = problem.samples, n_frames = problem.n_frames;
  const int64_t n_bins = problem.n_bins, n_rfft = problem.n_rfft;
  check_spectrogram_grad(grad_in, problem);
  // Any strides: the common dL/dy of a .sum() is an expanded scalar, and making it
  // contiguous would allocate a spectrogram-sized tensor for nothing.
  const at::Tensor grad = grad_in.to(wave.scalar_type());
  const int64_t grad_stride_b = grad.stride(0);
  const int64_t grad_stride_k = grad.stride(1);
  const int64_t grad_stride_f = grad.stride(2);
  at::Tensor grad_wave = at::zeros_like(wave);
  if (batch == 0) return grad_wave;

  // Output samples are split into ranges of kFramesPerBlock hops; the last range also
  // owns the tail after the last hop boundary. Frames overlapping a range are those
  // with f*hop < range_end and f*hop + n_fft > range_begin.
  const int64_t ranges_per_row = (n_frames + kFramesPerBlock - 1) / kFramesPerBlock;
  const int64_t max_frames_per_range = kFramesPerBlock + (n_fft + hop - 1) / hop;

  AT_DISPATCH_FLOATING_TYPES(wave.scalar_type(), "vcfast_log_spectrogram_backward_cpu", [&] {
    using T = scalar_t;
    using C = c10::complex<T>;
    const auto params =
        make_logspec_params<T>(magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi);
    const T* wave_ptr = wave.data_ptr<T>();
    const T* window_ptr = window.data_ptr<T>();
    const T* shift_ptr = shift.data_ptr<T>();
    const T* scale_ptr = scale.data_ptr<T>();
    const T* grad_ptr = grad.data_ptr<T>();
    T* grad_wave_ptr = grad_wave.data_ptr<T>();
    const T interior_factor = T(n_fft) / T(2);
    const bool has_nyquist = n_fft % 2 == 0;

    at::parallel_for(0, batch * ranges_per_row, 1, [&](int64_t task_begin, int64_t task_end) {
      at::Tensor frames = at::empty({max_frames_per_range, n_fft}, wave.options());
      at::Tensor spec_grad = at::empty({max_frames_per_range, n_rfft},
                                       frames.options().dtype(c10::toComplexType(wave.scalar_type())));
      at::Tensor grad_block = at::empty({max_frames_per_range * n_bins}, wave.options());
      for (int64_t task = task_begin; task < task_end; ++task) {
        const OutputRange range = output_range(task, ranges_per_row, kFramesPerBlock, hop, n_fft,
                                               samples, n_frames);
        const int64_t b = range.b, f_first = range.f_first, f_last = range.f_last;
        if (f_last < f_first) continue;
        const int64_t count = f_last - f_first + 1;
        const T* wave_row = wave_ptr + b * samples;
        window_frames(wave_row, window_ptr, f_first, count, n_fft, hop, frames.data_ptr<T>());
        const at::Tensor spectrum = at::fft_rfft(frames.narrow(0, 0, count), n_fft, -1);
        const C* spec = spectrum.data_ptr<C>();
        C* sg = spec_grad.data_ptr<C>();
        for (int64_t j = 0; j < count; ++j) {  // bins outside the kept range get no gradient
          std::fill(sg + j * n_rfft, sg + j * n_rfft + bin_lo, C(0, 0));
          std::fill(sg + j * n_rfft + bin_hi, sg + (j + 1) * n_rfft, C(0, 0));
        }
        // Transpose this block's dL/dy to [count, n_bins] so the per-bin loop below reads
        // and writes only contiguous memory and vectorises.
        const T* grad_row = grad_ptr + b * grad_stride_b + f_first * grad_stride_f;
        T* gy = grad_block.data_ptr<T>();
        for (int64_t k = 0; k < n_bins; ++k) {
          for (int64_t j = 0; j < count; ++j) {
            gy[j * n_bins + k] = grad_row[k * grad_stride_k + j * grad_stride_f];
          }
        }
        logspec_dispatch(params, [&](auto power_c, auto clipped_c) {
          constexpr int kPower = decltype(power_c)::value;
          constexpr bool kClipped = decltype(clipped_c)::value;
          spectrum_grad<T, kPower, kClipped>(reinterpret_cast<const T*>(spec),
                                             reinterpret_cast<T*>(sg), gy, count, n_rfft,
                                             bin_lo, n_bins, params, shift_ptr, scale_ptr,
                                             interior_factor);
        });
        // irfft(G')[n] equals the DFT adjoint sum_k (Gr_k cos - Gi_k sin) when G'_k = G_k * N/2
        // (applied above), except at DC (and Nyquist for even N), which irfft counts once
        // rather than twice.
        if (bin_lo == 0) spec_grad.select(1, 0).narrow(0, 0, count).mul_(T(2));
        if (has_nyquist && bin_hi == n_rfft) {
          spec_grad.select(1, n_rfft - 1).narrow(0, 0, count).mul_(T(2));
        }
        const at::Tensor frame_grad = at::fft_irfft(spec_grad.narrow(0, 0, count), n_fft, -1);
        const T* fg = frame_grad.data_ptr<T>();
        T* gw_row = grad_wave_ptr + b * samples;
        overlap_add_windowed(fg, count, range, hop, n_fft, window_ptr, gw_row);
      }
    });
  });
  return grad_wave;
}

}  // namespace vcfast
