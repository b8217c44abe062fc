// CUDA implementation of the guided step, in plain CUDA (no ATen or c10 headers) so that nvcc can compile it
// on machines whose torch has no CUDA. The torch glue lives in step_cuda_glue.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>

#include "step_cuda.h"

namespace fastdiff {

constexpr int kThreads = 256;

inline int blocks_for(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < INT_MAX ? blocks : INT_MAX);
}

// Vectors of kVec<TX> elements over [0, packed_elements), then single elements (the tail, or everything when a
// pointer is misaligned). The launch gives each thread one unit of work, so the loops run once (more only past
// INT_MAX blocks) and unrolling them would only add code and registers.
template <bool kUncond, int kHist, bool kNoise, bool kWriteE, typename TX, typename TD, typename Acc>
__global__ void guided_step_kernel(const StepArgs<TX, TD, Acc> s) {
  constexpr int V = kVec<TX>;
  const auto c = load_coefficients<kHist>(s);
  const int64_t packed = packed_elements<kHist>(s);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(blockDim.x) * gridDim.x;
#pragma unroll 1
  for (int64_t i = thread * V; i < packed; i += threads * V) {
    step_elements<V, kUncond, kHist, kNoise, kWriteE>(s, c, i);
  }
#pragma unroll 1
  for (int64_t i = packed + thread; i < s.n; i += threads) {
    step_elements<1, kUncond, kHist, kNoise, kWriteE>(s, c, i);
  }
}

// One vector (or element) per thread, on as many blocks as that takes rather than a grid-stride loop over a
// capped grid: each thread then issues every load of its vector at once and no load waits behind an earlier
// iteration's stores, so the bytes in flight are limited only by occupancy, on any GPU, without querying it.
template <typename TX, typename TD, typename Acc>
int guided_step_cuda(const StepArgs<TX, TD, Acc>& s, void* stream) {
  if (s.n == 0) return 0;
  dispatch_step_flags(s, [&](auto uncond, auto hist, auto noise, auto write_e) {
    constexpr int kHist = decltype(hist)::value;
    const int64_t packed = packed_elements<kHist>(s);
    const int64_t vectors = packed / kVec<TX>, singles = s.n - packed;
    guided_step_kernel<decltype(uncond)::value, kHist, decltype(noise)::value, decltype(write_e)::value>
        <<<blocks_for(vectors > singles ? vectors : singles), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(s);
  });
  return static_cast<int>(cudaGetLastError());
}

// The backward: tensor gradients per element, and the coefficient gradients (dot products) summed per thread,
// then per block in shared memory, into one row of `partial` per block; the caller sums the rows. Partial sums
// are double so that long float32 reductions stay exact enough. The grid is capped, as `partial` has a row per
// block; a grid-stride loop covers the rest.
template <bool kUncond, int kHist, bool kNoise, typename TX, typename TD, typename Acc>
__global__ void guided_step_backward_kernel(const StepGradArgs<TX, TD, Acc> g, double* __restrict__ partial) {
  const auto c = load_coefficients<kHist>(g.step);
  Acc sums[kNumCoef] = {};
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < g.step.n; i += stride) {
    step_grad_element<kUncond, kHist, kNoise>(g, c, i, sums);
  }
  __shared__ double block_sums[kThreads];
  // Unrolled, so that sums[k] has a constant index and stays in registers.
#pragma unroll
  for (int k = 0; k < kNumCoef; ++k) {
    block_sums[threadIdx.x] = static_cast<double>(sums[k]);
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) block_sums[threadIdx.x] += block_sums[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.x) * kNumCoef + k] = block_sums[0];
    __syncthreads();
  }
}

int guided_step_backward_blocks(int64_t n) {
  const int blocks = blocks_for(n > 0 ? n : 1);
  return blocks < 65535 ? blocks : 65535;
}

template <typename TX, typename TD, typename Acc>
int guided_step_backward_cuda(const StepGradArgs<TX, TD, Acc>& g, double* partial, void* stream) {
  const auto& s = g.step;
  dispatch_step_flags(s.d_uncond != nullptr, s.n_history, s.noise != nullptr, true,
                      [&](auto uncond, auto hist, auto noise, auto) {
                        guided_step_backward_kernel<decltype(uncond)::value, decltype(hist)::value,
                                                    decltype(noise)::value>
                            <<<guided_step_backward_blocks(s.n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
                                g, partial);
                      });
  return static_cast<int>(cudaGetLastError());
}

template int guided_step_cuda(const StepArgs<float, float, float>&, void*);
template int guided_step_cuda(const StepArgs<float, __half, float>&, void*);
template int guided_step_cuda(const StepArgs<float, __nv_bfloat16, float>&, void*);
template int guided_step_cuda(const StepArgs<__half, __half, float>&, void*);
template int guided_step_cuda(const StepArgs<__nv_bfloat16, __nv_bfloat16, float>&, void*);
template int guided_step_cuda(const StepArgs<double, double, double>&, void*);

template int guided_step_backward_cuda(const StepGradArgs<float, float, float>&, double*, void*);
template int guided_step_backward_cuda(const StepGradArgs<float, __half, float>&, double*, void*);
template int guided_step_backward_cuda(const StepGradArgs<float, __nv_bfloat16, float>&, double*, void*);
template int guided_step_backward_cuda(const StepGradArgs<__half, __half, float>&, double*, void*);
template int guided_step_backward_cuda(const StepGradArgs<__nv_bfloat16, __nv_bfloat16, float>&, double*, void*);
template int guided_step_backward_cuda(const StepGradArgs<double, double, double>&, double*, void*);

}  // namespace fastdiff
