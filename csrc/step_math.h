// Per-element math of the guided solver step, shared by the CPU and CUDA paths so they cannot drift apart.
//
// Every deterministic solver step in data-prediction form is a linear combination
//     x_next = a * x + b[0] * D + sum_{k>=1} b[k] * H[k-1]  (+ c_noise * noise for stochastic variants)
// where D is the (guided) denoised estimate of this evaluation, D = Du + w * (Dc - Du) inside the guidance
// interval and D = Dc outside it, and H are history entries kept by multistep solvers. The op also returns
// the new history entry E = hx * x + hd * D: D itself for data-prediction solvers (hx = 0, hd = 1), or the
// derivative (x - D) / sigma for iPNDM's Adams-Bashforth form.
//
// The guidance methods other than plain CFG make D a per-sample combination D = g0 x + g1 Dc + g2 Du, with the
// weights g of sample b in guide[b] (guided_step_per_sample), computed from per-sample sums of two other such
// combinations (guidance_sums, at the end of this file).
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
// Forced on the host as on the device: GCC may otherwise keep a call per vector in the CPU loop (a third slower).
#define FD_HOST_DEVICE inline __attribute__((always_inline))
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

// The op's contract: the outputs never alias or overlap an input or each other (bindings.cpp checks it), so every
// pointer is __restrict__ and each thread may load all its inputs before it stores anything.
template <typename TX, typename TD, typename Acc>
struct StepArgs {
  const TX* __restrict__ x;
  const TD* __restrict__ d_cond;
  const TD* __restrict__ d_uncond;  // nullptr outside the guidance interval: D = d_cond
  const TX* __restrict__ history[kMaxHistory];
  int n_history;
  const TX* __restrict__ noise;  // nullptr for deterministic steps
  Acc a;
  Acc b[kMaxHistory + 1];
  Acc w;
  Acc hx;
  Acc hd;
  Acc c_noise;
  TX* __restrict__ x_out;
  TX* __restrict__ e_out;  // may be nullptr when the caller keeps no history entry
  int64_t n;
  // Coefficients in device memory, [a, w, hx, hd, c_noise, b0, ..., bK] in Acc, read by the kernel itself so a
  // device-resident schedule needs no host round trip (and a CUDA graph can replay it). nullptr: use the fields.
  const Acc* __restrict__ coef;
  // Per-sample mode (Guide::kPerSample): [B, 3] weights in Acc, D = g0 x + g1 Dc + g2 Du with the row of the
  // sample that element i lies in, i / sample_n. nullptr otherwise (sample_n then unused).
  const Acc* __restrict__ guide;
  int64_t sample_n;
};

// How a step forms D: Dc alone, CFG's Du + w (Dc - Du), or the per-sample combination of StepArgs::guide.
enum class Guide { kNone, kCfg, kPerSample };

// The coefficients of one step as values of their own, which the compiler keeps in registers. (Written into
// the kernel's by-value StepArgs instead, with a loop bound known only at run time, they would move the whole
// struct to local memory, and the pointers read back from there would lose their global address space.)
template <typename Acc, int kHist>
struct StepCoef {
  Acc a, w, hx, hd, c_noise;
  Acc b[kHist + 1];
  Acc g[3];  // per-sample mode: the guide row of the sample being stepped (load_sample_weights), else unused
};

// The coefficients from s.coef when there are any (each thread reads them once), else from the fields.
template <int kHist, typename TX, typename TD, typename Acc>
FD_HOST_DEVICE StepCoef<Acc, kHist> load_coefficients(const StepArgs<TX, TD, Acc>& s) {
  const Acc* dev = s.coef;
  StepCoef<Acc, kHist> c;
  c.a = dev ? dev[0] : s.a;
  c.w = dev ? dev[1] : s.w;
  c.hx = dev ? dev[2] : s.hx;
  c.hd = dev ? dev[3] : s.hd;
  c.c_noise = dev ? dev[4] : s.c_noise;
  for (int k = 0; k <= kHist; ++k) c.b[k] = dev ? dev[5 + k] : s.b[k];
  for (int k = 0; k < 3; ++k) c.g[k] = Acc(0);  // set per sample where used; dead stores elsewhere
  return c;
}

