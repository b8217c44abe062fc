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

// Calls f(lo, hi, c) over elements [begin, end) with c the step's coefficients: in one piece, or in per-sample
// mode in one piece per sample, with that sample's weights in c, loaded once per piece rather than per element.
// c is a local copy either way: the compiler can then see that the output stores change no coefficient.
template <Guide kGuide, int kHist, typename TX, typename TD, typename Acc, typename F>
inline void by_sample(const StepArgs<TX, TD, Acc>& s, const StepCoef<Acc, kHist>& coef, int64_t begin, int64_t end,
                      F&& f) {
  auto c = coef;
  if constexpr (kGuide != Guide::kPerSample) {
    f(begin, end, c);
  } else {
    for (int64_t lo = begin; lo < end;) {
      const int64_t b = lo / s.sample_n;
      const int64_t hi = std::min(end, (b + 1) * s.sample_n);
      load_sample_weights(s, b, c);
      f(lo, hi, c);
      lo = hi;
    }
  }
}

// The work is split as on the GPU (packed_elements in step_math.h): the vector code over the aligned packs, then
// the element code over the rest, so that the CPU tests exercise both.
template <typename TX, typename TD, typename Acc>
void guided_step_cpu(const StepArgs<TX, TD, Acc>& args) {
  constexpr int V = kVec<TX>;
  dispatch_step_flags(args, [&](auto guide, auto hist, auto noise, auto write_e) {
    constexpr Guide kGuide = decltype(guide)::value;
    constexpr bool kNoise = decltype(noise)::value, kWriteE = decltype(write_e)::value;
    constexpr int kHist = decltype(hist)::value;
    const auto coef = load_coefficients<kHist>(args);
    const int64_t packed = packed_elements<kGuide, kHist>(args);
    at::parallel_for(0, packed / V, kGrain / V, [&](int64_t begin, int64_t end) {
      // A local copy: the compiler can then see that the output stores change no pointer.
      const StepArgs<TX, TD, Acc> s = args;
      by_sample<kGuide>(s, coef, begin * V, end * V, [&](int64_t lo, int64_t hi, const auto& c) {
        for (int64_t p = lo / V; p < hi / V; ++p) step_elements<V, kGuide, kHist, kNoise, kWriteE>(s, c, p * V);
      });
    });
    at::parallel_for(packed, args.n, kGrain, [&](int64_t begin, int64_t end) {
      const StepArgs<TX, TD, Acc> s = args;
      by_sample<kGuide>(s, coef, begin, end, [&](int64_t lo, int64_t hi, const auto& c) {
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) step_elements<1, kGuide, kHist, kNoise, kWriteE>(s, c, i);
      });
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

// Chunks of kGrain elements within each sample, each summed in double into its own row of partial sums, which are
// then merged per sample in chunk order: the result depends on neither the thread count nor the schedule. Double
// partial sums keep long float32 reductions exact enough; the products are exact in double too.
template <typename TX, typename TD, typename Acc>
void guidance_sums_cpu(const SumsArgs<TX, TD, Acc>& args) {
  constexpr int V = kVec<TX>;
  const bool packed = sums_packed(args);
  const int64_t per_sample = std::max<int64_t>(1, (args.sample_n + kGrain - 1) / kGrain);
  std::vector<double> partial(args.batch * per_sample * kNumSums, 0.0);
  at::parallel_for(0, args.batch * per_sample, 1, [&](int64_t c0, int64_t c1) {
    const SumsArgs<TX, TD, Acc> s = args;
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t b = ch / per_sample;
      Acc m[kNumMix];
      for (int k = 0; k < kNumMix; ++k) m[k] = s.mix[b * kNumMix + k];
      // kGrain is a multiple of V, so a chunk of a sample made of whole vectors is made of whole vectors too.
      const int64_t begin = b * s.sample_n + (ch % per_sample) * kGrain;
      const int64_t end = std::min((b + 1) * s.sample_n, begin + kGrain);
      double sums[kNumSums][V] = {};
      if (packed) {
        for (int64_t i = begin; i < end; i += V) sums_elements<V, V>(s, m, i, sums);
      } else {
        double one[kNumSums][1] = {};
        for (int64_t i = begin; i < end; ++i) sums_elements<1, 1>(s, m, i, one);
        for (int k = 0; k < kNumSums; ++k) sums[k][0] = one[k][0];
      }
      for (int k = 0; k < kNumSums; ++k) {
        double total = 0.0;
        for (int j = 0; j < V; ++j) total += sums[k][j];
        partial[ch * kNumSums + k] = total;
      }
    }
  });
  for (int64_t b = 0; b < args.batch; ++b) {
    for (int k = 0; k < kNumSums; ++k) {
      double total = 0.0;
      for (int64_t ch = b * per_sample; ch < (b + 1) * per_sample; ++ch) total += partial[ch * kNumSums + k];
      args.out[b * kNumSums + k] = static_cast<Acc>(total);
    }
  }
}

template void guided_step_cpu(const StepArgs<float, float, float>&);
template void guided_step_cpu(const StepArgs<float, c10::Half, float>&);
template void guided_step_cpu(const StepArgs<float, c10::BFloat16, float>&);
template void guided_step_cpu(const StepArgs<c10::Half, c10::Half, float>&);
template void guided_step_cpu(const StepArgs<c10::BFloat16, c10::BFloat16, float>&);
template void guided_step_cpu(const StepArgs<double, double, double>&);

template void guidance_sums_cpu(const SumsArgs<float, float, float>&);
template void guidance_sums_cpu(const SumsArgs<float, c10::Half, float>&);
template void guidance_sums_cpu(const SumsArgs<float, c10::BFloat16, float>&);
template void guidance_sums_cpu(const SumsArgs<c10::Half, c10::Half, float>&);
template void guidance_sums_cpu(const SumsArgs<c10::BFloat16, c10::BFloat16, float>&);
template void guidance_sums_cpu(const SumsArgs<double, double, double>&);

template void guided_step_backward_cpu(const StepGradArgs<float, float, float>&, double*);
template void guided_step_backward_cpu(const StepGradArgs<float, c10::Half, float>&, double*);
template void guided_step_backward_cpu(const StepGradArgs<float, c10::BFloat16, float>&, double*);
template void guided_step_backward_cpu(const StepGradArgs<c10::Half, c10::Half, float>&, double*);
template void guided_step_backward_cpu(const StepGradArgs<c10::BFloat16, c10::BFloat16, float>&, double*);
template void guided_step_backward_cpu(const StepGradArgs<double, double, double>&, double*);

}  // namespace fastdiff
