// Run-time choice of the CPU kernels' instruction-set level (csrc/include/vcfast/cpu_isa.h).
#include "vcfast/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace vcfast {
namespace {

CpuIsa detect_supported() {
#if VCFAST_HAS_ISA_VARIANTS
  __builtin_cpu_init();
  // The features GCC's x86-64-v4 / v3 levels let the compiler use.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")) {
    return CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe")) {
    return CpuIsa::kAvx2;
  }
#endif
  return CpuIsa::kBaseline;
}

bool parse(const std::string& name, CpuIsa* out) {
  // ATEN_CPU_CAPABILITY's names ("default", "avx2", "avx512") and ours.
  if (name == "baseline" || name == "default") {
    *out = CpuIsa::kBaseline;
  } else if (name == "avx2") {
    *out = CpuIsa::kAvx2;
  } else if (name == "avx512") {
    *out = CpuIsa::kAvx512;
  } else {
    return false;
  }
  return true;
}

CpuIsa cap_from_environment(CpuIsa supported) {
  CpuIsa level = supported;
  for (const char* var : {"ATEN_CPU_CAPABILITY", "VCFAST_CPU_ISA"}) {
    const char* value = std::getenv(var);
    CpuIsa cap;
    if (value != nullptr && parse(value, &cap) && cap < level) level = cap;
  }
  return level;
}

const CpuIsa kSupported = detect_supported();
std::atomic<int> g_level{static_cast<int>(cap_from_environment(kSupported))};

}  // namespace

CpuIsa cpu_isa() { return static_cast<CpuIsa>(g_level.load(std::memory_order_relaxed)); }

CpuIsa cpu_isa_supported() { return kSupported; }

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

std::string set_cpu_isa(const std::string& name) {
  CpuIsa level;
  if (name == "auto") {
    level = cap_from_environment(kSupported);
  } else if (!parse(name, &level)) {
    throw std::invalid_argument("vcfast.set_cpu_isa: isa must be 'auto', 'baseline', 'avx2' or "
                                "'avx512', got '" + name + "'");
  } else if (level > kSupported) {
    throw std::invalid_argument(std::string("vcfast.set_cpu_isa: this CPU cannot execute '") +
                                name + "' code; the best it runs is '" +
                                cpu_isa_name(kSupported) + "'");
  }
  return cpu_isa_name(static_cast<CpuIsa>(g_level.exchange(static_cast<int>(level))));
}

}  // namespace vcfast
