#pragma once
#include "step_math.h"

namespace fastdiff {
// Launches on `stream` (a cudaStream_t); returns the cudaError_t of the launch as an int. TX and TD are the
// CUDA storage types (float, double, __half, __nv_bfloat16); see step_math.h for the supported pairs.
template <typename TX, typename TD, typename Acc>
int guided_step_cuda(const StepArgs<TX, TD, Acc>& s, void* stream);

// guidance_sums writes one row of kNumSums double partial sums per (sample, chunk) block into `partial`, which
// must hold guidance_sums_blocks(batch, sample_n) * kNumSums values, then sums each sample's rows into s.out.
int64_t guidance_sums_blocks(int64_t batch, int64_t sample_n);
template <typename TX, typename TD, typename Acc>
int guidance_sums_cuda(const SumsArgs<TX, TD, Acc>& s, double* partial, void* stream);

// The backward writes one row of kNumCoef double partial sums per block into `partial`, which must hold
// guided_step_backward_blocks(n) * kNumCoef values; the coefficient gradients are the column sums.
int guided_step_backward_blocks(int64_t n);
template <typename TX, typename TD, typename Acc>
int guided_step_backward_cuda(const StepGradArgs<TX, TD, Acc>& g, double* partial, void* stream);
}
