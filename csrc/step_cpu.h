#pragma once
#include "step_math.h"

namespace fastdiff {
template <typename TX, typename TD, typename Acc>
void guided_step_cpu(const StepArgs<TX, TD, Acc>& s);
}
