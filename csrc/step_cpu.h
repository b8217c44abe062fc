#pragma once
#include "step_math.h"

namespace fastdiff {
template <typename T>
void guided_step_cpu(const StepArgs<T>& s);
}
