// A tiny op library whose ops only throw, one per c10 error type, to tell whether a crash on
// a C++ check belongs to the exception type, the message formatting or vcfast._C's build.
// Built and run by scripts/unwind_probe/run.sh.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <stdexcept>

namespace {

at::Tensor throw_plain(const at::Tensor& t) {
  TORCH_CHECK(false, "probe: c10::Error, sizes ", t.sizes());
  return t;
}
at::Tensor throw_type(const at::Tensor& t) {
  TORCH_CHECK_TYPE(false, "probe: c10::TypeError, dtype ", t.scalar_type());
  return t;
}
at::Tensor throw_type_sizes(const at::Tensor& t) {
  TORCH_CHECK_TYPE(false, "probe: c10::TypeError, sizes ", t.sizes());
  return t;
}
at::Tensor throw_value(const at::Tensor& t) {
  TORCH_CHECK_VALUE(false, "probe: c10::ValueError, sizes ", t.sizes());
  return t;
}
at::Tensor throw_value_literal(const at::Tensor& t) {
  TORCH_CHECK_VALUE(false, "probe: c10::ValueError, a literal message");
  return t;
}
at::Tensor throw_index(const at::Tensor& t) {
  TORCH_CHECK_INDEX(false, "probe: c10::IndexError, value ", t.dim());
  return t;
}
at::Tensor throw_std(const at::Tensor& t) {
  throw std::invalid_argument("probe: std::invalid_argument");
  return t;
}

}  // namespace

TORCH_LIBRARY(vcprobe, m) {
  m.def("throw_plain(Tensor t) -> Tensor");
  m.def("throw_type(Tensor t) -> Tensor");
  m.def("throw_type_sizes(Tensor t) -> Tensor");
  m.def("throw_value(Tensor t) -> Tensor");
  m.def("throw_value_literal(Tensor t) -> Tensor");
  m.def("throw_index(Tensor t) -> Tensor");
  m.def("throw_std(Tensor t) -> Tensor");
}

TORCH_LIBRARY_IMPL(vcprobe, CPU, m) {
  m.impl("throw_plain", &throw_plain);
  m.impl("throw_type", &throw_type);
  m.impl("throw_type_sizes", &throw_type_sizes);
  m.impl("throw_value", &throw_value);
  m.impl("throw_value_literal", &throw_value_literal);
  m.impl("throw_index", &throw_index);
  m.impl("throw_std", &throw_std);
}
