// Argument checks of the fused log-spectrogram: the one place they are written, shared by the
// CPU kernel (csrc/cpu/spectrogram_cpu.cpp) and the CUDA one (csrc/cuda/spectrogram_cuda.cpp).
// prepare_spectrogram() raises a clear error for anything that would make a kernel read out of
// bounds, so the ops are safe when called directly via torch.ops.vcfast.
#include <ATen/ATen.h>

#include "cpu/spectrogram_cpu.h"

namespace vcfast {

SpectrogramProblem prepare_spectrogram(const at::Tensor& wave, const at::Tensor& window,
                                       const at::Tensor& shift, const at::Tensor& scale,
                                       int64_t n_fft, int64_t hop, int64_t bin_lo, int64_t bin_hi) {
  // The Python wrapper validates with friendlier messages; these checks keep the op safe
  // when called directly through torch.ops.vcfast.
  TORCH_CHECK_VALUE(wave.dim() == 2, "vcfast::log_spectrogram: wave must be 2-D [batch, samples], got ",
                    wave.dim(), "-D");
  TORCH_CHECK_TYPE(wave.scalar_type() == at::kFloat || wave.scalar_type() == at::kDouble,
                   "vcfast::log_spectrogram: wave must be float32 or float64, got ",
                   wave.scalar_type());
  TORCH_CHECK_VALUE(n_fft >= 2, "vcfast::log_spectrogram: n_fft must be >= 2, got ", n_fft);
  TORCH_CHECK_VALUE(hop >= 1, "vcfast::log_spectrogram: hop must be >= 1, got ", hop);
  TORCH_CHECK_VALUE(wave.size(1) >= n_fft, "vcfast::log_spectrogram: wave has ", wave.size(1),
                    " samples, fewer than one frame of n_fft=", n_fft);
  const int64_t n_rfft = n_fft / 2 + 1;
  TORCH_CHECK_VALUE(0 <= bin_lo && bin_lo < bin_hi && bin_hi <= n_rfft,
                    "vcfast::log_spectrogram: need 0 <= bin_lo < bin_hi <= n_fft//2+1=", n_rfft,
                    ", got bin_lo=", bin_lo, " bin_hi=", bin_hi);
  TORCH_CHECK_VALUE(window.dim() == 1 && window.size(0) == n_fft,
                    "vcfast::log_spectrogram: window must have shape [n_fft]=[", n_fft, "], got ",
                    window.sizes());
  TORCH_CHECK_VALUE(shift.dim() == 1 && shift.size(0) == bin_hi - bin_lo,
                    "vcfast::log_spectrogram: shift must have shape [n_bins]=[", bin_hi - bin_lo,
                    "], got ", shift.sizes());
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == bin_hi - bin_lo,
                    "vcfast::log_spectrogram: scale must have shape [n_bins]=[", bin_hi - bin_lo,
                    "], got ", scale.sizes());
  for (const at::Tensor* t : {&window, &shift, &scale}) {
    TORCH_CHECK_TYPE(t->scalar_type() == wave.scalar_type(),
                     "vcfast::log_spectrogram: window/shift/scale must match wave's dtype ",
                     wave.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == wave.device(),
                      "vcfast::log_spectrogram: window/shift/scale must be on wave's device");
  }
  SpectrogramProblem problem{wave.contiguous(), window.contiguous(), shift.contiguous(),
                             scale.contiguous(), 0, 0, 0, 0, 0};
  problem.batch = wave.size(0);
  problem.samples = wave.size(1);
  problem.n_frames = (problem.samples - n_fft) / hop + 1;
  problem.n_bins = bin_hi - bin_lo;
  problem.n_rfft = n_fft / 2 + 1;
  return problem;
}

void check_spectrogram_grad(const at::Tensor& grad, const SpectrogramProblem& problem) {
  TORCH_CHECK_VALUE(
      grad.sizes() == at::IntArrayRef({problem.batch, problem.n_bins, problem.n_frames}),
      "vcfast::log_spectrogram_backward: grad must have shape [", problem.batch, ", ",
      problem.n_bins, ", ", problem.n_frames, "], got ", grad.sizes());
}

}  // namespace vcfast
