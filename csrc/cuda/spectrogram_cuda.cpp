// Host side of the CUDA log-spectrogram: frames are a strided view of the waveform, the
// FFT is cuFFT through ATen, and the fused epilogues in spectrogram_kernels.cu do the rest.
// Compiled by the host C++ compiler (not nvcc) because it needs the torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "cpu/spectrogram_cpu.h"
#include "cuda/spectrogram_kernels.h"

namespace vcfast {
namespace {

// [batch, n_frames, n_rfft] complex spectrum of the windowed frames, as interleaved reals.
at::Tensor windowed_spectrum(const at::Tensor& wave, const at::Tensor& window, int64_t n_fft,
                             int64_t hop) {
  const at::Tensor frames = wave.unfold(1, n_fft, hop) * window;
  return at::view_as_real(at::fft_rfft(frames, n_fft, -1)).contiguous();
}

at::Tensor log_spectrogram_cuda(const at::Tensor& wave_in, const at::Tensor& window_in,
                                const at::Tensor& shift_in, const at::Tensor& scale_in,
                                int64_t n_fft, int64_t hop, int64_t bin_lo, int64_t bin_hi,
                                double magnitude_scale, double power, double log_offset,
                                double log_floor, double clip_lo, double clip_hi,
                                bool check_finite) {
  const c10::cuda::CUDAGuard guard(wave_in.device());
  const SpectrogramProblem problem =
      prepare_spectrogram(wave_in, window_in, shift_in, scale_in, n_fft, hop, bin_lo, bin_hi);
  const at::Tensor& wave = problem.wave;
  const at::Tensor& shift = problem.shift;
  const at::Tensor& scale = problem.scale;
  const int64_t batch = problem.batch, n_frames = problem.n_frames, n_bins = problem.n_bins;
  if (check_finite) {
    const int64_t used = (n_frames - 1) * hop + n_fft;
    TORCH_CHECK_VALUE(at::isfinite(wave.narrow(1, 0, used)).all().item<bool>(),
                      "vcfast.log_spectrogram: wave contains NaN or Inf (nan_policy='raise'); "
                      "clean the audio or pass nan_policy='propagate'");
  }
  at::Tensor out = at::empty({batch, n_bins, n_frames}, wave.options());
  if (batch == 0) return out;
  const at::Tensor spec = windowed_spectrum(wave, problem.window, n_fft, hop);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(wave.scalar_type(), "vcfast_log_spectrogram_cuda", [&] {
    launch_logspec_fwd_epilogue<scalar_t>(
        spec.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), batch, n_frames, n_fft / 2 + 1, bin_lo, n_bins,
        make_logspec_params<scalar_t>(magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi),
        stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor log_spectrogram_backward_cuda(const at::Tensor& grad_in, const at::Tensor& wave_in,
                                         const at::Tensor& window_in, const at::Tensor& shift_in,
                                         const at::Tensor& scale_in, int64_t n_fft, int64_t hop,
                                         int64_t bin_lo, int64_t bin_hi, double magnitude_scale,
                                         double power, double log_offset, double log_floor,
                                         double clip_lo, double clip_hi) {
  const c10::cuda::CUDAGuard guard(wave_in.device());
  const SpectrogramProblem problem =
      prepare_spectrogram(wave_in, window_in, shift_in, scale_in, n_fft, hop, bin_lo, bin_hi);
  check_spectrogram_grad(grad_in, problem);
  const at::Tensor& wave = problem.wave;
  const at::Tensor& window = problem.window;
  const at::Tensor& shift = problem.shift;
  const at::Tensor& scale = problem.scale;
  const int64_t batch = problem.batch, samples = problem.samples, n_frames = problem.n_frames;
  const int64_t n_bins = problem.n_bins;
  const at::Tensor grad = grad_in.to(wave.scalar_type()).contiguous();
  at::Tensor grad_wave = at::empty_like(wave);
  if (batch == 0) return grad_wave;
  const at::Tensor spec = windowed_spectrum(wave, window, n_fft, hop);
  at::Tensor spec_grad = at::empty_like(spec);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(wave.scalar_type(), "vcfast_log_spectrogram_backward_cuda", [&] {
    launch_logspec_bwd_epilogue<scalar_t>(
        spec.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
        scale.data_ptr<scalar_t>(), spec_grad.data_ptr<scalar_t>(), batch, n_frames, n_fft,
        bin_lo, n_bins,
        make_logspec_params<scalar_t>(magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi),
        stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor frame_grad =
        at::fft_irfft(at::view_as_complex(spec_grad), n_fft, -1).contiguous();
    launch_overlap_add<scalar_t>(frame_grad.data_ptr<scalar_t>(), window.data_ptr<scalar_t>(),
                                 grad_wave.data_ptr<scalar_t>(), batch, samples, n_frames, n_fft,
                                 hop, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_wave;
}

}  // namespace
}  // namespace vcfast

TORCH_LIBRARY_IMPL(vcfast, CUDA, m) {
  m.impl("log_spectrogram", &vcfast::log_spectrogram_cuda);
  m.impl("log_spectrogram_backward", &vcfast::log_spectrogram_backward_cuda);
}
