// Fused multi-depth cross-entropy, CUDA kernels on one chunk of one depth's logits
// (csrc/fused_ce_layout.h): one thread block per row. A row is read with 16-byte loads
// (8 bfloat16 or 4 float per load) when every row starts 16-byte aligned, else one element
// at a time. Each thread keeps an online (max, sum of exp) pair and its first arg-max;
// the block combines them with fixed-shape warp shuffles and one shared-memory pass, so
// results are bitwise reproducible. All math is float.
//
//   row_stats:      per row max, sum exp(z - max), target logit, first arg-max (TP pass 1)
//   softmax_grad_:  in place (exp(z - lse) - one_hot) * scale, with a given lse (TP pass 2)
//   ce_rows_:       both in one kernel: statistics, then the gradient in place; the second
//                   read of the row hits L2 (a row is at most 64 KiB), so the row crosses
//                   HBM once each way
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <tuple>

#include "fused_ce_layout.h"

namespace fused_ce {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// kN elements of one 16-byte (or, kN = 1, one-element) load.
template <typename scalar_t, int kN>
struct alignas(sizeof(scalar_t) * kN) Pack {
  scalar_t v[kN];
};

// One thread's (or the block's) partial statistics of a row.
struct Partial {
  float max;      // -inf: no valid column seen
  float sumexp;   // sum of exp(z - max) over the columns seen
  int64_t arg;    // first column holding max; INT64_MAX while none
};

__device__ __forceinline__ Partial combine(const Partial& a, const Partial& b) {
  Partial out;
  out.max = fmaxf(a.max, b.max);
  if (out.max == -INFINITY) return Partial{-INFINITY, 0.0f, INT64_MAX};
  out.sumexp = (a.max == -INFINITY ? 0.0f : a.sumexp * expf(a.max - out.max)) +
               (b.max == -INFINITY ? 0.0f : b.sumexp * expf(b.max - out.max));
  // larger value wins, ties go to the lower column
  out.arg = (b.max > a.max || (b.max == a.max && b.arg < a.arg)) ? b.arg : a.arg;
  return out;
}

// The block's statistics of its row, in every thread.
__device__ __forceinline__ Partial block_combine(Partial p) {
  __shared__ float warp_max[kWarps];
  __shared__ float warp_sum[kWarps];
  __shared__ int64_t warp_arg[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) {
    Partial other;
    other.max = __shfl_down_sync(0xffffffffu, p.max, offset);
    other.sumexp = __shfl_down_sync(0xffffffffu, p.sumexp, offset);
    other.arg = __shfl_down_sync(0xffffffffu, p.arg, offset);
    p = combine(p, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_max[warp] = p.max;
    warp_sum[warp] = p.sumexp;
    warp_arg[warp] = p.arg;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) p = combine(p, Partial{warp_max[w], warp_sum[w], warp_arg[w]});
    warp_max[0] = p.max;
    warp_sum[0] = p.sumexp;
    warp_arg[0] = p.arg;
  }
  __syncthreads();
  return Partial{warp_max[0], warp_sum[0], warp_arg[0]};
}

// Pass 1 over a row: the block's statistics over columns [0, valid).
template <typename scalar_t, int kN>
__device__ __forceinline__ Partial row_partial(const scalar_t* __restrict__ z, int64_t valid) {
  Partial p{-INFINITY, 0.0f, INT64_MAX};
  const auto* packs = reinterpret_cast<const Pack<scalar_t, kN>*>(z);
  const int64_t count = (valid + kN - 1) / kN;  // packs holding a valid column (rows are padded to kN)
  for (int64_t k = threadIdx.x; k < count; k += kThreads) {
    const Pack<scalar_t, kN> pack = packs[k];
    float v[kN];
    float pack_max = -INFINITY;
    int64_t pack_arg = INT64_MAX;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      const int64_t column = k * kN + j;
      v[j] = column < valid ? to_float(pack.v[j]) : -INFINITY;
      if (v[j] > pack_max) {  // columns increase: the first maximum is kept
        pack_max = v[j];
        pack_arg = column;
      }
    }
    if (pack_max == -INFINITY) continue;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kN; ++j) sum += expf(v[j] - pack_max);  // -inf columns add 0
    p = combine(p, Partial{pack_max, sum, pack_arg});
  }
  return block_combine(p);
}

// Pass 2 over a row, in place: z <- (exp(z - lse) - one_hot(target)) * scale; padding <- 0.
template <typename scalar_t, int kN>
__device__ __forceinline__ void row_grad(scalar_t* __restrict__ z, int64_t width, int64_t valid,
                                         int64_t target, float lse, float scale) {
  auto* packs = reinterpret_cast<Pack<scalar_t, kN>*>(z);
  for (int64_t k = threadIdx.x; k < width / kN; k += kThreads) {
    Pack<scalar_t, kN> pack = packs[k];
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      const int64_t column = k * kN + j;
      float g = 0.0f;
      if (column < valid) g = (expf(to_float(pack.v[j]) - lse) - (column == target ? 1.0f : 0.0f)) * scale;
      pack.v[j] = static_cast<scalar_t>(g);
    }
    packs[k] = pack;
  }
}

template <typename scalar_t, int kN>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                     const RowsLayout layout, float* __restrict__ max_out,
                     float* __restrict__ sumexp_out, float* __restrict__ target_out,
                     int64_t* __restrict__ argmax_out) {
  const int64_t row = blockIdx.x;
  const scalar_t* z = logits + row * layout.width;
  const Partial p = row_partial<scalar_t, kN>(z, layout.valid);
  if (threadIdx.x == 0) {
    const int64_t target = targets[row];
    const bool any = p.max != -INFINITY;
    max_out[row] = p.max;
    sumexp_out[row] = any ? p.sumexp : 0.0f;
    argmax_out[row] = any ? p.arg : -1;
    target_out[row] = (target >= 0 && target < layout.valid) ? to_float(z[target]) : 0.0f;
  }
}

