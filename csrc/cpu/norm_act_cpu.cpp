// Fused instance-norm + ReLU kernels of the lean "IN -> ReLU -> conv" units
// (vcfast/ops/norm_act.py, vcfast/nn/norm_act.py), CPU.
//
//   instance_norm_stats(z, eps) -> (mean, rstd, var_unbiased), each [N, C]
//   norm_relu_forward(z, mean, rstd, gamma?, beta?) -> a = relu(((z - mean) * rstd) * gamma + beta)
//   norm_relu_backward(grad_a, z, mean, rstd, gamma?, beta?, batch_stats) -> (grad_z, grad_gamma, grad_beta)
//
// z is [N, C, *spatial] (any spatial rank >= 1), float16 / bfloat16 / float32 / float64, any
// strides (made contiguous). Per-element arithmetic runs in Acc = float (double for double z),
// written in csrc/include/vcfast/norm_act_math.h; the sums over a plane (statistics, sum(g),
// sum(g * xhat)) are accumulated in double in 8 independent lanes, so a 65 536-element plane
// of float32 loses no precision and the loop still vectorises (the lanes keep the order of
// the additions fixed, as IEEE semantics demand without -ffast-math). The variance is
// two-pass (mean first, then sum of squared deviations): no cancellation for planes with a
// large mean. Work is split over the N * C planes with at::parallel_for; the batch reduction
// of grad_gamma / grad_beta runs afterwards in a fixed order (deterministic).
// gamma / beta may be None (1 / 0); grad_gamma / grad_beta are then still returned (the Python
// wrapper drops them). All index arithmetic is int64.
#include "norm_act_cpu.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "vcfast/norm_act_math.h"

namespace vcfast {
namespace {

constexpr int64_t kLanes = 8;
constexpr int64_t kElementsPerTask = 32768;

int64_t plane_grain(int64_t plane_size) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, plane_size));
}

void check_z(const at::Tensor& z, const char* op) {
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble ||
                       z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16,
                   "vcfast::", op, ": z must be float16, bfloat16, float32 or float64, got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.dim() >= 3, "vcfast::", op, ": z must be [N, C, *spatial], got ", z.sizes());
  TORCH_CHECK(z.device().is_cpu(), "vcfast::", op, ": z must be a CPU tensor, got ", z.device());
}

