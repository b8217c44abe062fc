#pragma once
#include <c10/core/Device.h>

#include "step_math.h"

namespace fastdiff {
// Runs guided_step_cuda on torch's current stream for `device`; raises on a launch error.
template <typename T>
void guided_step_cuda_on_current_stream(const StepArgs<T>& s, c10::Device device);
}