// Per-sample mode: the weights of sample b into c. The callers hoist this out of the element loops: the CPU
// loads them once per run of a sample's elements, a CUDA thread once per unit of work.
template <int kHist, typename TX, typename TD, typename Acc>
FD_HOST_DEVICE void load_sample_weights(const StepArgs<TX, TD, Acc>& s, int64_t b, StepCoef<Acc, kHist>& c) {
  for (int k = 0; k < 3; ++k) c.g[k] = s.guide[3 * b + k];
}

// ------------------------------------------------------------------------------------------ vector access
//
// The forward pass moves whole 16-byte vectors of the state tensors: 4 floats, 8 halves or bfloat16s, or 2
// doubles per access, and the same number of model outputs (64-bit loads of 4 bf16/fp16 beside a fp32 state).
// A vector access needs its address to be a multiple of its size; a tensor that starts elsewhere (the second
// half of a chunk(2) of one batched model output, a sliced view) makes the whole step go element by element.

template <typename TX>
constexpr int kVec = 16 / static_cast<int>(sizeof(TX));

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
FD_HOST_DEVICE bool pack_aligned(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % sizeof(Pack<T, V>) == 0;
}

// How many leading elements the step does in vectors of kVec<TX>: all but the n % kVec tail when every pointer
// allows vector access, none otherwise. The rest, [packed_elements, n), goes one element at a time. The CPU and
// CUDA paths both split the work this way, so the CPU tests run the vector and tail code of the CUDA kernel.
// In per-sample mode a vector must lie in one sample, which its weights are read for: vectors only when the
// per-sample size is a multiple of kVec (then n is too, and there is no tail).
template <Guide kGuide, int kHist, typename TX, typename TD, typename Acc>
FD_HOST_DEVICE int64_t packed_elements(const StepArgs<TX, TD, Acc>& s) {
  constexpr int V = kVec<TX>;
  bool aligned = pack_aligned<V>(s.x) && pack_aligned<V>(s.d_cond) && pack_aligned<V>(s.d_uncond) &&
                 pack_aligned<V>(s.noise) && pack_aligned<V>(s.x_out) && pack_aligned<V>(s.e_out);
  for (int k = 0; k < kHist; ++k) aligned = aligned && pack_aligned<V>(s.history[k]);
  if constexpr (kGuide == Guide::kPerSample) aligned = aligned && s.sample_n % V == 0;
  return aligned ? s.n - s.n % V : 0;
}

template <int V, typename Acc, typename T>
FD_HOST_DEVICE void load_pack(const T* __restrict__ p, int64_t i, Acc (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p + i);
  for (int j = 0; j < V; ++j) out[j] = load<Acc>(pack.v, j);
}

template <int V, typename T, typename Acc>
FD_HOST_DEVICE void store_pack(T* __restrict__ p, int64_t i, const Acc (&in)[V]) {
  Pack<T, V> pack;
  for (int j = 0; j < V; ++j) store(pack.v, j, in[j]);
  *reinterpret_cast<Pack<T, V>*>(p + i) = pack;
}

