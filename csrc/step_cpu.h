#pragma once
#include "step_math.h"

namespace fastdiff {
template <typename TX, typename TD, typename Acc>
void guided_step_cpu(const StepArgs<TX, TD, Acc>& s);

// Writes the kNumSums sums of each sample to s.out.
template <typename TX, typename TD, typename Acc>
void guidance_sums_cpu(const SumsArgs<TX, TD, Acc>& s);

// Writes the tensor gradients through the pointers in g and the kNumCoef coefficient gradients to grad_coef.
template <typename TX, typename TD, typename Acc>
void guided_step_backward_cpu(const StepGradArgs<TX, TD, Acc>& g, double* grad_coef);
}
