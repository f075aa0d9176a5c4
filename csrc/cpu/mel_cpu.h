// Declarations of the fused log-mel spectrogram CPU kernels (docs/ops.md#log-mel-spectrogram).
#pragma once

#include <ATen/core/Tensor.h>

namespace vcfast {

// wave [batch, samples] (already centre-padded: frames start at f*hop, no padding here),
// window [n_fft], filterbank [n_fft/2 + 1, n_mels], shift and scale [n_mels]. Returns
// [batch, n_mels, n_frames] with
//   y[b, m, f] = (log_multiplier * ln(max(sum_k fb[k, m] |X[b, k, f]|^power, log_floor))
//                 - shift[m]) * scale[m].
at::Tensor log_mel_spectrogram_cpu(const at::Tensor& wave, const at::Tensor& window,
                                   const at::Tensor& filterbank, const at::Tensor& shift,
                                   const at::Tensor& scale, int64_t n_fft, int64_t hop,
                                   double power, double log_floor, double log_multiplier);

// dL/dwave of the above from dL/dy ([batch, n_mels, n_frames], any strides).
at::Tensor log_mel_spectrogram_backward_cpu(const at::Tensor& grad, const at::Tensor& wave,
                                            const at::Tensor& window,
                                            const at::Tensor& filterbank,
                                            const at::Tensor& shift, const at::Tensor& scale,
                                            int64_t n_fft, int64_t hop, double power,
                                            double log_floor, double log_multiplier);

}  // namespace vcfast
