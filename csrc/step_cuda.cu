// CUDA implementation of the guided step, in plain CUDA (no ATen or c10 headers) so that nvcc can compile it
// on machines whose torch has no CUDA. The torch glue lives in step_cuda_glue.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>

#include "step_cuda.h"

namespace fastdiff {

constexpr int kThreads = 256;

inline int blocks_for(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < INT_MAX ? blocks : INT_MAX);
}

// Vectors of kVec<TX> elements over [0, packed_elements), then single elements (the tail, or everything when a
// pointer is misaligned). The launch gives each thread one unit of work, so the loops run once (more only past
// INT_MAX blocks) and unrolling them would only add code and registers. In per-sample mode each unit first reads
// the weights of its sample (a vector lies in one, see packed_elements).
template <Guide kGuide, int kHist, bool kNoise, bool kWriteE, typename TX, typename TD, typename Acc>
__device__ __forceinline__ void step_grid(const StepArgs<TX, TD, Acc>& s) {
  constexpr int V = kVec<TX>;
  auto c = load_coefficients<kHist>(s);
  const int64_t packed = packed_elements<kGuide, kHist>(s);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(blockDim.x) * gridDim.x;
#pragma unroll 1
  for (int64_t i = thread * V; i < packed; i += threads * V) {
    if constexpr (kGuide == Guide::kPerSample) load_sample_weights(s, i / s.sample_n, c);
    step_elements<V, kGuide, kHist, kNoise, kWriteE>(s, c, i);
  }
#pragma unroll 1
  for (int64_t i = packed + thread; i < s.n; i += threads) {
    if constexpr (kGuide == Guide::kPerSample) load_sample_weights(s, i / s.sample_n, c);
    step_elements<1, kGuide, kHist, kNoise, kWriteE>(s, c, i);
  }
}

// guided_step: D = Dc, or CFG's Du + w (Dc - Du).
template <bool kUncond, int kHist, bool kNoise, bool kWriteE, typename TX, typename TD, typename Acc>
__global__ void guided_step_kernel(const StepArgs<TX, TD, Acc> s) {
  step_grid<kUncond ? Guide::kCfg : Guide::kNone, kHist, kNoise, kWriteE>(s);
}

// guided_step_per_sample: D = g0 x + g1 Dc + g2 Du with the weights of each element's sample.
template <int kHist, bool kNoise, bool kWriteE, typename TX, typename TD, typename Acc>
__global__ void guided_step_per_sample_kernel(const StepArgs<TX, TD, Acc> s) {
  step_grid<Guide::kPerSample, kHist, kNoise, kWriteE>(s);
}

// One vector (or element) per thread, on as many blocks as that takes rather than a grid-stride loop over a
// capped grid: each thread then issues every load of its vector at once and no load waits behind an earlier
// iteration's stores, so the bytes in flight are limited only by occupancy, on any GPU, without querying it.
// Serves both ops: a StepArgs with a guide is a per-sample step.
template <typename TX, typename TD, typename Acc>
int guided_step_cuda(const StepArgs<TX, TD, Acc>& s, void* stream) {
  if (s.n == 0) return 0;
  dispatch_step_flags(s, [&](auto guide, auto hist, auto noise, auto write_e) {
    constexpr Guide kGuide = decltype(guide)::value;
    constexpr int kHist = decltype(hist)::value;
    constexpr bool kNoise = decltype(noise)::value, kWriteE = decltype(write_e)::value;
    const int64_t packed = packed_elements<kGuide, kHist>(s);
    const int64_t vectors = packed / kVec<TX>, singles = s.n - packed;
    const int blocks = blocks_for(vectors > singles ? vectors : singles);
    const auto st = static_cast<cudaStream_t>(stream);
    if constexpr (kGuide == Guide::kPerSample) {
      guided_step_per_sample_kernel<kHist, kNoise, kWriteE><<<blocks, kThreads, 0, st>>>(s);
    } else {
      guided_step_kernel<kGuide == Guide::kCfg, kHist, kNoise, kWriteE><<<blocks, kThreads, 0, st>>>(s);
    }
  });
  return static_cast<int>(cudaGetLastError());
}

