#pragma once
#include "step_math.h"

namespace fastdiff {
// Launches on `stream` (a cudaStream_t); returns the cudaError_t of the launch as an int.
template <typename T>
int guided_step_cuda(const StepArgs<T>& s, void* stream);
}
