// Fused multi-depth cross-entropy, CPU kernels on one chunk of one depth's logits
// (csrc/fused_ce_layout.h): per-row statistics, the in-place softmax-minus-one-hot
// gradient, and both in one sweep (ce_rows_: the row is still in cache for the second pass).
//
// Rows are split over threads with at::parallel_for; each row is done by one thread in a
// fixed order, so results are bitwise reproducible. The inner loops are plain float loops
// the compiler vectorises; on x86-64 they are cloned for AVX-512 and AVX2 and picked at
// load time. bfloat16 rows are widened into a per-thread float scratch row first;
// statistics are always accumulated in float.
// ATen and torch's pybind11 type casters only: <torch/extension.h> also pulls in the whole C++
// frontend (torch/all.h), which triples this file's compile time (23 s of headers against 7.5 s).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <cmath>
#include <tuple>
#include <vector>

#include "fused_ce_layout.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSED_CE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSED_CE_VECTOR_CLONES
#endif

namespace fused_ce {
namespace {

constexpr int kLanes = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// exp(x) for x <= 0 within ~2 ulp (Cephes expf): Cody-Waite reduction by ln 2 and a
// degree-5 polynomial, written without library calls so that it vectorises.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const auto exponent = static_cast<uint32_t>(static_cast<int32_t>(n) + 127);
  return y * bits_to_float(exponent << 23);
}

struct RowStats {
  float max;
  float sumexp;  // sum of exp(z - max) over the valid columns
  int64_t argmax;  // first column holding max; -1 for a row without valid columns
};

// Reductions keep kLanes independent partial results (several vector registers), so
// the loops vectorise without reassociation flags and are not latency bound.
FUSED_CE_VECTOR_CLONES
RowStats row_stats_f32(const float* z, int64_t valid) {
  const int64_t body = valid - valid % kLanes;
  float lane[kLanes];
  for (int l = 0; l < kLanes; ++l) lane[l] = kNegInf;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] = lane[l] > z[i + l] ? lane[l] : z[i + l];
  }
  float max = kNegInf;
  for (int l = 0; l < kLanes; ++l) max = max > lane[l] ? max : lane[l];
  for (int64_t i = body; i < valid; ++i) max = max > z[i] ? max : z[i];

  // First column equal to max: the first block of kLanes holding it, then the column.
  int64_t argmax = 0;
  for (; argmax < body; argmax += kLanes) {
    bool hit = false;
    for (int l = 0; l < kLanes; ++l) hit |= z[argmax + l] == max;
    if (hit) break;
  }
  while (argmax < valid && z[argmax] != max) ++argmax;
  if (argmax == valid) return RowStats{kNegInf, 0.0f, -1};  // no valid columns (or all NaN)

  for (int l = 0; l < kLanes; ++l) lane[l] = 0.0f;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] += exp_nonpositive(z[i + l] - max);
  }
  float sum = 0.0f;
  for (int64_t i = body; i < valid; ++i) sum += exp_nonpositive(z[i] - max);
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  return RowStats{max, sum, argmax};
}

// z[:valid] = exp(z - lse) * scale, z[valid:width] = 0 (padding), z[target] -= scale.
FUSED_CE_VECTOR_CLONES
void softmax_grad_f32(float* z, int64_t width, int64_t valid, int64_t target, float lse,
                      float scale) {
  for (int64_t i = 0; i < valid; ++i) z[i] = exp_nonpositive(z[i] - lse) * scale;
  for (int64_t i = valid; i < width; ++i) z[i] = 0.0f;
  if (target >= 0 && target < valid) z[target] -= scale;
}

FUSED_CE_VECTOR_CLONES
void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(static_cast<uint32_t>(src[i]) << 16);
}

// Round to nearest even, NaN kept a (quiet) NaN.
FUSED_CE_VECTOR_CLONES
void narrow_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = float_to_bits(src[i]);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>(src[i] != src[i] ? 0x7fc0u : rounded);
  }
}

// A row as float: the row itself, or (bfloat16) its widened copy in `scratch`.
const float* row_as_float(const float* row, int64_t, std::vector<float>&) { return row; }

const float* row_as_float(const at::BFloat16* row, int64_t n, std::vector<float>& scratch) {
  scratch.resize(static_cast<size_t>(n));
  widen_bf16(reinterpret_cast<const uint16_t*>(row), scratch.data(), n);
  return scratch.data();
}

float target_of(const float* z, int64_t target, int64_t valid) {
  return (target >= 0 && target < valid) ? z[target] : 0.0f;
}

// The gradient of one row in place; bfloat16 rows go through `scratch` (already widened
// there when `widened`).
void grad_row(float* row, const RowsLayout& layout, int64_t target, float lse, float scale,
              std::vector<float>&, bool) {
  softmax_grad_f32(row, layout.width, layout.valid, target, lse, scale);
}

void grad_row(at::BFloat16* row, const RowsLayout& layout, int64_t target, float lse, float scale,
              std::vector<float>& scratch, bool widened) {
  auto* bits = reinterpret_cast<uint16_t*>(row);
  if (!widened) {
    scratch.resize(static_cast<size_t>(layout.width));
    widen_bf16(bits, scratch.data(), layout.width);
  }
  softmax_grad_f32(scratch.data(), layout.width, layout.valid, target, lse, scale);
  narrow_bf16(scratch.data(), bits, layout.width);
}

template <typename scalar_t>
void row_stats_cpu(const RowsLayout& layout, const scalar_t* logits, const int64_t* targets,
                   float* max, float* sumexp, float* target_logit, int64_t* argmax) {
  at::parallel_for(0, layout.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t row = begin; row < end; ++row) {
      const float* z = row_as_float(logits + row * layout.width, layout.valid, scratch);
      const RowStats stats = row_stats_f32(z, layout.valid);
      max[row] = stats.max;
      sumexp[row] = stats.sumexp;
      argmax[row] = stats.argmax;
      target_logit[row] = target_of(z, targets[row], layout.valid);
    }
  });
}

