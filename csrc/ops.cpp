// Schemas of every vcfast C++ op and their CPU implementations: the one place a schema is
// written. CUDA implementations register themselves from csrc/cuda/*.cpp when the extension is
// built with CUDA; fake (meta) implementations and autograd live in Python (vcfast/ops/*.py).
// The Triton-only ops (vcfast/ops/*_triton.py) define theirs with torch.library.
#include <Python.h>
#include <torch/library.h>

#include "cpu/classification_cpu.h"
#include "cpu/gradient_penalty_cpu.h"
#include "cpu/label_conv_cpu.h"
#include "cpu/mel_cpu.h"
#include "cpu/norm_act_cpu.h"
#include "cpu/spectrogram_cpu.h"
#include "vcfast/cpu_isa.h"

#include <stdexcept>

// `import vcfast._C` must find a module init function even though the ops are reached
// through torch.ops.vcfast. The module's own functions report and set the instruction-set
// level of the CPU kernels (csrc/include/vcfast/cpu_isa.h); they are not ops, since they
// take no tensors and change process state.
namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(vcfast::cpu_isa_name(vcfast::cpu_isa()));
}

PyObject* py_cpu_isa_supported(PyObject*, PyObject*) {
  return PyUnicode_FromString(vcfast::cpu_isa_name(vcfast::cpu_isa_supported()));
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  if (!PyUnicode_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "vcfast.set_cpu_isa: isa must be a str");
    return nullptr;
  }
  try {
    return PyUnicode_FromString(vcfast::set_cpu_isa(PyUnicode_AsUTF8(arg)).c_str());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef kModuleMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The CPU kernels' instruction-set level now."},
    {"cpu_isa_supported", py_cpu_isa_supported, METH_NOARGS,
     "The best instruction-set level this CPU executes."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O,
     "Set the CPU kernels' level ('auto', 'baseline', 'avx2', 'avx512'); returns the previous."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kModuleMethods};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(vcfast, m) {
  m.def(
      "log_spectrogram(Tensor wave, Tensor window, Tensor shift, Tensor scale, int n_fft, "
      "int hop, int bin_lo, int bin_hi, float magnitude_scale, float power, float log_offset, "
      "float log_floor, float clip_lo, float clip_hi, bool check_finite) -> Tensor");
  m.def(
      "log_spectrogram_backward(Tensor grad, Tensor wave, Tensor window, Tensor shift, "
      "Tensor scale, int n_fft, int hop, int bin_lo, int bin_hi, float magnitude_scale, "
      "float power, float log_offset, float log_floor, float clip_lo, float clip_hi) -> Tensor");
  // Fused log-mel spectrogram (docs/ops.md#log-mel-spectrogram): wave already centre-padded;
  // y = (log_multiplier * ln(max(fb^T |X|^power, log_floor)) - shift) * scale.
  m.def(
      "log_mel_spectrogram(Tensor wave, Tensor window, Tensor filterbank, Tensor shift, "
      "Tensor scale, int n_fft, int hop, float power, float log_floor, float log_multiplier) "
      "-> Tensor");
  m.def(
      "log_mel_spectrogram_backward(Tensor grad, Tensor wave, Tensor window, Tensor filterbank, "
      "Tensor shift, Tensor scale, int n_fft, int hop, float power, float log_floor, "
      "float log_multiplier) -> Tensor");
  // Masked multi-group losses (docs/ops.md#masked-multi-group-losses). reduction: 0 none, 1 sum, 2
  // mean, 3 group_mean. group_counts[g] (int64) = number of valid entries (sigmoid) / known samples
  // (softmax) of group g: with logits and targets it is all the backward needs.
  m.def(
      "masked_multigroup_bce(Tensor logits, Tensor targets, int[] groups, Tensor? pos_weight, "
      "int reduction) -> (Tensor loss, Tensor group_counts)");
  m.def(
      "masked_multigroup_bce_backward(Tensor grad, Tensor logits, Tensor targets, int[] groups, "
      "Tensor? pos_weight, int reduction, Tensor group_counts) -> Tensor");
  m.def(
      "masked_multigroup_softmax_ce(Tensor logits, Tensor targets, int[] groups, int reduction) "
      "-> (Tensor loss, Tensor group_counts)");
  m.def(
      "masked_multigroup_softmax_ce_backward(Tensor grad, Tensor logits, Tensor targets, "
      "int[] groups, int reduction, Tensor group_counts) -> Tensor");
  // Lean gradient penalty (docs/ops.md#gradient-penalty): LeakyReLU with its slope bits,
  // replay of the slope by those bits, and the per-sample penalty terms.
  m.def("leaky_relu_with_bits(Tensor z, float negative_slope) -> (Tensor, Tensor)");
  m.def("scale_by_slope_bits(Tensor x, Tensor bits, float negative_slope) -> Tensor");
  m.def("penalty_terms(Tensor g, float target, float weight) -> (Tensor, Tensor)");
  // Label-conditioned convolution (docs/ops.md#label-conditioned-convolution).
  m.def(
      "label_table_add(Tensor conv_out, Tensor table, Tensor row_ids, Tensor col_ids) "
      "-> Tensor");
  m.def(
      "label_table_grad(Tensor grad, Tensor row_ids, Tensor col_ids, SymInt num_rows, "
      "SymInt num_cols) -> Tensor");
  // Instance norm + ReLU (docs/ops.md#instance-norm-relu-conv).
  m.def(
      "instance_norm_stats(Tensor z, float eps) "
      "-> (Tensor mean, Tensor rstd, Tensor var_unbiased)");
  m.def(
      "norm_relu_forward(Tensor z, Tensor mean, Tensor rstd, Tensor? gamma, Tensor? beta) "
      "-> Tensor");
  m.def(
      "norm_relu_backward(Tensor grad_a, Tensor z, Tensor mean, Tensor rstd, Tensor? gamma, "
      "Tensor? beta, bool batch_stats) -> (Tensor grad_z, Tensor grad_gamma, Tensor grad_beta)");
}

TORCH_LIBRARY_IMPL(vcfast, CPU, m) {
  m.impl("log_spectrogram", &vcfast::log_spectrogram_cpu);
  m.impl("log_spectrogram_backward", &vcfast::log_spectrogram_backward_cpu);
  m.impl("log_mel_spectrogram", &vcfast::log_mel_spectrogram_cpu);
  m.impl("log_mel_spectrogram_backward", &vcfast::log_mel_spectrogram_backward_cpu);
  m.impl("masked_multigroup_bce", &vcfast::masked_multigroup_bce_cpu);
  m.impl("masked_multigroup_bce_backward", &vcfast::masked_multigroup_bce_backward_cpu);
  m.impl("masked_multigroup_softmax_ce", &vcfast::masked_multigroup_softmax_ce_cpu);
  m.impl("masked_multigroup_softmax_ce_backward",
         &vcfast::masked_multigroup_softmax_ce_backward_cpu);
  m.impl("leaky_relu_with_bits", &vcfast::leaky_relu_with_bits_cpu);
  m.impl("scale_by_slope_bits", &vcfast::scale_by_slope_bits_cpu);
  m.impl("penalty_terms", &vcfast::penalty_terms_cpu);
  m.impl("label_table_add", &vcfast::label_table_add_cpu);
  m.impl("label_table_grad", &vcfast::label_table_grad_cpu);
  m.impl("instance_norm_stats", &vcfast::instance_norm_stats_cpu);
  m.impl("norm_relu_forward", &vcfast::norm_relu_forward_cpu);
  m.impl("norm_relu_backward", &vcfast::norm_relu_backward_cpu);
}
