// Layout of one chunk of multi-depth logits and the argument checks shared by the
// CPU and CUDA kernels of the fused multi-depth cross-entropy.
//
// A chunk holds `rows` rows for each of D depths in one flat buffer: depth d's
// logits are a row-major [rows, width[d]] block starting at element offset[d]
// (blocks follow each other in depth order). Columns [valid[d], width[d]) of a
// block are vocabulary padding: they never enter the softmax and their gradient
// is zero. targets is [rows, D] int64: the column of the target inside depth d's
// block, or -1 where the target lies outside it (another rank's vocab slice).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace fused_ce {

constexpr int64_t kMaxDepths = 32;

struct DepthLayout {
  int64_t depths;
  int64_t rows;
  int64_t offset[kMaxDepths];  // element offset of depth d's block
  int64_t width[kMaxDepths];   // columns of depth d's block
  int64_t valid[kMaxDepths];   // leading columns that are real codes
};

inline DepthLayout make_layout(const at::Tensor& logits, const at::Tensor& targets,
                               const std::vector<int64_t>& width,
                               const std::vector<int64_t>& valid) {
  const auto depths = static_cast<int64_t>(width.size());
  TORCH_CHECK(depths >= 1 && depths <= kMaxDepths, "fused_ce: number of depths must be in [1, ",
              kMaxDepths, "], got ", depths);
  TORCH_CHECK(static_cast<int64_t>(valid.size()) == depths, "fused_ce: ", depths,
              " widths but ", valid.size(), " valid counts");
  TORCH_CHECK(logits.dim() == 1 && logits.is_contiguous(),
              "fused_ce: logits must be a flat contiguous buffer");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "fused_ce: logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(targets.dim() == 2 && targets.size(1) == depths && targets.is_contiguous() &&
                  targets.scalar_type() == at::kLong,
              "fused_ce: targets must be a contiguous int64 [rows, ", depths, "] tensor, got ",
              targets.sizes(), " ", targets.scalar_type());
  TORCH_CHECK(targets.device() == logits.device(), "fused_ce: targets on ", targets.device(),
              ", logits on ", logits.device());
  DepthLayout layout{};
  layout.depths = depths;
  layout.rows = targets.size(0);
  int64_t offset = 0;
  for (int64_t d = 0; d < depths; ++d) {
    TORCH_CHECK(width[d] >= 0 && valid[d] >= 0 && valid[d] <= width[d], "fused_ce: depth ", d,
                " has width ", width[d], " and valid ", valid[d]);
    layout.offset[d] = offset;
    layout.width[d] = width[d];
    layout.valid[d] = valid[d];
    offset += layout.rows * width[d];
  }
  TORCH_CHECK(logits.numel() >= offset, "fused_ce: logits buffer holds ", logits.numel(),
              " elements, the layout needs ", offset);
  return layout;
}

// Checks the per-row log-sum-exp [rows, D] and per-depth gradient scale [D] of softmax_grad_.
inline void check_grad_inputs(const DepthLayout& layout, const at::Tensor& logits,
                              const at::Tensor& lse, const at::Tensor& scale) {
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 2 &&
                  lse.size(0) == layout.rows && lse.size(1) == layout.depths,
              "fused_ce: lse must be a contiguous float32 [", layout.rows, ", ", layout.depths,
              "] tensor, got ", lse.sizes(), " ", lse.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 1 &&
                  scale.size(0) == layout.depths,
              "fused_ce: scale must be a contiguous float32 [", layout.depths, "] tensor, got ",
              scale.sizes(), " ", scale.scalar_type());
  TORCH_CHECK(lse.device() == logits.device() && scale.device() == logits.device(),
              "fused_ce: lse and scale must be on the logits' device ", logits.device());
}

}  // namespace fused_ce
