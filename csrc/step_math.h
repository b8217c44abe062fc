// Per-element math of the guided solver step, shared by the CPU and CUDA paths so they cannot drift apart.
//
// Every deterministic solver step in data-prediction form is a linear combination
//     x_next = a * x + b[0] * D + sum_{k>=1} b[k] * H[k-1]  (+ c_noise * noise for stochastic variants)
// where D is the (guided) denoised estimate of this evaluation, D = Du + w * (Dc - Du) inside the guidance
// interval and D = Dc outside it, and H are history entries kept by multistep solvers. The op also returns
// the new history entry E = hx * x + hd * D: D itself for data-prediction solvers (hx = 0, hd = 1), or the
// derivative (x - D) / sigma for iPNDM's Adams-Bashforth form.
//
// Storage types: TX for the state, the history, the noise and both outputs; TD for the model outputs Dc and
// Du. Supported pairs: (float, float|half|bfloat16), (half, half), (bfloat16, bfloat16), (double, double).
// Arithmetic runs in Acc: double for double, float otherwise. No torch header here: this file is compiled
// by nvcc on machines whose torch has no CUDA.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline
#endif

namespace fastdiff {

// History terms a single step may read besides the new D (iPNDM order 4 and UniPC order 3 need three).
constexpr int kMaxHistory = 3;

// Loads and stores through Acc. The generic forms serve float, double and the CPU's c10::Half/BFloat16
// (which convert implicitly); CUDA's types need the intrinsics, since torch's build disables their implicit
// conversions (__CUDA_NO_HALF_CONVERSIONS__, __CUDA_NO_BFLOAT16_CONVERSIONS__).
template <typename Acc, typename T>
FD_HOST_DEVICE Acc load(const T* p, int64_t i) {
  return static_cast<Acc>(p[i]);
}
template <typename T, typename Acc>
FD_HOST_DEVICE void store(T* p, int64_t i, Acc v) {
  p[i] = static_cast<T>(v);
}
#if defined(__CUDACC__)
template <>
FD_HOST_DEVICE float load<float, __half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <>
FD_HOST_DEVICE float load<float, __nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <>
FD_HOST_DEVICE void store<__half, float>(__half* p, int64_t i, float v) {
  p[i] = __float2half_rn(v);
}
template <>
FD_HOST_DEVICE void store<__nv_bfloat16, float>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}
#endif

template <typename TX, typename TD, typename Acc>
struct StepArgs {
  const TX* x;
  const TD* d_cond;
  const TD* d_uncond;  // nullptr outside the guidance interval: D = d_cond
  const TX* history[kMaxHistory];
  int n_history;
  const TX* noise;  // nullptr for deterministic steps
  Acc a;
  Acc b[kMaxHistory + 1];
  Acc w;
  Acc hx;
  Acc hd;
  Acc c_noise;
  TX* x_out;
  TX* e_out;  // may be nullptr when the caller keeps no history entry
  int64_t n;
  // Coefficients in device memory, [a, w, hx, hd, c_noise, b0, ..., bK] in Acc, read by the kernel itself so a
  // device-resident schedule needs no host round trip (and a CUDA graph can replay it). nullptr: use the fields.
  const Acc* coef;
};

// Replaces the scalar fields by the coefficients in s.coef, when there are any (each thread does it once).
template <typename TX, typename TD, typename Acc>
FD_HOST_DEVICE void load_coefficients(StepArgs<TX, TD, Acc>& s) {
  if (s.coef == nullptr) return;
  s.a = s.coef[0];
  s.w = s.coef[1];
  s.hx = s.coef[2];
  s.hd = s.coef[3];
  s.c_noise = s.coef[4];
  for (int k = 0; k <= s.n_history; ++k) s.b[k] = s.coef[5 + k];
}

// One element of the step. The structure flags are template parameters so that each loop is branch-free
// (and vectorises on the CPU); dispatch_step_flags picks the instance from a StepArgs at run time.
template <bool kUncond, int kHist, bool kNoise, bool kWriteE, typename TX, typename TD, typename Acc>
FD_HOST_DEVICE void step_element(const StepArgs<TX, TD, Acc>& s, int64_t i) {
  const Acc dc = load<Acc>(s.d_cond, i);
  Acc d = dc;
  if constexpr (kUncond) {
    const Acc du = load<Acc>(s.d_uncond, i);
    d = du + s.w * (dc - du);
  }
  const Acc x = load<Acc>(s.x, i);
  Acc acc = s.a * x + s.b[0] * d;
  if constexpr (kHist > 0) acc += s.b[1] * load<Acc>(s.history[0], i);
  if constexpr (kHist > 1) acc += s.b[2] * load<Acc>(s.history[1], i);
  if constexpr (kHist > 2) acc += s.b[3] * load<Acc>(s.history[2], i);
  if constexpr (kNoise) acc += s.c_noise * load<Acc>(s.noise, i);
  if constexpr (kWriteE) store(s.e_out, i, s.hx * x + s.hd * d);
  store(s.x_out, i, acc);
}