template <typename scalar_t, int kN>
__global__ void __launch_bounds__(kThreads)
    softmax_grad_kernel(scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                        const float* __restrict__ lse, const float* __restrict__ scale,
                        const RowsLayout layout) {
  const int64_t row = blockIdx.x;
  row_grad<scalar_t, kN>(logits + row * layout.width, layout.width, layout.valid, targets[row],
                         lse[row], scale[0]);
}

template <typename scalar_t, int kN>
__global__ void __launch_bounds__(kThreads)
    ce_rows_kernel(scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                   const float* __restrict__ scale, const RowsLayout layout,
                   float* __restrict__ lse_out, float* __restrict__ target_out,
                   int64_t* __restrict__ argmax_out) {
  const int64_t row = blockIdx.x;
  scalar_t* z = logits + row * layout.width;
  const int64_t target = targets[row];
  const Partial p = row_partial<scalar_t, kN>(z, layout.valid);
  const bool any = p.max != -INFINITY;
  const float lse = any ? p.max + logf(p.sumexp) : -INFINITY;
  if (threadIdx.x == 0) {  // read before the row is overwritten (row_partial ends in a barrier)
    lse_out[row] = lse;
    argmax_out[row] = any ? p.arg : -1;
    target_out[row] = (target >= 0 && target < layout.valid) ? to_float(z[target]) : 0.0f;
  }
  __syncthreads();
  row_grad<scalar_t, kN>(z, layout.width, layout.valid, target, lse, scale[0]);
}

// Elements per load for this buffer: 16 bytes when every row starts 16-byte aligned.
template <typename scalar_t>
constexpr int kVector = 16 / sizeof(scalar_t);

template <typename scalar_t>
bool vectorized(const at::Tensor& logits) {
  const auto address = reinterpret_cast<std::uintptr_t>(logits.data_ptr());
  return address % 16 == 0 && (logits.size(1) * sizeof(scalar_t)) % 16 == 0;
}

// Launches kernel<scalar_t, N> with N = the vector width or 1, over `rows` blocks.
#define FUSED_CE_DISPATCH(logits, KERNEL, ...)                                                  \
  do {                                                                                          \
    const auto stream = c10::cuda::getCurrentCUDAStream();                                      \
    const auto blocks = static_cast<unsigned>((logits).size(0));                                \
    if ((logits).scalar_type() == at::kFloat) {                                                 \
      using scalar_t = float;                                                                   \
      if (vectorized<scalar_t>(logits))                                                         \
        KERNEL<scalar_t, kVector<scalar_t>><<<blocks, kThreads, 0, stream>>>(__VA_ARGS__);      \
      else                                                                                      \
        KERNEL<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(__VA_ARGS__);                      \
    } else {                                                                                    \
      using scalar_t = c10::BFloat16;                                                           \
      if (vectorized<scalar_t>(logits))                                                         \
        KERNEL<scalar_t, kVector<scalar_t>><<<blocks, kThreads, 0, stream>>>(__VA_ARGS__);      \
      else                                                                                      \
        KERNEL<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(__VA_ARGS__);                      \
    }                                                                                           \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                             \
  } while (0)

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fused_ce CUDA kernels: ", name, " is on ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_cuda(const at::Tensor& logits,
                                                                          const at::Tensor& targets,
                                                                          int64_t valid) {
  const RowsLayout layout = make_layout(logits, targets, valid);
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto f32 = targets.options().dtype(at::kFloat);
  auto max = at::empty({layout.rows}, f32);
  auto sumexp = at::empty_like(max);
  auto target_logit = at::empty_like(max);
  auto argmax = at::empty({layout.rows}, targets.options());
  if (layout.rows == 0) return {max, sumexp, target_logit, argmax};
  FUSED_CE_DISPATCH(logits, row_stats_kernel, logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(),
                    layout, max.data_ptr<float>(), sumexp.data_ptr<float>(),
                    target_logit.data_ptr<float>(), argmax.data_ptr<int64_t>());
  return {max, sumexp, target_logit, argmax};
}

void softmax_grad_cuda_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                        const at::Tensor& scale, int64_t valid) {
  const RowsLayout layout = make_layout(logits, targets, valid);
  check_cuda(logits, "logits");
  check_f32(lse, layout.rows, logits, "lse");
  check_f32(scale, 1, logits, "scale");
  const c10::cuda::CUDAGuard guard(logits.device());
  if (layout.rows == 0) return;
  FUSED_CE_DISPATCH(logits, softmax_grad_kernel, logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(),
                    lse.data_ptr<float>(), scale.data_ptr<float>(), layout);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_rows_cuda_(at::Tensor& logits, const at::Tensor& targets,
                                                             int64_t valid, const at::Tensor& scale) {
  const RowsLayout layout = make_layout(logits, targets, valid);
  check_cuda(logits, "logits");
  check_f32(scale, 1, logits, "scale");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto f32 = targets.options().dtype(at::kFloat);
  auto lse = at::empty({layout.rows}, f32);
  auto target_logit = at::empty_like(lse);
  auto argmax = at::empty({layout.rows}, targets.options());
  if (layout.rows == 0) return {lse, target_logit, argmax};
  FUSED_CE_DISPATCH(logits, ce_rows_kernel, logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(),
                    scale.data_ptr<float>(), layout, lse.data_ptr<float>(), target_logit.data_ptr<float>(),
                    argmax.data_ptr<int64_t>());
  return {lse, target_logit, argmax};
}

}  // namespace fused_ce
