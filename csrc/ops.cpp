// Schemas of every vcfast op and their CPU implementations. CUDA implementations register
// themselves from csrc/cuda/*.cpp when the extension is built with CUDA; fake (meta)
// implementations and autograd live in Python (vcfast/ops/*.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu/classification_cpu.h"
#include "cpu/spectrogram_cpu.h"

// `import vcfast._C` must find a module init function even though the ops are reached
// through torch.ops.vcfast; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
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
  // Masked multi-group losses (docs/ops.md#masked-multi-group-losses). reduction: 0 none, 1 sum, 2
  // mean, 3 group_mean. group_counts[g] = number of valid entries (sigmoid) / known samples
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
}

TORCH_LIBRARY_IMPL(vcfast, CPU, m) {
  m.impl("log_spectrogram", &vcfast::log_spectrogram_cpu);
  m.impl("log_spectrogram_backward", &vcfast::log_spectrogram_backward_cpu);
  m.impl("masked_multigroup_bce", &vcfast::masked_multigroup_bce_cpu);
  m.impl("masked_multigroup_bce_backward", &vcfast::masked_multigroup_bce_backward_cpu);
  m.impl("masked_multigroup_softmax_ce", &vcfast::masked_multigroup_softmax_ce_cpu);
  m.impl("masked_multigroup_softmax_ce_backward",
         &vcfast::masked_multigroup_softmax_ce_backward_cpu);
}
