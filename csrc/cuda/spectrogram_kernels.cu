// CUDA epilogues of the fused log-spectrogram. The FFT itself is cuFFT (called from the
// host code in spectrogram_cuda.cpp); these kernels fuse everything around it:
//   forward:  complex spectrum -> kept bins -> magnitude/log/normalisation, written
//             straight into the [batch, bin, frame] output layout;
//   backward: dL/dy -> dL/dX for the kept bins (zero elsewhere), pre-scaled so that a
//             plain inverse real FFT gives the DFT adjoint;
//   overlap-add of windowed frame gradients into dL/dwave, gathered per output sample
//             (deterministic, no atomics).
// Only the CUDA runtime is included: nvcc never parses the torch headers, which keeps
// this file's compile time to seconds.
#include <cuda_runtime.h>

#include <cstdint>

#include "vcfast/spectrogram_math.h"
#include "spectrogram_kernels.h"

namespace vcfast {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest; 65535*8 blocks saturate any current GPU.
  return blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8;
}

template <typename T>
__global__ void logspec_fwd_epilogue_kernel(const T* __restrict__ spec, const T* __restrict__ shift,
                                            const T* __restrict__ scale, T* __restrict__ out,
                                            int64_t total, int64_t n_frames, int64_t n_rfft,
                                            int64_t bin_lo, int64_t n_bins, LogSpecParams<T> p) {
  // One thread per output element; consecutive threads walk consecutive frames so the
  // stores are coalesced (the spectrum reads are strided by n_rfft and hit L2).
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t f = i % n_frames;
    const int64_t k = (i / n_frames) % n_bins;
    const int64_t b = i / (n_frames * n_bins);
    const int64_t src = ((b * n_frames + f) * n_rfft + bin_lo + k) * 2;
    out[i] = logspec_forward<T>(spec[src], spec[src + 1], p, shift[k], scale[k]);
  }
}

template <typename T>
__global__ void logspec_bwd_epilogue_kernel(const T* __restrict__ spec, const T* __restrict__ grad,
                                            const T* __restrict__ shift, const T* __restrict__ scale,
                                            T* __restrict__ spec_grad, int64_t total,
                                            int64_t n_frames, int64_t n_rfft, int64_t n_fft,
                                            int64_t bin_lo, int64_t n_bins, LogSpecParams<T> p) {
  // One thread per spectrum coefficient [batch, frame, rfft bin], so every entry of
  // spec_grad is written (zeros outside the kept bins) and no memset is needed.
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t bin = i % n_rfft;
    const int64_t row = i / n_rfft;  // b * n_frames + f
    const int64_t k = bin - bin_lo;
    T gr = T(0), gi = T(0);
    if (k >= 0 && k < n_bins) {
      const int64_t f = row % n_frames;
      const int64_t b = row / n_frames;
      const T gy = grad[(b * n_bins + k) * n_frames + f];
      logspec_backward<T>(spec[2 * i], spec[2 * i + 1], gy, p, shift[k], scale[k], &gr, &gi);
      const bool edge = bin == 0 || (n_fft % 2 == 0 && bin == n_fft / 2);
      const T factor = edge ? T(n_fft) : T(n_fft) / T(2);
      gr *= factor;
      gi *= factor;
    }
    spec_grad[2 * i] = gr;
    spec_grad[2 * i + 1] = gi;
  }
}

template <typename T>
__global__ void overlap_add_kernel(const T* __restrict__ frame_grad, const T* __restrict__ window,
                                   T* __restrict__ grad_wave, int64_t total, int64_t samples,
                                   int64_t n_frames, int64_t n_fft, int64_t hop) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i % samples;
    const int64_t b = i / samples;
    // Frames f with f*hop <= t < f*hop + n_fft.
    int64_t f_last = t / hop;
    if (f_last > n_frames - 1) f_last = n_frames - 1;
    const int64_t f_first = t < n_fft ? 0 : (t - n_fft) / hop + 1;
    T acc = T(0);
    for (int64_t f = f_first; f <= f_last; ++f) {
      const int64_t n = t - f * hop;
      acc += frame_grad[(b * n_frames + f) * n_fft + n] * window[n];
    }
    grad_wave[i] = acc;
  }
}

}  // namespace

template <typename T>
void launch_logspec_fwd_epilogue(const T* spec, const T* shift, const T* scale, T* out,
                                 int64_t batch, int64_t n_frames, int64_t n_rfft, int64_t bin_lo,
                                 int64_t n_bins, const LogSpecParams<T>& p, cudaStream_t stream) {
  const int64_t total = batch * n_bins * n_frames;
  if (total == 0) return;
  logspec_fwd_epilogue_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
      spec, shift, scale, out, total, n_frames, n_rfft, bin_lo, n_bins, p);
}

template <typename T>
void launch_logspec_bwd_epilogue(const T* spec, const T* grad, const T* shift, const T* scale,
                                 T* spec_grad, int64_t batch, int64_t n_frames, int64_t n_fft,
                                 int64_t bin_lo, int64_t n_bins, const LogSpecParams<T>& p,
                                 cudaStream_t stream) {
  const int64_t n_rfft = n_fft / 2 + 1;
  const int64_t total = batch * n_frames * n_rfft;
  if (total == 0) return;
  logspec_bwd_epilogue_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
      spec, grad, shift, scale, spec_grad, total, n_frames, n_rfft, n_fft, bin_lo, n_bins, p);
}

template <typename T>
void launch_overlap_add(const T* frame_grad, const T* window, T* grad_wave, int64_t batch,
                        int64_t samples, int64_t n_frames, int64_t n_fft, int64_t hop,
                        cudaStream_t stream) {
  const int64_t total = batch * samples;
  if (total == 0) return;
  overlap_add_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
      frame_grad, window, grad_wave, total, samples, n_frames, n_fft, hop);
}

#define VCFAST_INSTANTIATE(T)                                                                    \
  template void launch_logspec_fwd_epilogue<T>(const T*, const T*, const T*, T*, int64_t,        \
                                               int64_t, int64_t, int64_t, int64_t,               \
                                               const LogSpecParams<T>&, cudaStream_t);           \
  template void launch_logspec_bwd_epilogue<T>(const T*, const T*, const T*, const T*, T*,       \
                                               int64_t, int64_t, int64_t, int64_t, int64_t,      \
                                               const LogSpecParams<T>&, cudaStream_t);           \
  template void launch_overlap_add<T>(const T*, const T*, T*, int64_t, int64_t, int64_t,         \
                                      int64_t, int64_t, cudaStream_t);
VCFAST_INSTANTIATE(float)
VCFAST_INSTANTIATE(double)
#undef VCFAST_INSTANTIATE

}  // namespace vcfast
