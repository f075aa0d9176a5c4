// Declarations of the Label-table kernels of vcfast.nn.LabelConcatConv2d, CPU (csrc/cpu/label_conv_cpu.cpp).
// Registered against their schemas in csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace vcfast {

at::Tensor label_table_add_cpu(const at::Tensor& conv_in, const at::Tensor& table_in,
                               const at::Tensor& row_ids_in, const at::Tensor& col_ids_in);
at::Tensor label_table_grad_cpu(const at::Tensor& grad_in, const at::Tensor& row_ids_in,
                                const at::Tensor& col_ids_in, int64_t num_rows, int64_t num_cols);

}  // namespace vcfast
