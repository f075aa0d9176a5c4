// Which x86-64 instruction-set level the C++ CPU kernels run their hot loops at.
//
// The hot loops (per-entry exp/log1p of the losses, the slope-bit selects, the penalty's
// sums, the norm-act and spectrogram epilogues) are compiled three times from the same
// source: AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and baseline x86-64 (SSE2), each as a
// function with GCC's `target` attribute, so one build runs on every x86-64 CPU. At run time
// each call takes the best level the CPU supports, capped by ATEN_CPU_CAPABILITY (so forcing
// PyTorch's AVX2 path forces ours too), by VCFAST_CPU_ISA, or by set_cpu_isa() (tests run
// every level the machine can execute). docs/architecture.md#cpu-instruction-sets.
#pragma once

#include <string>

namespace vcfast {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The level the kernels take now.
CpuIsa cpu_isa();
// The best level this CPU (and build) can execute.
CpuIsa cpu_isa_supported();
// Sets the level ("baseline", "avx2", "avx512"; or "auto" for the default); throws
// std::invalid_argument for an unknown name or a level this CPU cannot execute. Returns
// the previous level's name.
std::string set_cpu_isa(const std::string& name);
const char* cpu_isa_name(CpuIsa isa);

}  // namespace vcfast

// GCC on x86-64 Linux: per-function targets. Elsewhere every variant is the baseline build.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VCFAST_HAS_ISA_VARIANTS 1
#define VCFAST_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define VCFAST_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define VCFAST_HAS_ISA_VARIANTS 0
#define VCFAST_TARGET_AVX512
#define VCFAST_TARGET_AVX2
#endif

// A helper the ISA variants call must be inlined into them: a call would run the helper's
// own baseline code.
#if defined(__GNUC__)
#define VCFAST_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define VCFAST_ALWAYS_INLINE inline
#endif

#define VCFAST_ISA_UNPAREN(...) __VA_ARGS__

// VCFAST_ISA_DISPATCHED(ret, name, (template params), (template args), (params), (args))
// defines `name` as a function template that calls the VCFAST_ALWAYS_INLINE function
// template `name##_impl` compiled at the level cpu_isa() picks. The variants are three
// wrappers around the same inlined body; the switch costs one branch per call (per row or
// per chunk, never per element).
#define VCFAST_ISA_DISPATCHED(ret, name, tparams, targs, params, args)                      \
  template <VCFAST_ISA_UNPAREN tparams>                                                     \
  VCFAST_TARGET_AVX512 ret name##_avx512 params {                                          \
    return name##_impl<VCFAST_ISA_UNPAREN targs> args;                                       \
  }                                                                                         \
  template <VCFAST_ISA_UNPAREN tparams>                                                     \
  VCFAST_TARGET_AVX2 ret name##_avx2 params {                                              \
    return name##_impl<VCFAST_ISA_UNPAREN targs> args;                                       \
  }                                                                                         \
  template <VCFAST_ISA_UNPAREN tparams>                                                     \
  ret name##_baseline params {                                                              \
    return name##_impl<VCFAST_ISA_UNPAREN targs> args;                                       \
  }                                                                                         \
  template <VCFAST_ISA_UNPAREN tparams>                                                     \
  ret name params {                                                                         \
    switch (::vcfast::cpu_isa()) {                                                          \
      case ::vcfast::CpuIsa::kAvx512:                                                       \
        return name##_avx512<VCFAST_ISA_UNPAREN targs> args;                                 \
      case ::vcfast::CpuIsa::kAvx2:                                                         \
        return name##_avx2<VCFAST_ISA_UNPAREN targs> args;                                   \
      default:                                                                              \
        return name##_baseline<VCFAST_ISA_UNPAREN targs> args;                               \
    }                                                                                       \
  }