// The backward: tensor gradients per element, and the coefficient gradients (dot products) summed per thread,
// then per block in shared memory, into one row of `partial` per block; the caller sums the rows. Partial sums
// are double so that long float32 reductions stay exact enough. The grid is capped, as `partial` has a row per
// block; a grid-stride loop covers the rest.
template <bool kUncond, int kHist, bool kNoise, typename TX, typename TD, typename Acc>
__global__ void guided_step_backward_kernel(const StepGradArgs<TX, TD, Acc> g, double* __restrict__ partial) {
  const auto c = load_coefficients<kHist>(g.step);
  Acc sums[kNumCoef] = {};
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < g.step.n; i += stride) {
    step_grad_element<kUncond, kHist, kNoise>(g, c, i, sums);
  }
  __shared__ double block_sums[kThreads];
  // Unrolled, so that sums[k] has a constant index and stays in registers.
#pragma unroll
  for (int k = 0; k < kNumCoef; ++k) {
    block_sums[threadIdx.x] = static_cast<double>(sums[k]);
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) block_sums[threadIdx.x] += block_sums[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.x) * kNumCoef + k] = block_sums[0];
    __syncthreads();
  }
}

int guided_step_backward_blocks(int64_t n) {
  const int blocks = blocks_for(n > 0 ? n : 1);
  return blocks < 65535 ? blocks : 65535;
}

template <typename TX, typename TD, typename Acc>
int guided_step_backward_cuda(const StepGradArgs<TX, TD, Acc>& g, double* partial, void* stream) {
  const auto& s = g.step;
  dispatch_step_flags(s.d_uncond != nullptr, s.n_history, s.noise != nullptr, true,
                      [&](auto uncond, auto hist, auto noise, auto) {
                        guided_step_backward_kernel<decltype(uncond)::value, decltype(hist)::value,
                                                    decltype(noise)::value>
                            <<<guided_step_backward_blocks(s.n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
                                g, partial);
                      });
  return static_cast<int>(cudaGetLastError());
}

// ------------------------------------------------------------------------------------------- guidance sums
//
// A block per (sample, chunk of kSumsChunk elements of it): each thread sums its elements in Acc, the block adds
// the threads' sums in double in a fixed tree into its row of `partial`, and a second kernel adds each sample's
// rows in chunk order. No atomics, so the result depends only on the shapes; the scratch comes from the caller
// (torch's caching allocator), so the pair can be captured in a CUDA graph.

// Eight elements per thread: two 16-byte vectors of a float32 state, one of a 16-bit one, four of a float64 one.
constexpr int64_t kSumsChunk = 8 * kThreads;
constexpr int kWarps = kThreads / 32;

int64_t guidance_sums_blocks(int64_t batch, int64_t sample_n) {
  return batch * ((sample_n + kSumsChunk - 1) / kSumsChunk);
}

// v summed over the lanes of a warp, into lane 0, in a fixed order.
template <int N>
__device__ __forceinline__ void warp_sum(double (&v)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
  }
}

// V: kVec<TX> where sums_packed allows it, else 1. A chunk of a sample made of whole vectors is made of whole
// vectors too (kSumsChunk is a multiple of every kVec). The loop over blocks runs once but past INT_MAX blocks.
template <int V, typename TX, typename TD, typename Acc>
__global__ void guidance_sums_kernel(const SumsArgs<TX, TD, Acc> s, int64_t chunks, double* __restrict__ partial) {
  __shared__ double warp_sums[kWarps][kNumSums];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t block = blockIdx.x; block < s.batch * chunks; block += gridDim.x) {
    const int64_t b = block / chunks;
    const int64_t begin = b * s.sample_n + (block % chunks) * kSumsChunk;
    const int64_t end = min(begin + kSumsChunk, (b + 1) * s.sample_n);
    Acc m[kNumMix];
#pragma unroll
    for (int k = 0; k < kNumMix; ++k) m[k] = s.mix[b * kNumMix + k];
    Acc sums[kNumSums][1] = {};
    for (int64_t i = begin + threadIdx.x * V; i < end; i += kThreads * V) sums_elements<V, 1>(s, m, i, sums);
    double v[kNumSums];
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) v[k] = static_cast<double>(sums[k][0]);
    warp_sum(v);
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kNumSums; ++k) warp_sums[warp][k] = v[k];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int k = 0; k < kNumSums; ++k) v[k] = lane < kWarps ? warp_sums[lane][k] : 0.0;
      warp_sum(v);
      if (lane == 0) {
#pragma unroll
        for (int k = 0; k < kNumSums; ++k) partial[block * kNumSums + k] = v[k];
      }
    }
    __syncthreads();  // warp_sums is rewritten by the next block's iteration
  }
}