// [N, C] statistics (any floating dtype, any layout with N * C elements) as contiguous Acc.
at::Tensor prepare_param(const at::Tensor& t, int64_t numel, at::ScalarType acc, const char* op,
                         const char* arg, const char* shape) {
  TORCH_CHECK_TYPE(t.is_floating_point(), "vcfast::", op, ": ", arg, " must be floating point, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == numel, "vcfast::", op, ": ", arg, " must have ", shape, " = ", numel,
                    " elements, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "vcfast::", op, ": ", arg, " must be a CPU tensor, got ", t.device());
  return t.to(acc).contiguous().reshape({numel});
}

// gamma / beta: [C] as contiguous Acc, or `fill` when absent (non-affine norm).
at::Tensor prepare_affine(const std::optional<at::Tensor>& t, int64_t channels, double fill,
                          const at::TensorOptions& acc_options, const char* op, const char* arg) {
  if (!t.has_value()) return at::full({channels}, fill, acc_options);
  return prepare_param(*t, channels, acc_options.dtype().toScalarType(), op, arg, "C");
}

// Sum of f(i) for i in [0, n) in double, kLanes independent partial sums.
template <typename F>
double lane_sum(int64_t n, const F& f) {
  double lanes[kLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += f(i + k);
  }
  for (int64_t k = 0; i < n; ++i, ++k) lanes[k] += f(i);
  double total = 0.0;
  for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// Pass 1 of the backward over one plane: sum(g) and sum(g * xhat); with constant
// statistics (kEval) grad_z = gamma * rstd * g is written in the same pass. The sums run in
// blocks of kBlock elements: kLanes partial sums in Acc within a block (a pure-Acc loop GCC
// vectorises, the ReLU mask becoming a blend instead of a mispredicted branch), each block's
// partials then added into double, so the rounding of a long plane stays that of a
// kBlock / kLanes = 16-term float sum. kEval is a template flag to keep the body branch-free.
template <typename T, typename Acc, bool kEval>
void backward_sums(const T* __restrict__ zp, const T* __restrict__ gp, T* __restrict__ out, int64_t hw,
                   Acc mu, Acc rs, Acc ga, Acc be, Acc scale, double& sum_g, double& sum_gx) {
  constexpr int64_t kBlock = 128;
  double total_g = 0.0, total_gx = 0.0;
  for (int64_t start = 0; start < hw; start += kBlock) {
    const int64_t len = std::min<int64_t>(kBlock, hw - start);
    Acc lg[kLanes] = {}, lx[kLanes] = {};
    const T* z_blk = zp + start;
    const T* g_blk = gp + start;
    T* out_blk = out + start;
    if (len == kBlock) {
      for (int64_t j = 0; j < kBlock; j += kLanes) {
        for (int64_t k = 0; k < kLanes; ++k) {
          const Acc xhat = norm_act_xhat(static_cast<Acc>(z_blk[j + k]), mu, rs);
          const Acc g = norm_act_relu_grad(norm_act_affine(xhat, ga, be), static_cast<Acc>(g_blk[j + k]));
          lg[k] += g;
          lx[k] += g * xhat;
          if constexpr (kEval) out_blk[j + k] = static_cast<T>(norm_act_grad_z_eval(g, scale));
        }
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        const Acc xhat = norm_act_xhat(static_cast<Acc>(z_blk[j]), mu, rs);
        const Acc g = norm_act_relu_grad(norm_act_affine(xhat, ga, be), static_cast<Acc>(g_blk[j]));
        lg[j % kLanes] += g;
        lx[j % kLanes] += g * xhat;
        if constexpr (kEval) out_blk[j] = static_cast<T>(norm_act_grad_z_eval(g, scale));
      }
    }
    for (int64_t k = 0; k < kLanes; ++k) {
      total_g += static_cast<double>(lg[k]);
      total_gx += static_cast<double>(lx[k]);
    }
  }
  sum_g = total_g;
  sum_gx = total_gx;
}

// Pass 2 of the train-mode backward over one plane (restrict pointers: no runtime alias
// checks needed for the vectorised loop).
template <typename T, typename Acc>
void backward_grad_z_train(const T* __restrict__ zp, const T* __restrict__ gp, T* __restrict__ out, int64_t hw,
                           Acc mu, Acc rs, Acc ga, Acc be, Acc scale, Acc mean_g, Acc mean_gx) {
  for (int64_t i = 0; i < hw; ++i) {
    const Acc xhat = norm_act_xhat(static_cast<Acc>(zp[i]), mu, rs);
    const Acc g = norm_act_relu_grad(norm_act_affine(xhat, ga, be), static_cast<Acc>(gp[i]));
    out[i] = static_cast<T>(norm_act_grad_z_train(g, xhat, scale, mean_g, mean_gx));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_stats_cpu(const at::Tensor& z_in, double eps) {
  check_z(z_in, "instance_norm_stats");
  const int64_t N = z_in.size(0), C = z_in.size(1);
  const int64_t planes = N * C;
  const int64_t hw = planes == 0 ? 0 : z_in.numel() / planes;
  if (planes > 0) {
    TORCH_CHECK_VALUE(hw > 1, "vcfast::instance_norm_stats: expected more than 1 spatial element when training, "
                              "got input size ", z_in.sizes());
  }
  const auto acc = at::toOpMathType(z_in.scalar_type());
  const auto acc_options = z_in.options().dtype(acc);
  at::Tensor mean = at::empty({N, C}, acc_options);
  at::Tensor rstd = at::empty({N, C}, acc_options);
  at::Tensor var_unbiased = at::empty({N, C}, acc_options);
  if (planes == 0) return {mean, rstd, var_unbiased};
  const at::Tensor z = z_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vcfast_instance_norm_stats", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const T* src = z.data_ptr<T>();
    Acc* mean_out = mean.data_ptr<Acc>();
    Acc* rstd_out = rstd.data_ptr<Acc>();
    Acc* var_out = var_unbiased.data_ptr<Acc>();
    const double inv_hw = 1.0 / static_cast<double>(hw);
    at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const T* plane = src + p * hw;
        const double mu = lane_sum(hw, [&](int64_t i) { return static_cast<double>(static_cast<Acc>(plane[i])); }) *
                          inv_hw;
        const double m2 = lane_sum(hw, [&](int64_t i) {
          const double d = static_cast<double>(static_cast<Acc>(plane[i])) - mu;
          return d * d;
        });
        // Like the reference: biased variance rounded to Acc, then rsqrt(var + eps) in Acc.
        const Acc var = static_cast<Acc>(m2 * inv_hw);
        mean_out[p] = static_cast<Acc>(mu);
        rstd_out[p] = Acc(1) / std::sqrt(var + static_cast<Acc>(eps));
        var_out[p] = static_cast<Acc>(m2 / static_cast<double>(hw - 1));
      }
    });
  });
  return {mean, rstd, var_unbiased};
}

