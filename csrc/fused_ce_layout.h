// Layout of one chunk of one depth's logits and the argument checks shared by the CPU and
// CUDA kernels of the fused multi-depth cross-entropy.
//
// A chunk is a row-major, contiguous [rows, width] block of logits (float32 or bfloat16):
// `rows` hidden states against this rank's `width` classes of one depth. Columns
// [valid, width) are vocabulary padding: they never enter the softmax and their gradient
// is zero. targets is [rows] int64: the column of the row's target inside the block, or -1
// where the target lies outside it (another rank's vocabulary slice). Per-row statistics
// are [rows] float32 (arg-max: int64); the gradient scale is a float32 [1] tensor on the
// logits' device, read by the kernel so that the host never waits for it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fused_ce {

struct RowsLayout {
  int64_t rows;
  int64_t width;  // columns of the block (its row stride)
  int64_t valid;  // leading columns that are real codes
};

inline RowsLayout make_layout(const at::Tensor& logits, const at::Tensor& targets, int64_t valid) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              "fused_ce: logits must be a contiguous [rows, width] tensor, got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "fused_ce: logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.is_contiguous() &&
                  targets.scalar_type() == at::kLong,
              "fused_ce: targets must be a contiguous int64 [", logits.size(0), "] tensor, got ",
              targets.sizes(), " ", targets.scalar_type());
  TORCH_CHECK(targets.device() == logits.device(), "fused_ce: targets on ", targets.device(),
              ", logits on ", logits.device());
  TORCH_CHECK(valid >= 0 && valid <= logits.size(1), "fused_ce: valid columns ", valid,
              " outside [0, ", logits.size(1), "]");
  return RowsLayout{logits.size(0), logits.size(1), valid};
}

// A float32 tensor of `numel` elements on the logits' device, contiguous.
inline void check_f32(const at::Tensor& t, int64_t numel, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel,
              "fused_ce: ", name, " must be a contiguous float32 tensor of ", numel,
              " elements, got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), "fused_ce: ", name, " on ", t.device(),
              ", logits on ", logits.device());
}

}  // namespace fused_ce
