// Label-table kernels of vcfast.nn.LabelConcatConv2d (vcfast/ops/label_conv.py), CPU.
//
// conv(cat(x, tile(c))) = conv(x; W_x) + conv(tile(c); W_c). The label term depends on the output
// position only through the set of kernel taps that fall inside the input, i.e. through a
// (row pattern, column pattern) pair: out[b, o, i, j] = conv_x[b, o, i, j] + T[b, o, r(i), s(j)].
// The table T [B, O, R, S] is tiny (R, S <= a few times the kernel size); these kernels do the
// only spatially large label work:
//   label_table_add(conv_out, table, row_ids, col_ids) -> conv_out + table[:, :, row_ids][:, :, :, col_ids]
//       functional (a new tensor; conv_out is not modified).
//   label_table_grad(grad, row_ids, col_ids, R, S) -> [B, O, R, S] segmented sum:
//       out[b, o, r, s] = sum over (i, j) with row_ids[i] == r and col_ids[j] == s of grad[b, o, i, j]
//       accumulated in double per (b, o) plane (deterministic: fixed order i, then j).
// Indices are int64. Work is split over the B * O planes with at::parallel_for.
#include "label_conv_cpu.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace vcfast {
namespace {

void check_ids(const at::Tensor& ids, int64_t length, int64_t bound, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "vcfast::", op, ": ", arg, " must be int64, got ",
                   ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == length, "vcfast::", op, ": ", arg,
                    " must be 1-D of length ", length, ", got ", ids.sizes());
  TORCH_CHECK(ids.device().is_cpu(), "vcfast::", op, ": ", arg, " must be a CPU tensor");
  if (length > 0) {
    const int64_t lo = ids.min().item<int64_t>();
    const int64_t hi = ids.max().item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < bound, "vcfast::", op, ": ", arg, " values must lie in [0, ", bound,
                      "), got [", lo, ", ", hi, "]");
  }
}

// A maximal range [begin, end) of output columns sharing one column pattern id.
struct ColumnRun {
  int64_t begin, end, id;
};

std::vector<ColumnRun> column_runs(const int64_t* cols, int64_t width) {
  std::vector<ColumnRun> runs;
  for (int64_t j = 0; j < width; ++j) {
    if (runs.empty() || runs.back().id != cols[j]) runs.push_back({j, j + 1, cols[j]});
    else runs.back().end = j + 1;
  }
  return runs;
}

// Sum of x[begin, end) in double: eight independent lanes in a fixed order (deterministic),
// combined pairwise at the end.
template <typename T>
double run_sum(const T* x, int64_t begin, int64_t end) {
  constexpr int kLanes = 8;
  double lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) lane[k] += static_cast<double>(x[j + k]);
  }
  for (int k = 0; j < end; ++j, ++k) lane[k] += static_cast<double>(x[j]);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

}  // namespace

