// Framing shared by the CPU spectrogram kernels (spectrogram_cpu.cpp, mel_cpu.cpp): windowed
// frames in, and in the backward the range of output samples a parallel task owns and the
// windowed overlap-add of its frames' gradients into that range.
#pragma once

#include <algorithm>
#include <cstdint>

namespace vcfast {

// Copies frames [f0, f0 + count) of one waveform into `frames` (row-major, n_fft wide),
// multiplied by the window.
template <typename T>
void window_frames(const T* wave_row, const T* window, int64_t f0, int64_t count, int64_t n_fft,
                   int64_t hop, T* frames) {
  for (int64_t j = 0; j < count; ++j) {
    const T* src = wave_row + (f0 + j) * hop;
    T* dst = frames + j * n_fft;
    for (int64_t n = 0; n < n_fft; ++n) {
      dst[n] = src[n] * window[n];
    }
  }
}

// The output samples backward task `task` owns: waveform b's samples [begin, end), ranges of
// frames_per_range hops (the last range also owns the tail after the last hop boundary), and
// the frames that reach into them, [f_first, f_last] (none when f_last < f_first). Threads
// own disjoint ranges, so the overlap-add needs no atomics and is deterministic; frames
// straddling two ranges are recomputed by both.
struct OutputRange {
  int64_t b, begin, end, f_first, f_last;
};

inline OutputRange output_range(int64_t task, int64_t ranges_per_row, int64_t frames_per_range,
                                int64_t hop, int64_t n_fft, int64_t samples, int64_t n_frames) {
  OutputRange r;
  r.b = task / ranges_per_row;
  const int64_t index = task % ranges_per_row;
  r.begin = index * frames_per_range * hop;
  r.end = index == ranges_per_row - 1 ? samples : (index + 1) * frames_per_range * hop;
  // First frame that reaches into the range: f*hop + n_fft > begin.
  r.f_first = r.begin < n_fft ? 0 : (r.begin - n_fft) / hop + 1;
  r.f_last = std::min(n_frames - 1, (r.end - 1) / hop);
  return r;
}

// dL/dwave[range] += window * frame_grad[j] for the `count` frames starting at r.f_first
// (frame_grad row-major, n_fft wide), only the samples inside the range.
template <typename T>
void overlap_add_windowed(const T* frame_grad, int64_t count, const OutputRange& r, int64_t hop,
                          int64_t n_fft, const T* window, T* grad_wave_row) {
  for (int64_t j = 0; j < count; ++j) {
    const int64_t start = (r.f_first + j) * hop;
    const int64_t n_begin = std::max<int64_t>(0, r.begin - start);
    const int64_t n_end = std::min<int64_t>(n_fft, r.end - start);
    const T* src = frame_grad + j * n_fft;
    T* dst = grad_wave_row + start;
    for (int64_t n = n_begin; n < n_end; ++n) {
      dst[n] += src[n] * window[n];
    }
  }
}

}  // namespace vcfast
