// Python bindings of the CUDA kernels of the fused multi-depth cross-entropy
// (implemented in fused_ce_cuda.cu; same signatures as the CPU extension).
#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace fused_ce {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const std::vector<int64_t>& width,
    const std::vector<int64_t>& valid);
void softmax_grad_cuda_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                        const at::Tensor& scale, const std::vector<int64_t>& width,
                        const std::vector<int64_t>& valid);
}  // namespace fused_ce

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused multi-depth cross-entropy: CUDA row-statistics and softmax-gradient kernels";
  m.def("row_stats", &fused_ce::row_stats_cuda,
        "per-(row, depth) max, sum-exp, target logit, arg-max", py::arg("logits"),
        py::arg("targets"), py::arg("width"), py::arg("valid"));
  m.def("softmax_grad_", &fused_ce::softmax_grad_cuda_,
        "in-place (softmax - one-hot) * scale over all depth blocks", py::arg("logits"),
        py::arg("targets"), py::arg("lse"), py::arg("scale"), py::arg("width"),
        py::arg("valid"));
}
