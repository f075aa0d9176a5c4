// Declarations of the Instance norm + ReLU kernels of vcfast.nn.norm_act, CPU (csrc/cpu/norm_act_cpu.cpp).
// Registered against their schemas in csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace vcfast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_stats_cpu(const at::Tensor& z_in,
                                                                       double eps);
at::Tensor norm_relu_forward_cpu(const at::Tensor& z_in, const at::Tensor& mean_in,
                                 const at::Tensor& rstd_in,
                                 const std::optional<at::Tensor>& gamma_in,
                                 const std::optional<at::Tensor>& beta_in);
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_relu_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, const std::optional<at::Tensor>& gamma_in,
    const std::optional<at::Tensor>& beta_in, bool batch_stats);

}  // namespace vcfast