at::Tensor norm_relu_forward_cpu(const at::Tensor& z_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                 const std::optional<at::Tensor>& gamma_in,
                                 const std::optional<at::Tensor>& beta_in) {
  const char* op = "norm_relu_forward";
  check_z(z_in, op);
  const int64_t N = z_in.size(0), C = z_in.size(1);
  const int64_t planes = N * C;
  const auto acc = at::toOpMathType(z_in.scalar_type());
  const auto acc_options = z_in.options().dtype(acc);
  const at::Tensor mean = prepare_param(mean_in, planes, acc, op, "mean", "N * C");
  const at::Tensor rstd = prepare_param(rstd_in, planes, acc, op, "rstd", "N * C");
  const at::Tensor gamma = prepare_affine(gamma_in, C, 1.0, acc_options, op, "gamma");
  const at::Tensor beta = prepare_affine(beta_in, C, 0.0, acc_options, op, "beta");
  const at::Tensor z = z_in.contiguous();
  at::Tensor a = at::empty_like(z, at::MemoryFormat::Contiguous);
  if (z.numel() == 0) return a;
  const int64_t hw = z.numel() / planes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vcfast_norm_relu_forward", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const T* src = z.data_ptr<T>();
    T* dst = a.data_ptr<T>();
    const Acc* mean_p = mean.data_ptr<Acc>();
    const Acc* rstd_p = rstd.data_ptr<Acc>();
    const Acc* gamma_p = gamma.data_ptr<Acc>();
    const Acc* beta_p = beta.data_ptr<Acc>();
    at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % C;
        const Acc mu = mean_p[p], rs = rstd_p[p], ga = gamma_p[c], be = beta_p[c];
        const T* plane = src + p * hw;
        T* out = dst + p * hw;
        for (int64_t i = 0; i < hw; ++i) {
          const Acc xhat = norm_act_xhat(static_cast<Acc>(plane[i]), mu, rs);
          out[i] = static_cast<T>(norm_act_relu(norm_act_affine(xhat, ga, be)));
        }
      }
    });
  });
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_relu_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& z_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const std::optional<at::Tensor>& gamma_in, const std::optional<at::Tensor>& beta_in, bool batch_stats) {
  const char* op = "norm_relu_backward";
  check_z(z_in, op);
  TORCH_CHECK_TYPE(grad_in.scalar_type() == z_in.scalar_type(), "vcfast::", op, ": grad_a dtype ",
                   grad_in.scalar_type(), " differs from z's ", z_in.scalar_type());
  TORCH_CHECK_VALUE(grad_in.sizes() == z_in.sizes(), "vcfast::", op, ": grad_a ", grad_in.sizes(),
                    " must have z's shape ", z_in.sizes());
  TORCH_CHECK(grad_in.device().is_cpu(), "vcfast::", op, ": grad_a must be a CPU tensor, got ", grad_in.device());
  const int64_t N = z_in.size(0), C = z_in.size(1);
  const int64_t planes = N * C;
  const auto acc = at::toOpMathType(z_in.scalar_type());
  const auto acc_options = z_in.options().dtype(acc);
  const at::Tensor mean = prepare_param(mean_in, planes, acc, op, "mean", "N * C");
  const at::Tensor rstd = prepare_param(rstd_in, planes, acc, op, "rstd", "N * C");
  const at::Tensor gamma = prepare_affine(gamma_in, C, 1.0, acc_options, op, "gamma");
  const at::Tensor beta = prepare_affine(beta_in, C, 0.0, acc_options, op, "beta");
  const at::Tensor z = z_in.contiguous();
  const at::Tensor grad_a = grad_in.contiguous();
  at::Tensor grad_z = at::empty_like(z, at::MemoryFormat::Contiguous);
  at::Tensor grad_gamma = at::zeros({C}, acc_options);
  at::Tensor grad_beta = at::zeros({C}, acc_options);
  if (z.numel() == 0) return {grad_z, grad_gamma, grad_beta};
  const int64_t hw = z.numel() / planes;
  // Per-plane sums, reduced over the batch afterwards in a fixed order.
  std::vector<double> plane_sum_g(planes), plane_sum_gx(planes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vcfast_norm_relu_backward", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const T* zsrc = z.data_ptr<T>();
    const T* gsrc = grad_a.data_ptr<T>();
    T* dst = grad_z.data_ptr<T>();
    const Acc* mean_p = mean.data_ptr<Acc>();
    const Acc* rstd_p = rstd.data_ptr<Acc>();
    const Acc* gamma_p = gamma.data_ptr<Acc>();
    const Acc* beta_p = beta.data_ptr<Acc>();
    const Acc inv_hw = Acc(1) / static_cast<Acc>(hw);
    at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % C;
        const Acc mu = mean_p[p], rs = rstd_p[p], ga = gamma_p[c], be = beta_p[c];
        const Acc scale = ga * rs;
        const T* zp = zsrc + p * hw;
        const T* gp = gsrc + p * hw;
        T* out = dst + p * hw;
        double sum_g = 0.0, sum_gx = 0.0;
        // Pass 1: the plane sums (and, with constant statistics, grad_z right away).
        if (batch_stats) {
          backward_sums<T, Acc, false>(zp, gp, out, hw, mu, rs, ga, be, scale, sum_g, sum_gx);
        } else {
          backward_sums<T, Acc, true>(zp, gp, out, hw, mu, rs, ga, be, scale, sum_g, sum_gx);
        }
        plane_sum_g[p] = sum_g;
        plane_sum_gx[p] = sum_gx;
        if (batch_stats) {
          // Pass 2: the normalisation's backward; xhat and the mask are recomputed (cheaper
          // than a plane-sized buffer).
          const Acc mean_g = static_cast<Acc>(sum_g) * inv_hw;
          const Acc mean_gx = static_cast<Acc>(sum_gx) * inv_hw;
          backward_grad_z_train<T, Acc>(zp, gp, out, hw, mu, rs, ga, be, scale, mean_g, mean_gx);
        }
      }
    });
    Acc* gg = grad_gamma.data_ptr<Acc>();
    Acc* gb = grad_beta.data_ptr<Acc>();
    for (int64_t c = 0; c < C; ++c) {
      double sg = 0.0, sgx = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        sg += plane_sum_g[n * C + c];
        sgx += plane_sum_gx[n * C + c];
      }
      gb[c] = static_cast<Acc>(sg);
      gg[c] = static_cast<Acc>(sgx);
    }
  });
  return {grad_z, grad_gamma, grad_beta};
}

}  // namespace vcfast
