// Declarations of the fused log-spectrogram kernels (CPU and, when built, CUDA).
#pragma once

#include <ATen/core/Tensor.h>

namespace vcfast {

// Validated, contiguous inputs and the sizes derived from them, shared by the CPU and CUDA
// entry points. prepare_spectrogram() raises a clear error for anything that would make a
// kernel read out of bounds, so the ops are safe when called directly via torch.ops.vcfast.
struct SpectrogramProblem {
  at::Tensor wave, window, shift, scale;
  int64_t batch, samples, n_frames, n_bins, n_rfft;
};

SpectrogramProblem prepare_spectrogram(const at::Tensor& wave, const at::Tensor& window,
                                       const at::Tensor& shift, const at::Tensor& scale,
                                       int64_t n_fft, int64_t hop, int64_t bin_lo, int64_t bin_hi);

// grad must be [batch, n_bins, n_frames]
void check_spectrogram_grad(const at::Tensor& grad, const SpectrogramProblem& problem);

at::Tensor log_spectrogram_cpu(const at::Tensor& wave, const at::Tensor& window,
                               const at::Tensor& shift, const at::Tensor& scale, int64_t n_fft,
                               int64_t hop, int64_t bin_lo, int64_t bin_hi,
                               double magnitude_scale, double power, double log_offset,
                               double log_floor, double clip_lo, double clip_hi,
                               bool check_finite);

at::Tensor log_spectrogram_backward_cpu(const at::Tensor& grad, const at::Tensor& wave,
                                        const at::Tensor& window, const at::Tensor& shift,
                                        const at::Tensor& scale, int64_t n_fft, int64_t hop,
                                        int64_t bin_lo, int64_t bin_hi, double magnitude_scale,
                                        double power, double log_offset, double log_floor,
                                        double clip_lo, double clip_hi);

}  // namespace vcfast
