// Declarations of the Kernels of the lean gradient penalty (slope bits, penalty terms), CPU
// (csrc/cpu/gradient_penalty_cpu.cpp).
// Registered against their schemas in csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace vcfast {

std::tuple<at::Tensor, at::Tensor> leaky_relu_with_bits_cpu(const at::Tensor& z_in,
                                                            double negative_slope);
at::Tensor scale_by_slope_bits_cpu(const at::Tensor& x_in, const at::Tensor& bits,
                                   double negative_slope);
std::tuple<at::Tensor, at::Tensor> penalty_terms_cpu(const at::Tensor& g_in, double target,
                                                     double weight);

}  // namespace vcfast
