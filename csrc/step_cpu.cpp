// CPU implementation of the guided step: one OpenMP-parallel pass over memory.
#include "step_cpu.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastdiff {

template <typename TX, typename TD, typename Acc>
void guided_step_cpu(const StepArgs<TX, TD, Acc>& s) {
  // Below this size the thread start-up costs more than the pass itself.
  constexpr int64_t kParallelGrain = 1 << 15;
#pragma omp parallel for schedule(static) if (s.n > kParallelGrain)
  for (int64_t i = 0; i < s.n; ++i) step_element(s, i);
}

template void guided_step_cpu(const StepArgs<float, float, float>&);
template void guided_step_cpu(const StepArgs<float, c10::Half, float>&);
template void guided_step_cpu(const StepArgs<float, c10::BFloat16, float>&);
template void guided_step_cpu(const StepArgs<c10::Half, c10::Half, float>&);
template void guided_step_cpu(const StepArgs<c10::BFloat16, c10::BFloat16, float>&);
template void guided_step_cpu(const StepArgs<double, double, double>&);

}  // namespace fastdiff
