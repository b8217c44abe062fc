// CUDA implementation of the guided step, in plain CUDA (no ATen or c10 headers) so that nvcc can compile it
// on machines whose torch has no CUDA. The torch glue lives in step_cuda_glue.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "step_cuda.h"

namespace fastdiff {

constexpr int kThreads = 256;

// A grid-stride loop: enough blocks to fill the device, capped so huge tensors reuse threads.
inline int grid_size(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 ? blocks : 65535);
}

template <bool kUncond, int kHist, bool kNoise, bool kWriteE, typename TX, typename TD, typename Acc>
__global__ void guided_step_kernel(StepArgs<TX, TD, Acc> s) {
  load_coefficients(s);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < s.n; i += stride) {
    step_element<kUncond, kHist, kNoise, kWriteE>(s, i);
  }
}

template <typename TX, typename TD, typename Acc>
int guided_step_cuda(const StepArgs<TX, TD, Acc>& s, void* stream) {
  if (s.n == 0) return 0;
  const int blocks = grid_size(s.n);
  dispatch_step_flags(s, [&](auto uncond, auto hist, auto noise, auto write_e) {
    guided_step_kernel<decltype(uncond)::value, decltype(hist)::value, decltype(noise)::value,
                       decltype(write_e)::value><<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(s);
  });
  return static_cast<int>(cudaGetLastError());
}

// The backward: tensor gradients per element, and the coefficient gradients (dot products) summed per thread,
// then per block in shared memory, into one row of `partial` per block; the caller sums the rows. Partial sums
// are double so that long float32 reductions stay exact enough.
template <bool kUncond, int kHist, bool kNoise, typename TX, typename TD, typename Acc>
__global__ void guided_step_backward_kernel(StepGradArgs<TX, TD, Acc> g, double* partial) {
  load_coefficients(g.step);
  Acc sums[kNumCoef] = {};
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < g.step.n; i += stride) {
    step_grad_element<kUncond, kHist, kNoise>(g, i, sums);
  }
  __shared__ double block_sums[kThreads];
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

int guided_step_backward_blocks(int64_t n) { return grid_size(n > 0 ? n : 1); }

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