at::Tensor label_table_add_cpu(const at::Tensor& conv_in, const at::Tensor& table_in,
                               const at::Tensor& row_ids_in, const at::Tensor& col_ids_in) {
  TORCH_CHECK_TYPE(conv_in.is_floating_point(), "vcfast::label_table_add: conv_out must be floating point, got ",
                   conv_in.scalar_type());
  TORCH_CHECK_TYPE(table_in.scalar_type() == conv_in.scalar_type(),
                   "vcfast::label_table_add: table dtype ", table_in.scalar_type(), " differs from conv_out's ",
                   conv_in.scalar_type());
  TORCH_CHECK_VALUE(conv_in.dim() == 4 && table_in.dim() == 4,
                    "vcfast::label_table_add: conv_out [B, O, H, W] and table [B, O, R, S] must be 4-D, got ",
                    conv_in.sizes(), " and ", table_in.sizes());
  TORCH_CHECK_VALUE(conv_in.size(0) == table_in.size(0) && conv_in.size(1) == table_in.size(1),
                    "vcfast::label_table_add: conv_out ", conv_in.sizes(), " and table ", table_in.sizes(),
                    " disagree on [B, O]");
  const int64_t B = conv_in.size(0), O = conv_in.size(1), H = conv_in.size(2), W = conv_in.size(3);
  const int64_t R = table_in.size(2), S = table_in.size(3);
  check_ids(row_ids_in, H, R, "label_table_add", "row_ids");
  check_ids(col_ids_in, W, S, "label_table_add", "col_ids");
  const at::Tensor conv = conv_in.contiguous();
  const at::Tensor table = table_in.contiguous();
  const at::Tensor row_ids = row_ids_in.contiguous();
  const at::Tensor col_ids = col_ids_in.contiguous();
  at::Tensor out = at::empty_like(conv, at::MemoryFormat::Contiguous);
  const int64_t planes = B * O;
  if (planes == 0 || H * W == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv.scalar_type(), "vcfast_label_table_add", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const T* src = conv.data_ptr<T>();
    const T* tab = table.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    const int64_t* rows = row_ids.data_ptr<int64_t>();
    const int64_t* cols = col_ids.data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W));
    at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const T* plane_tab = tab + p * R * S;
        for (int64_t i = 0; i < H; ++i) {
          const T* trow = plane_tab + rows[i] * S;
          const T* srow = src + (p * H + i) * W;
          T* drow = dst + (p * H + i) * W;
          for (int64_t j = 0; j < W; ++j) {
            drow[j] = static_cast<T>(static_cast<Acc>(srow[j]) + static_cast<Acc>(trow[cols[j]]));
          }
        }
      }
    });
  });
  return out;
}

at::Tensor label_table_grad_cpu(const at::Tensor& grad_in, const at::Tensor& row_ids_in,
                                const at::Tensor& col_ids_in, int64_t num_rows, int64_t num_cols) {
  TORCH_CHECK_TYPE(grad_in.is_floating_point(), "vcfast::label_table_grad: grad must be floating point, got ",
                   grad_in.scalar_type());
  TORCH_CHECK_VALUE(grad_in.dim() == 4, "vcfast::label_table_grad: grad must be [B, O, H, W], got ",
                    grad_in.sizes());
  TORCH_CHECK_VALUE(num_rows >= 0 && num_cols >= 0, "vcfast::label_table_grad: num_rows and num_cols must be >= 0");
  const int64_t B = grad_in.size(0), O = grad_in.size(1), H = grad_in.size(2), W = grad_in.size(3);
  const int64_t R = num_rows, S = num_cols;
  check_ids(row_ids_in, H, R, "label_table_grad", "row_ids");
  check_ids(col_ids_in, W, S, "label_table_grad", "col_ids");
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor row_ids = row_ids_in.contiguous();
  const at::Tensor col_ids = col_ids_in.contiguous();
  at::Tensor out = at::empty({B, O, R, S}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t planes = B * O;
  if (planes == 0 || R * S == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "vcfast_label_table_grad", [&] {
    using T = scalar_t;
    const T* src = grad.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    const int64_t* rows = row_ids.data_ptr<int64_t>();
    const int64_t* cols = col_ids.data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W));
    // Column patterns come in runs (one long interior run between short border runs), so a
    // row reduces run by run: a contiguous sum with independent lanes that the compiler
    // vectorises, instead of a scatter-add whose every element waits on the previous one.
    std::vector<ColumnRun> runs = column_runs(cols, W);
    at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
      std::vector<double> acc(R * S);
      for (int64_t p = p0; p < p1; ++p) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t i = 0; i < H; ++i) {
          double* arow = acc.data() + rows[i] * S;
          const T* grow = src + (p * H + i) * W;
          for (const ColumnRun& run : runs) arow[run.id] += run_sum(grow, run.begin, run.end);
        }
        T* plane_out = dst + p * R * S;
        for (int64_t k = 0; k < R * S; ++k) plane_out[k] = static_cast<T>(acc[k]);
      }
    });
  });
  return out;
}

}  // namespace vcfast
