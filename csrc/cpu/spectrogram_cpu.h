// Declarations of the fused log-spectrogram kernels (CPU and, when built, CUDA).
#pragma once

#include <ATen/core/Tensor.h>

namespace vcfast {

void check_spectrogram_args(const at::Tensor& wave, const at::Tensor& window,
                            const at::Tensor& shift, const at::Tensor& scale, int64_t n_fft,
                            int64_t hop, int64_t bin_lo, int64_t bin_hi);

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
