// Fused multi-depth cross-entropy, CUDA kernels: one thread block per (row, depth)
// computes that row's statistics, or rewrites it in place as its gradient; a single
// launch covers all depths of a chunk. Reductions are fixed-shape warp shuffles plus
// one shared-memory pass, so results are bitwise reproducible; accumulation is float.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <tuple>
#include <vector>

#include "fused_ce_layout.h"

namespace fused_ce {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// (value, column) pair order for the arg-max: larger value wins, ties go to the lower column.
__device__ __forceinline__ bool better(float v, int64_t i, float best_v, int64_t best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

__device__ __forceinline__ void block_max_arg(float& value, int64_t& index) {
  __shared__ float warp_value[kWarps];
  __shared__ int64_t warp_index[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float v = __shfl_down_sync(0xffffffffu, value, offset);
    const int64_t i = __shfl_down_sync(0xffffffffu, index, offset);
    if (better(v, i, value, index)) {
      value = v;
      index = i;
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_value[warp] = value;
    warp_index[warp] = index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      if (better(warp_value[w], warp_index[w], value, index)) {
        value = warp_value[w];
        index = warp_index[w];
      }
    }
    warp_value[0] = value;
    warp_index[0] = index;
  }
  __syncthreads();
  value = warp_value[0];
  index = warp_index[0];
}

__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sum[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sum[threadIdx.x / 32] = value;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += warp_sum[w];
  }
  return total;  // valid in thread 0
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                     const DepthLayout layout, float* __restrict__ max_out,
                     float* __restrict__ sumexp_out, float* __restrict__ target_out,
                     int64_t* __restrict__ argmax_out) {
  const int64_t task = blockIdx.x;  // row * depths + depth
  const int64_t row = task / layout.depths, d = task % layout.depths;
  const int64_t valid = layout.valid[d];
  const scalar_t* z = logits + layout.offset[d] + row * layout.width[d];

  float max = -INFINITY;
  int64_t argmax = valid;  // "none" sorts after every real column
  for (int64_t i = threadIdx.x; i < valid; i += kThreads) {
    const float v = to_float(z[i]);
    if (v > max) {  // strided columns increase: the first maximum of this thread is kept
      max = v;
      argmax = i;
    }
  }
  block_max_arg(max, argmax);

  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < valid; i += kThreads) sum += expf(to_float(z[i]) - max);
  sum = block_sum(sum);

  if (threadIdx.x == 0) {
    const int64_t target = targets[task];
    max_out[task] = max;
    sumexp_out[task] = argmax < valid ? sum : 0.0f;
    argmax_out[task] = argmax < valid ? argmax : -1;
    target_out[task] = (target >= 0 && target < valid) ? to_float(z[target]) : 0.0f;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    softmax_grad_kernel(scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                        const float* __restrict__ lse, const float* __restrict__ scale,
                        const DepthLayout layout) {
  const int64_t task = blockIdx.x;
  const int64_t row = task / layout.depths, d = task % layout.depths;
  const int64_t width = layout.width[d], valid = layout.valid[d], target = targets[task];
  const float row_lse = lse[task], depth_scale = scale[d];
  scalar_t* z = logits + layout.offset[d] + row * width;
  for (int64_t i = threadIdx.x; i < width; i += kThreads) {
    float g = 0.0f;
    if (i < valid) g = (expf(to_float(z[i]) - row_lse) - (i == target ? 1.0f : 0.0f)) * depth_scale;
    z[i] = static_cast<scalar_t>(g);
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fused_ce CUDA kernels: ", name, " is on ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const std::vector<int64_t>& width,
    const std::vector<int64_t>& valid) {
  const DepthLayout layout = make_layout(logits, targets, width, valid);
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto f32 = targets.options().dtype(at::kFloat);
  auto max = at::empty({layout.rows, layout.depths}, f32);
  auto sumexp = at::empty_like(max);
  auto target_logit = at::empty_like(max);
  auto argmax = at::empty({layout.rows, layout.depths}, targets.options());
  const int64_t blocks = layout.rows * layout.depths;
  if (blocks == 0) return {max, sumexp, target_logit, argmax};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (logits.scalar_type() == at::kFloat) {
    row_stats_kernel<float><<<blocks, kThreads, 0, stream>>>(
        logits.data_ptr<float>(), targets.data_ptr<int64_t>(), layout, max.data_ptr<float>(),
        sumexp.data_ptr<float>(), target_logit.data_ptr<float>(), argmax.data_ptr<int64_t>());
  } else {
    row_stats_kernel<c10::BFloat16><<<blocks, kThreads, 0, stream>>>(
        logits.data_ptr<c10::BFloat16>(), targets.data_ptr<int64_t>(), layout,
        max.data_ptr<float>(), sumexp.data_ptr<float>(), target_logit.data_ptr<float>(),
        argmax.data_ptr<int64_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {max, sumexp, target_logit, argmax};
}

void softmax_grad_cuda_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                        const at::Tensor& scale, const std::vector<int64_t>& width,
                        const std::vector<int64_t>& valid) {
  const DepthLayout layout = make_layout(logits, targets, width, valid);
  check_grad_inputs(layout, logits, lse, scale);
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t blocks = layout.rows * layout.depths;
  if (blocks == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (logits.scalar_type() == at::kFloat) {
    softmax_grad_kernel<float><<<blocks, kThreads, 0, stream>>>(
        logits.data_ptr<float>(), targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
        scale.data_ptr<float>(), layout);
  } else {
    softmax_grad_kernel<c10::BFloat16><<<blocks, kThreads, 0, stream>>>(
        logits.data_ptr<c10::BFloat16>(), targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
        scale.data_ptr<float>(), layout);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fused_ce