// Calls f(uncond, hist, noise, write_e) with std::integral_constant arguments for these run-time flags (host
// code), so that each kernel instance is specialised to the step's shape.
template <typename F>
inline void dispatch_step_flags(bool has_uncond, int n_history, bool has_noise, bool write_e, F&& f) {
  auto with_hist = [&](auto uncond, auto noise, auto e) {
    switch (n_history) {
      case 0: return f(uncond, std::integral_constant<int, 0>{}, noise, e);
      case 1: return f(uncond, std::integral_constant<int, 1>{}, noise, e);
      case 2: return f(uncond, std::integral_constant<int, 2>{}, noise, e);
      default: return f(uncond, std::integral_constant<int, 3>{}, noise, e);
    }
  };
  auto with_e = [&](auto uncond, auto noise) {
    return write_e ? with_hist(uncond, noise, std::true_type{}) : with_hist(uncond, noise, std::false_type{});
  };
  auto with_noise = [&](auto uncond) {
    return has_noise ? with_e(uncond, std::true_type{}) : with_e(uncond, std::false_type{});
  };
  return has_uncond ? with_noise(std::true_type{}) : with_noise(std::false_type{});
}

template <typename TX, typename TD, typename Acc, typename F>
inline void dispatch_step_flags(const StepArgs<TX, TD, Acc>& s, F&& f) {
  dispatch_step_flags(s.d_uncond != nullptr, s.n_history, s.noise != nullptr, s.e_out != nullptr, f);
}

// ------------------------------------------------------------------------------------------------- backward
//
// The step is linear, so with g_x = dL/dx_next, g_e = dL/dE and g_d = b0 g_x + hd g_e:
//   dL/dx = a g_x + hx g_e,  dL/dDc = w g_d (g_d without guidance),  dL/dDu = (1 - w) g_d,
//   dL/dH_k = b_{k+1} g_x,   dL/dnoise = c_noise g_x,
// and each coefficient's gradient is a dot product, accumulated here without materialising the products:
//   [a, w, hx, hd, c_noise, b0, b1..bK] <- [<g_x,x>, <g_d,Dc-Du>, <g_e,x>, <g_e,D>, <g_x,noise>, <g_x,D>, <g_x,H_k>].

constexpr int kNumCoef = 6 + kMaxHistory;

template <typename TX, typename TD, typename Acc>
struct StepGradArgs {
  StepArgs<TX, TD, Acc> step;  // inputs and coefficients of the forward pass (its outputs unused)
  const TX* g_x;
  const TX* g_e;
  TX* grad_x;
  TD* grad_dc;
  TD* grad_du;
  TX* grad_history[kMaxHistory];
  TX* grad_noise;
};

template <bool kUncond, int kHist, bool kNoise, typename TX, typename TD, typename Acc, typename Sum>
FD_HOST_DEVICE void step_grad_element(const StepGradArgs<TX, TD, Acc>& g, int64_t i, Sum* sums) {
  const auto& s = g.step;
  const Acc gx = load<Acc>(g.g_x, i);
  const Acc ge = load<Acc>(g.g_e, i);
  const Acc x = load<Acc>(s.x, i);
  const Acc dc = load<Acc>(s.d_cond, i);
  Acc d = dc;
  const Acc gd = s.b[0] * gx + s.hd * ge;
  store(g.grad_x, i, s.a * gx + s.hx * ge);
  if constexpr (kUncond) {
    const Acc du = load<Acc>(s.d_uncond, i);
    d = du + s.w * (dc - du);
    store(g.grad_dc, i, s.w * gd);
    store(g.grad_du, i, (Acc(1) - s.w) * gd);
    sums[1] += gd * (dc - du);
  } else {
    store(g.grad_dc, i, gd);
  }
  sums[0] += gx * x;
  sums[2] += ge * x;
  sums[3] += ge * d;
  sums[5] += gx * d;
  if constexpr (kNoise) {
    store(g.grad_noise, i, s.c_noise * gx);
    sums[4] += gx * load<Acc>(s.noise, i);
  }
  if constexpr (kHist > 0) {
    store(g.grad_history[0], i, s.b[1] * gx);
    sums[6] += gx * load<Acc>(s.history[0], i);
  }
  if constexpr (kHist > 1) {
    store(g.grad_history[1], i, s.b[2] * gx);
    sums[7] += gx * load<Acc>(s.history[1], i);
  }
  if constexpr (kHist > 2) {
    store(g.grad_history[2], i, s.b[3] * gx);
    sums[8] += gx * load<Acc>(s.history[2], i);
  }
}

}  // namespace fastdiff
