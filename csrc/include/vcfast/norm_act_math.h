// Per-element math of the fused instance-norm + ReLU ops (vcfast/ops/norm_act.py), shared by
// the CPU kernels (csrc/cpu/norm_act_cpu.cpp) and, later, CUDA ones.
//
// For one (sample, channel) plane with statistics mean, rstd and affine gamma, beta (1 and 0
// for a non-affine norm), all in the accumulation type Acc (float, or double for double z):
//   xhat = (z - mean) * rstd
//   y    = xhat * gamma + beta
//   a    = relu(y)                                   (forward output)
//   g    = y > 0 ? grad_a : 0                        (ReLU's derivative at 0 is 0, like PyTorch)
//   train (batch statistics):  grad_z = gamma * rstd * (g - mean(g) - xhat * mean(g * xhat))
//   eval  (running statistics are constants):  grad_z = gamma * rstd * g
// The operations are written in the reference's order, (z - mean) * rstd first and then the
// affine, each rounded to Acc, so the ReLU mask agrees with the plain-PyTorch reference
// element for element (a fused z * scale + shift would move elements with y ~ 0 across the
// kink and change grad_z there by a whole gamma * rstd * grad_a).
#pragma once

#ifndef VCFAST_HD
#if defined(__CUDACC__) || defined(__HIPCC__)
#define VCFAST_HD __host__ __device__ __forceinline__
#else
#define VCFAST_HD inline
#endif
#endif

namespace vcfast {

// The normalised value xhat of one element.
template <typename Acc>
VCFAST_HD Acc norm_act_xhat(Acc z, Acc mean, Acc rstd) {
  return (z - mean) * rstd;
}

// The pre-activation y = xhat * gamma + beta.
template <typename Acc>
VCFAST_HD Acc norm_act_affine(Acc xhat, Acc gamma, Acc beta) {
  return xhat * gamma + beta;
}

// a = relu(y). NaN stays NaN, like torch.relu (a comparison `y > 0 ? y : 0` would flush it).
template <typename Acc>
VCFAST_HD Acc norm_act_relu(Acc y) {
  return y < Acc(0) ? Acc(0) : y;
}

// g = grad_a where the ReLU passed its input (y > 0), else 0.
template <typename Acc>
VCFAST_HD Acc norm_act_relu_grad(Acc y, Acc grad_a) {
  return y > Acc(0) ? grad_a : Acc(0);
}

// grad_z with batch statistics: scale = gamma * rstd, mean_g = sum(g) / HW,
// mean_gx = sum(g * xhat) / HW over the plane.
template <typename Acc>
VCFAST_HD Acc norm_act_grad_z_train(Acc g, Acc xhat, Acc scale, Acc mean_g, Acc mean_gx) {
  return scale * (g - mean_g - xhat * mean_gx);
}

// grad_z with running (constant) statistics.
template <typename Acc>
VCFAST_HD Acc norm_act_grad_z_eval(Acc g, Acc scale) {
  return scale * g;
}

}  // namespace vcfast
