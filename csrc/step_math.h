// Per-element math of the guided solver step, shared by the CPU and CUDA paths so they cannot drift apart.
//
// Every deterministic solver step in data-prediction form is a linear combination
//     x_next = a * x + b[0] * D + sum_{k>=1} b[k] * H[k-1]
// where D is the (guided) denoised estimate of this evaluation, D = Du + w * (Dc - Du) inside the guidance
// interval and D = Dc outside it, and H are history entries kept by multistep solvers. The op also returns
// the new history entry E = hx * x + hd * D: D itself for data-prediction solvers (hx = 0, hd = 1), or the
// derivative (x - D) / sigma for iPNDM's Adams-Bashforth form.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline
#endif

namespace fastdiff {

// History terms a single step may read besides the new D (iPNDM order 4 and UniPC order 3 need three).
constexpr int kMaxHistory = 3;

template <typename T>
struct StepArgs {
  const T* x;
  const T* d_cond;
  const T* d_uncond;  // nullptr outside the guidance interval: D = d_cond
  const T* history[kMaxHistory];
  int n_history;
  T a;
  T b[kMaxHistory + 1];
  T w;
  T hx;
  T hd;
  T* x_out;
  T* e_out;  // may be nullptr when the caller keeps no history entry
  int64_t n;
};

template <typename T>
FD_HOST_DEVICE void step_element(const StepArgs<T>& s, int64_t i) {
  const T dc = s.d_cond[i];
  const T d = s.d_uncond ? s.d_uncond[i] + s.w * (dc - s.d_uncond[i]) : dc;
  T acc = s.a * s.x[i] + s.b[0] * d;
  for (int k = 0; k < s.n_history; ++k) acc += s.b[k + 1] * s.history[k][i];
  if (s.e_out) s.e_out[i] = s.hx * s.x[i] + s.hd * d;
  s.x_out[i] = acc;
}

}  // namespace fastdiff