// One warp per sample: lane l adds rows l, l + 32, ... of the sample's partial sums, then the warp adds the lanes.
template <typename Acc>
__global__ void guidance_sums_finish_kernel(const double* __restrict__ partial, int64_t batch, int64_t chunks,
                                            Acc* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; b < batch; b += warps) {
    double v[kNumSums] = {};
    for (int64_t ch = lane; ch < chunks; ch += 32) {
#pragma unroll
      for (int k = 0; k < kNumSums; ++k) v[k] += partial[(b * chunks + ch) * kNumSums + k];
    }
    warp_sum(v);
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kNumSums; ++k) out[b * kNumSums + k] = static_cast<Acc>(v[k]);
    }
  }
}

template <typename TX, typename TD, typename Acc>
int guidance_sums_cuda(const SumsArgs<TX, TD, Acc>& s, double* partial, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t chunks = (s.sample_n + kSumsChunk - 1) / kSumsChunk;
  const int64_t blocks = s.batch * chunks;
  const int grid = static_cast<int>(blocks < INT_MAX ? blocks : INT_MAX);
  if (sums_packed(s)) {
    guidance_sums_kernel<kVec<TX>><<<grid, kThreads, 0, st>>>(s, chunks, partial);
  } else {
    guidance_sums_kernel<1><<<grid, kThreads, 0, st>>>(s, chunks, partial);
  }
  guidance_sums_finish_kernel<<<blocks_for(s.batch * 32), kThreads, 0, st>>>(partial, s.batch, chunks, s.out);
  return static_cast<int>(cudaGetLastError());
}

template int guided_step_cuda(const StepArgs<float, float, float>&, void*);
template int guided_step_cuda(const StepArgs<float, __half, float>&, void*);
template int guided_step_cuda(const StepArgs<float, __nv_bfloat16, float>&, void*);
template int guided_step_cuda(const StepArgs<__half, __half, float>&, void*);
template int guided_step_cuda(const StepArgs<__nv_bfloat16, __nv_bfloat16, float>&, void*);
template int guided_step_cuda(const StepArgs<double, double, double>&, void*);

template int guidance_sums_cuda(const SumsArgs<float, float, float>&, double*, void*);
template int guidance_sums_cuda(const SumsArgs<float, __half, float>&, double*, void*);
template int guidance_sums_cuda(const SumsArgs<float, __nv_bfloat16, float>&, double*, void*);
template int guidance_sums_cuda(const SumsArgs<__half, __half, float>&, double*, void*);
template int guidance_sums_cuda(const SumsArgs<__nv_bfloat16, __nv_bfloat16, float>&, double*, void*);
template int guidance_sums_cuda(const SumsArgs<double, double, double>&, double*, void*);

template int guided_step_backward_cuda(const StepGradArgs<float, float, float>&, double*, void*);
template int guided_step_backward_cuda(const StepGradArgs<float, __half, float>&, double*, void*);
template int guided_step_backward_cuda(const StepGradArgs<float, __nv_bfloat16, float>&, double*, void*);
template int guided_step_backward_cuda(const StepGradArgs<__half, __half, float>&, double*, void*);
template int guided_step_backward_cuda(const StepGradArgs<__nv_bfloat16, __nv_bfloat16, float>&, double*, void*);
template int guided_step_backward_cuda(const StepGradArgs<double, double, double>&, double*, void*);

}  // namespace fastdiff
