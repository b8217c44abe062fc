// Compiled only when torch has CUDA: binds the plain-CUDA launcher to torch's current stream.
#include "step_cuda_glue.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "step_cuda.h"

namespace fastdiff {

template <typename T>
void guided_step_cuda_on_current_stream(const StepArgs<T>& s, c10::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  const int err = guided_step_cuda(s, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == 0, "guided_step: CUDA launch failed with error ", err);
}

template void guided_step_cuda_on_current_stream<float>(const StepArgs<float>&, c10::Device);
template void guided_step_cuda_on_current_stream<double>(const StepArgs<double>&, c10::Device);

}  // namespace fastdiff