// Elements [i, i + V) of the step, which must lie at a multiple of V when V > 1 (see packed_elements), and in
// per-sample mode in the sample whose weights c.g holds. The structure flags are template parameters so that
// each loop is branch-free (and vectorises on the CPU); dispatch_step_flags picks the instance from a StepArgs
// at run time. Each input is converted a whole vector at a time (t holds one input after another), which the
// CPU compiler vectorises best.
template <int V, Guide kGuide, int kHist, bool kNoise, bool kWriteE, typename TX, typename TD, typename Acc>
FD_HOST_DEVICE void step_elements(const StepArgs<TX, TD, Acc>& s, const StepCoef<Acc, kHist>& c, int64_t i) {
  Acc d[V], x[V], acc[V], t[V];
  load_pack(s.d_cond, i, d);
  if constexpr (kGuide == Guide::kCfg) {
    load_pack(s.d_uncond, i, t);
    for (int j = 0; j < V; ++j) d[j] = t[j] + c.w * (d[j] - t[j]);
  }
  load_pack(s.x, i, x);
  if constexpr (kGuide == Guide::kPerSample) {
    load_pack(s.d_uncond, i, t);
    for (int j = 0; j < V; ++j) d[j] = c.g[0] * x[j] + c.g[1] * d[j] + c.g[2] * t[j];
  }
  for (int j = 0; j < V; ++j) acc[j] = c.a * x[j] + c.b[0] * d[j];
  for (int k = 0; k < kHist; ++k) {
    load_pack(s.history[k], i, t);
    for (int j = 0; j < V; ++j) acc[j] += c.b[k + 1] * t[j];
  }
  if constexpr (kNoise) {
    load_pack(s.noise, i, t);
    for (int j = 0; j < V; ++j) acc[j] += c.c_noise * t[j];
  }
  if constexpr (kWriteE) {
    for (int j = 0; j < V; ++j) t[j] = c.hx * x[j] + c.hd * d[j];
    store_pack(s.e_out, i, t);
  }
  store_pack(s.x_out, i, acc);
}

// Calls f(guide, hist, noise, write_e) with std::integral_constant arguments for these run-time flags (host
// code), so that each kernel instance is specialised to the step's shape. `guide` is passed on as given, already
// a compile-time value: how the forward forms D, or whether the backward has a d_uncond.
template <typename G, typename F>
inline void dispatch_step_shape(G guide, int n_history, bool has_noise, bool write_e, F&& f) {
  auto with_hist = [&](auto noise, auto e) {
    switch (n_history) {
      case 0: return f(guide, std::integral_constant<int, 0>{}, noise, e);
      case 1: return f(guide, std::integral_constant<int, 1>{}, noise, e);
      case 2: return f(guide, std::integral_constant<int, 2>{}, noise, e);
      default: return f(guide, std::integral_constant<int, 3>{}, noise, e);
    }
  };
  auto with_e = [&](auto noise) {
    return write_e ? with_hist(noise, std::true_type{}) : with_hist(noise, std::false_type{});
  };
  return has_noise ? with_e(std::true_type{}) : with_e(std::false_type{});
}

// The backward's flags: f(uncond, ...) with uncond a std::bool_constant.
template <typename F>
inline void dispatch_step_flags(bool has_uncond, int n_history, bool has_noise, bool write_e, F&& f) {
  return has_uncond ? dispatch_step_shape(std::true_type{}, n_history, has_noise, write_e, f)
                    : dispatch_step_shape(std::false_type{}, n_history, has_noise, write_e, f);
}

template <Guide kGuide>
using GuideMode = std::integral_constant<Guide, kGuide>;

// The forward's flags: f(guide, ...) with guide a GuideMode, per sample where s has a guide, else CFG where it
// has a d_uncond.
template <typename TX, typename TD, typename Acc, typename F>
inline void dispatch_step_flags(const StepArgs<TX, TD, Acc>& s, F&& f) {
  auto shape = [&](auto guide) {
    return dispatch_step_shape(guide, s.n_history, s.noise != nullptr, s.e_out != nullptr, f);
  };
  if (s.guide) return shape(GuideMode<Guide::kPerSample>{});
  return s.d_uncond ? shape(GuideMode<Guide::kCfg>{}) : shape(GuideMode<Guide::kNone>{});
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
  const TX* __restrict__ g_x;
  const TX* __restrict__ g_e;
  TX* __restrict__ grad_x;
  TD* __restrict__ grad_dc;
  TD* __restrict__ grad_du;
  TX* __restrict__ grad_history[kMaxHistory];
  TX* __restrict__ grad_noise;
};

