// Launchers of the CUDA log-spectrogram epilogues (see spectrogram_kernels.cu).
// Plain pointers and a stream only, so the .cu never includes torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "vcfast/spectrogram_math.h"

namespace vcfast {

// spec: interleaved complex [batch, n_frames, n_rfft]; out: [batch, n_bins, n_frames].
template <typename T>
void launch_logspec_fwd_epilogue(const T* spec, const T* shift, const T* scale, T* out,
                                 int64_t batch, int64_t n_frames, int64_t n_rfft, int64_t bin_lo,
                                 int64_t n_bins, const LogSpecParams<T>& p, cudaStream_t stream);

// grad: [batch, n_bins, n_frames]; spec_grad: interleaved complex [batch, n_frames, n_fft/2+1].
template <typename T>
void launch_logspec_bwd_epilogue(const T* spec, const T* grad, const T* shift, const T* scale,
                                 T* spec_grad, int64_t batch, int64_t n_frames, int64_t n_fft,
                                 int64_t bin_lo, int64_t n_bins, const LogSpecParams<T>& p,
                                 cudaStream_t stream);

// frame_grad: [batch, n_frames, n_fft]; grad_wave: [batch, samples] (fully overwritten).
template <typename T>
void launch_overlap_add(const T* frame_grad, const T* window, T* grad_wave, int64_t batch,
                        int64_t samples, int64_t n_frames, int64_t n_fft, int64_t hop,
                        cudaStream_t stream);

}  // namespace vcfast
