// CPU implementation of the guided step: one OpenMP-parallel pass over memory.
#include "step_cpu.h"

namespace fastdiff {

template <typename T>
void guided_step_cpu(const StepArgs<T>& s) {
  // Below this size the thread start-up costs more than the pass itself.
  constexpr int64_t kParallelGrain = 1 << 15;
#pragma omp parallel for schedule(static) if (s.n > kParallelGrain)
  for (int64_t i = 0; i < s.n; ++i) step_element(s, i);
}

template void guided_step_cpu<float>(const StepArgs<float>&);
template void guided_step_cpu<double>(const StepArgs<double>&);

}  // namespace fastdiff
