// CPU implementation of the guided step: one parallel, vectorised pass over memory.
#include "step_cpu.h"

#include <algorithm>
#include <vector>

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

template <typename TX, typename TD, typename Acc>
void guided_step_backward_cpu(const StepGradArgs<TX, TD, Acc>& args, double* grad_coef) {
  constexpr int64_t kGrain = 1 << 15;
  const auto& st = args.step;
  for (int k = 0; k < kNumCoef; ++k) grad_coef[k] = 0.0;
  dispatch_step_flags(st.d_uncond != nullptr, st.n_history, st.noise != nullptr, true,
                      [&](auto uncond, auto hist, auto noise, auto) {
                        const StepGradArgs<TX, TD, Acc> g = args;
                        // Partial sums per chunk, in double, merged in chunk order: deterministic for a given
                        // thread count, and exact enough for long reductions in float32.
                        const int64_t chunks = std::max<int64_t>(1, (g.step.n + kGrain - 1) / kGrain);
                        std::vector<double> partial(chunks * kNumCoef, 0.0);
                        at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
                          for (int64_t c = c0; c < c1; ++c) {
                            double* sums = partial.data() + c * kNumCoef;
                            const int64_t end = std::min(g.step.n, (c + 1) * kGrain);
                            for (int64_t i = c * kGrain; i < end; ++i) {
                              step_grad_element<decltype(uncond)::value, decltype(hist)::value,
                                                decltype(noise)::value>(g, i, sums);
                            }
                          }
                        });
                        for (int64_t c = 0; c < chunks; ++c)
                          for (int k = 0; k < kNumCoef; ++k) grad_coef[k] += partial[c * kNumCoef + k];
                      });
}

template void guided_step_cpu(const StepArgs<float, float, float>&);
template void guided_step_cpu(const StepArgs<float, c10::Half, float>&);
template void guided_step_cpu(const StepArgs<float, c10::BFloat16, float>&);
template void guided_step_cpu(const StepArgs<c10::Half, c10::Half, float>&);
template void guided_step_cpu(const StepArgs<c10::BFloat16, c10::BFloat16, float>&);
template void guided_step_cpu(const StepArgs<double, double, double>&);

template void guided_step_backward_cpu(const StepGradArgs<float, float, float>&, double*);
template void guided_step_backward_cpu(const StepGradArgs<float, c10::Half, float>&, double*);
template void guided_step_backward_cpu(const StepGradArgs<float, c10::BFloat16, float>&, double*);
template void guided_step_backward_cpu(const StepGradArgs<c10::Half, c10::Half, float>&, double*);
template void guided_step_backward_cpu(const StepGradArgs<c10::BFloat16, c10::BFloat16, float>&, double*);
template void guided_step_backward_cpu(const StepGradArgs<double, double, double>&, double*);

}  // namespace fastdiff