template <typename scalar_t>
void softmax_grad_cpu(const RowsLayout& layout, scalar_t* logits, const int64_t* targets,
                      const float* lse, float scale) {
  at::parallel_for(0, layout.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t row = begin; row < end; ++row) {
      grad_row(logits + row * layout.width, layout, targets[row], lse[row], scale, scratch, false);
    }
  });
}

template <typename scalar_t>
void ce_rows_cpu(const RowsLayout& layout, scalar_t* logits, const int64_t* targets, float scale,
                 float* lse, float* target_logit, int64_t* argmax) {
  at::parallel_for(0, layout.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* z = logits + row * layout.width;
      const float* values = row_as_float(z, layout.width, scratch);
      const RowStats stats = row_stats_f32(values, layout.valid);
      const float row_lse = stats.argmax < 0 ? stats.max : stats.max + std::log(stats.sumexp);
      lse[row] = row_lse;
      argmax[row] = stats.argmax;
      target_logit[row] = target_of(values, targets[row], layout.valid);
      grad_row(z, layout, targets[row], row_lse, scale, scratch, true);
    }
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fused_ce CPU kernels: ", name, " is on ", t.device());
}

}  // namespace

// Per row: max, sum of exp(z - max), target logit (0 where not owned) and first arg-max
// column (-1 without valid columns); each [rows].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats(const at::Tensor& logits,
                                                                     const at::Tensor& targets,
                                                                     int64_t valid) {
  const RowsLayout layout = make_layout(logits, targets, valid);
  check_cpu(logits, "logits");
  const auto f32 = targets.options().dtype(at::kFloat);
  auto max = at::empty({layout.rows}, f32);
  auto sumexp = at::empty_like(max);
  auto target_logit = at::empty_like(max);
  auto argmax = at::empty({layout.rows}, targets.options());
  const auto* tgt = targets.data_ptr<int64_t>();
  if (logits.scalar_type() == at::kFloat) {
    row_stats_cpu(layout, logits.data_ptr<float>(), tgt, max.data_ptr<float>(),
                  sumexp.data_ptr<float>(), target_logit.data_ptr<float>(),
                  argmax.data_ptr<int64_t>());
  } else {
    row_stats_cpu(layout, logits.data_ptr<at::BFloat16>(), tgt, max.data_ptr<float>(),
                  sumexp.data_ptr<float>(), target_logit.data_ptr<float>(),
                  argmax.data_ptr<int64_t>());
  }
  return {max, sumexp, target_logit, argmax};
}

// In place: logits <- (exp(z - lse) - one_hot(target)) * scale; padding columns <- 0.
void softmax_grad_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                   const at::Tensor& scale, int64_t valid) {
  const RowsLayout layout = make_layout(logits, targets, valid);
  check_cpu(logits, "logits");
  check_f32(lse, layout.rows, logits, "lse");
  check_f32(scale, 1, logits, "scale");
  const auto* tgt = targets.data_ptr<int64_t>();
  const float s = scale.data_ptr<float>()[0];
  if (logits.scalar_type() == at::kFloat) {
    softmax_grad_cpu(layout, logits.data_ptr<float>(), tgt, lse.data_ptr<float>(), s);
  } else {
    softmax_grad_cpu(layout, logits.data_ptr<at::BFloat16>(), tgt, lse.data_ptr<float>(), s);
  }
}

// Both in one sweep, for a vocabulary that is not split: per row the log-sum-exp, target
// logit and first arg-max column ([rows] each), and the logits become the gradient in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_rows_(at::Tensor& logits,
                                                        const at::Tensor& targets,
                                                        int64_t valid, const at::Tensor& scale) {
  const RowsLayout layout = make_layout(logits, targets, valid);
  check_cpu(logits, "logits");
  check_f32(scale, 1, logits, "scale");
  const auto f32 = targets.options().dtype(at::kFloat);
  auto lse = at::empty({layout.rows}, f32);
  auto target_logit = at::empty_like(lse);
  auto argmax = at::empty({layout.rows}, targets.options());
  const auto* tgt = targets.data_ptr<int64_t>();
  const float s = scale.data_ptr<float>()[0];
  if (logits.scalar_type() == at::kFloat) {
    ce_rows_cpu(layout, logits.data_ptr<float>(), tgt, s, lse.data_ptr<float>(),
                target_logit.data_ptr<float>(), argmax.data_ptr<int64_t>());
  } else {
    ce_rows_cpu(layout, logits.data_ptr<at::BFloat16>(), tgt, s, lse.data_ptr<float>(),
                target_logit.data_ptr<float>(), argmax.data_ptr<int64_t>());
  }
  return {lse, target_logit, argmax};
}

}  // namespace fused_ce

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused multi-depth cross-entropy: CPU kernels on one chunk of one depth's logits";
  m.def("row_stats", &fused_ce::row_stats, "per-row max, sum-exp, target logit, arg-max",
        py::arg("logits"), py::arg("targets"), py::arg("valid"));
  m.def("softmax_grad_", &fused_ce::softmax_grad_,
        "in-place (softmax - one-hot) * scale with a given log-sum-exp", py::arg("logits"),
        py::arg("targets"), py::arg("lse"), py::arg("scale"), py::arg("valid"));
  m.def("ce_rows_", &fused_ce::ce_rows_,
        "per-row log-sum-exp, target logit, arg-max; the logits become the gradient in place",
        py::arg("logits"), py::arg("targets"), py::arg("valid"), py::arg("scale"));
}
