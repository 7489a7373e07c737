// Python bindings of the CUDA kernels of the fused multi-depth cross-entropy
// (implemented in fused_ce_cuda.cu; same signatures as the CPU extension).
// ATen and torch's pybind11 type casters only, not <torch/extension.h> (see fused_ce_cpu.cpp).
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <tuple>

namespace fused_ce {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_cuda(const at::Tensor& logits,
                                                                          const at::Tensor& targets,
                                                                          int64_t valid);
void softmax_grad_cuda_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                        const at::Tensor& scale, int64_t valid);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_rows_cuda_(at::Tensor& logits, const at::Tensor& targets,
                                                             int64_t valid, const at::Tensor& scale);
}  // namespace fused_ce

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused multi-depth cross-entropy: CUDA kernels on one chunk of one depth's logits";
  m.def("row_stats", &fused_ce::row_stats_cuda, "per-row max, sum-exp, target logit, arg-max",
        py::arg("logits"), py::arg("targets"), py::arg("valid"));
  m.def("softmax_grad_", &fused_ce::softmax_grad_cuda_,
        "in-place (softmax - one-hot) * scale with a given log-sum-exp", py::arg("logits"),
        py::arg("targets"), py::arg("lse"), py::arg("scale"), py::arg("valid"));
  m.def("ce_rows_", &fused_ce::ce_rows_cuda_,
        "per-row log-sum-exp, target logit, arg-max; the logits become the gradient in place",
        py::arg("logits"), py::arg("targets"), py::arg("valid"), py::arg("scale"));
}
