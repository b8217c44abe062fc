// CUDA implementation of the guided step, in plain CUDA (no ATen or c10 headers) so that nvcc can compile it
// on machines whose torch has no CUDA. The torch glue lives in step_cuda_glue.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "step_cuda.h"

namespace fastdiff {

template <bool kUncond, int kHist, bool kNoise, bool kWriteE, typename TX, typename TD, typename Acc>
__global__ void guided_step_kernel(StepArgs<TX, TD, Acc> s) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < s.n; i += stride) {
    step_element<kUncond, kHist, kNoise, kWriteE>(s, i);
  }
}

template <typename TX, typename TD, typename Acc>
int guided_step_cuda(const StepArgs<TX, TD, Acc>& s, void* stream) {
  if (s.n == 0) return 0;
  constexpr int kThreads = 256;
  // A grid-stride loop: enough blocks to fill the device, capped so huge tensors reuse threads.
  const int64_t blocks64 = (s.n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(blocks64 < 65535 ? blocks64 : 65535);
  dispatch_step_flags(s, [&](auto uncond, auto hist, auto noise, auto write_e) {
    guided_step_kernel<decltype(uncond)::value, decltype(hist)::value, decltype(noise)::value,
                       decltype(write_e)::value><<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(s);
  });
  return static_cast<int>(cudaGetLastError());
}

template int guided_step_cuda(const StepArgs<float, float, float>&, void*);
template int guided_step_cuda(const StepArgs<float, __half, float>&, void*);
template int guided_step_cuda(const StepArgs<float, __nv_bfloat16, float>&, void*);
template int guided_step_cuda(const StepArgs<__half, __half, float>&, void*);
template int guided_step_cuda(const StepArgs<__nv_bfloat16, __nv_bfloat16, float>&, void*);
template int guided_step_cuda(const StepArgs<double, double, double>&, void*);

}  // namespace fastdiff
