// CPU implementation of the guided step: one parallel, vectorised pass over memory.
#include "step_cpu.h"

#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastdiff {

// Below this many elements a chunk is not worth a thread; at::parallel_for runs small ranges inline (an OpenMP
// region costs about 20 us even when it decides to run on one thread).
constexpr int64_t kGrain = 1 << 15;

// The work is split as on the GPU (packed_elements in step_math.h): the vector code over the aligned packs, then
// the element code over the rest, so that the CPU tests exercise both.
template <typename TX, typename TD, typename Acc>
void guided_step_cpu(const StepArgs<TX, TD, Acc>& args) {
  constexpr int V = kVec<TX>;
  dispatch_step_flags(args, [&](auto uncond, auto hist, auto noise, auto write_e) {
    constexpr bool kUncond = decltype(uncond)::value, kNoise = decltype(noise)::value;
    constexpr bool kWriteE = decltype(write_e)::value;
    constexpr int kHist = decltype(hist)::value;
    const auto coef = load_coefficients<kHist>(args);
    const int64_t packed = packed_elements<kHist>(args);
    at::parallel_for(0, packed / V, kGrain / V, [&](int64_t begin, int64_t end) {
      // Local copies: the compiler can then see that the output stores change neither pointers nor coefficients.
      const StepArgs<TX, TD, Acc> s = args;
      const auto c = coef;
      for (int64_t p = begin; p < end; ++p) step_elements<V, kUncond, kHist, kNoise, kWriteE>(s, c, p * V);
    });
    at::parallel_for(packed, args.n, kGrain, [&](int64_t begin, int64_t end) {
      const StepArgs<TX, TD, Acc> s = args;
      const auto c = coef;
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) step_elements<1, kUncond, kHist, kNoise, kWriteE>(s, c, i);
    });
  });
}

template <typename TX, typename TD, typename Acc>
void guided_step_backward_cpu(const StepGradArgs<TX, TD, Acc>& args, double* grad_coef) {
  const auto& st = args.step;
  for (int k = 0; k < kNumCoef; ++k) grad_coef[k] = 0.0;
  dispatch_step_flags(st.d_uncond != nullptr, st.n_history, st.noise != nullptr, true,
                      [&](auto uncond, auto hist, auto noise, auto) {
                        constexpr int kHist = decltype(hist)::value;
                        const StepGradArgs<TX, TD, Acc> g = args;
                        const auto c = load_coefficients<kHist>(g.step);
                        // Partial sums per chunk, in double, merged in chunk order: deterministic for a given
                        // thread count, and exact enough for long reductions in float32.
                        const int64_t chunks = std::max<int64_t>(1, (g.step.n + kGrain - 1) / kGrain);
                        std::vector<double> partial(chunks * kNumCoef, 0.0);
                        at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
                          for (int64_t ch = c0; ch < c1; ++ch) {
                            double sums[kNumCoef] = {};
                            const int64_t end = std::min(g.step.n, (ch + 1) * kGrain);
                            for (int64_t i = ch * kGrain; i < end; ++i) {
                              step_grad_element<decltype(uncond)::value, kHist, decltype(noise)::value>(g, c, i, sums);
                            }
                            std::copy(sums, sums + kNumCoef, partial.data() + ch * kNumCoef);
                          }
                        });
                        for (int64_t ch = 0; ch < chunks; ++ch)
                          for (int k = 0; k < kNumCoef; ++k) grad_coef[k] += partial[ch * kNumCoef + k];
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