template <bool kUncond, int kHist, bool kNoise, typename TX, typename TD, typename Acc, typename Sum>
FD_HOST_DEVICE void step_grad_element(const StepGradArgs<TX, TD, Acc>& g, const StepCoef<Acc, kHist>& c, int64_t i,
                                      Sum (&sums)[kNumCoef]) {
  const auto& s = g.step;
  const Acc gx = load<Acc>(g.g_x, i);
  const Acc ge = load<Acc>(g.g_e, i);
  const Acc x = load<Acc>(s.x, i);
  const Acc dc = load<Acc>(s.d_cond, i);
  Acc d = dc;
  const Acc gd = c.b[0] * gx + c.hd * ge;
  store(g.grad_x, i, c.a * gx + c.hx * ge);
  if constexpr (kUncond) {
    const Acc du = load<Acc>(s.d_uncond, i);
    d = du + c.w * (dc - du);
    store(g.grad_dc, i, c.w * gd);
    store(g.grad_du, i, (Acc(1) - c.w) * gd);
    sums[1] += gd * (dc - du);
  } else {
    store(g.grad_dc, i, gd);
  }
  sums[0] += gx * x;
  sums[2] += ge * x;
  sums[3] += ge * d;
  sums[5] += gx * d;
  if constexpr (kNoise) {
    store(g.grad_noise, i, c.c_noise * gx);
    sums[4] += gx * load<Acc>(s.noise, i);
  }
  for (int k = 0; k < kHist; ++k) {
    store(g.grad_history[k], i, c.b[k + 1] * gx);
    sums[6 + k] += gx * load<Acc>(s.history[k], i);
  }
}

// ---------------------------------------------------------------------------------------------- guidance sums
//
// Per sample b, with u = m0 x + m1 Dc + m2 Du and v = m3 x + m4 Dc + m5 Du element by element (m = mix[b]):
//   out[b] = [sum u, sum v, sum u^2, sum v^2, sum u v]
// over the sample's sample_n consecutive elements. u and v are formed before they are squared, so the inputs do
// not cancel in the sums. The storage types and pairs are the step's; mix and out are in Acc.

constexpr int kNumMix = 6;
constexpr int kNumSums = 5;

template <typename TX, typename TD, typename Acc>
struct SumsArgs {
  const TX* __restrict__ x;
  const TD* __restrict__ d_cond;
  const TD* __restrict__ d_uncond;
  const Acc* __restrict__ mix;  // [batch, kNumMix]
  Acc* __restrict__ out;        // [batch, kNumSums]
  int64_t batch;
  int64_t sample_n;
};

// Whether the sums may read vectors of kVec<TX>: every pointer aligned, and each sample a whole number of vectors
// (so every sample starts aligned and no vector straddles two). Otherwise everything goes element by element.
template <typename TX, typename TD, typename Acc>
FD_HOST_DEVICE bool sums_packed(const SumsArgs<TX, TD, Acc>& s) {
  constexpr int V = kVec<TX>;
  return pack_aligned<V>(s.x) && pack_aligned<V>(s.d_cond) && pack_aligned<V>(s.d_uncond) && s.sample_n % V == 0;
}

// Adds elements [i, i + V) of one sample (weights m) to the sums, lane j into sums[k][j % L]: L = V keeps the
// lanes apart, so that the CPU compiler vectorises the sums across them; L = 1 keeps a GPU thread's registers
// few. The products are taken in Sum, exact for a float u in double.
template <int V, int L, typename TX, typename TD, typename Acc, typename Sum>
FD_HOST_DEVICE void sums_elements(const SumsArgs<TX, TD, Acc>& s, const Acc (&m)[kNumMix], int64_t i,
                                  Sum (&sums)[kNumSums][L]) {
  Acc x[V], dc[V], du[V];
  load_pack(s.x, i, x);
  load_pack(s.d_cond, i, dc);
  load_pack(s.d_uncond, i, du);
  for (int j = 0; j < V; ++j) {
    const Sum u = m[0] * x[j] + m[1] * dc[j] + m[2] * du[j];
    const Sum v = m[3] * x[j] + m[4] * dc[j] + m[5] * du[j];
    sums[0][j % L] += u;
    sums[1][j % L] += v;
    sums[2][j % L] += u * u;
    sums[3][j % L] += v * v;
    sums[4][j % L] += u * v;
  }
}

}  // namespace fastdiff
