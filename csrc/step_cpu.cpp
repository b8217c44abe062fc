// CPU implementation of the guided step: one parallel, vectorised pass over memory.
#include "step_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastdiff {

template <typename TX, typename TD, typename Acc>
void guided_step_cpu(const StepArgs<TX, TD, Acc>& args) {
  // Below this many elements a chunk is not worth a thread; at::parallel_for runs small ranges inline (an
  // OpenMP region costs about 20 us even when it decides to run on one thread).
  constexpr int64_t kGrain = 1 << 15;
  dispatch_step_flags(args, [&](auto uncond, auto hist, auto noise, auto write_e) {
    // A local copy: the compiler can then see that the output stores do not change the coefficients.
    const StepArgs<TX, TD, Acc> s = args;
    at::parallel_for(0, s.n, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        step_element<decltype(uncond)::value, decltype(hist)::value, decltype(noise)::value,
                     decltype(write_e)::value>(s, i);
      }
    });
  });
}

template void guided_step_cpu(const StepArgs<float, float, float>&);
template void guided_step_cpu(const StepArgs<float, c10::Half, float>&);
template void guided_step_cpu(const StepArgs<float, c10::BFloat16, float>&);
template void guided_step_cpu(const StepArgs<c10::Half, c10::Half, float>&);
template void guided_step_cpu(const StepArgs<c10::BFloat16, c10::BFloat16, float>&);
template void guided_step_cpu(const StepArgs<double, double, double>&);

}  // namespace fastdiff
