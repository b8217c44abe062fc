#pragma once
#include <c10/core/Device.h>

#include "step_math.h"

namespace fastdiff {
// Runs guided_step_cuda on torch's current stream for `device`; raises on a launch error. TX and TD are
// torch's storage types (float, double, c10::Half, c10::BFloat16).
template <typename TX, typename TD, typename Acc>
void guided_step_cuda_on_current_stream(const StepArgs<TX, TD, Acc>& s, c10::Device device);
// guidance_sums on the current stream; `partial` (device memory) as guidance_sums_cuda in step_cuda.h.
template <typename TX, typename TD, typename Acc>
void guidance_sums_cuda_on_current_stream(const SumsArgs<TX, TD, Acc>& s, double* partial, c10::Device device);
// The backward on the current stream; `partial` (device memory) as guided_step_backward_cuda in step_cuda.h.
template <typename TX, typename TD, typename Acc>
void guided_step_backward_cuda_on_current_stream(const StepGradArgs<TX, TD, Acc>& g, double* partial,
                                                 c10::Device device);
}
