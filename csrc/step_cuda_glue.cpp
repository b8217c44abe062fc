// Compiled only when torch has CUDA: binds the plain-CUDA launcher to torch's current stream.
#include "step_cuda_glue.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "step_cuda.h"

namespace fastdiff {
namespace {

// torch's storage types and CUDA's have the same layout; the kernels are written against CUDA's.
template <typename T>
struct Cuda {
  using type = T;
};
template <>
struct Cuda<c10::Half> {
  using type = __half;
};
template <>
struct Cuda<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
auto as_cuda(T* p) {
  return reinterpret_cast<typename Cuda<std::remove_const_t<T>>::type*>(const_cast<std::remove_const_t<T>*>(p));
}

template <typename T>
auto as_cuda_or_null(T* p) {
  return p ? as_cuda(p) : nullptr;
}

template <typename TX, typename TD, typename Acc>
auto as_cuda_args(const StepArgs<TX, TD, Acc>& s) {
  StepArgs<typename Cuda<TX>::type, typename Cuda<TD>::type, Acc> c{};
  c.x = as_cuda(s.x);
  c.d_cond = as_cuda(s.d_cond);
  c.d_uncond = as_cuda_or_null(s.d_uncond);
  for (int k = 0; k < s.n_history; ++k) c.history[k] = as_cuda(s.history[k]);
  c.n_history = s.n_history;
  c.noise = as_cuda_or_null(s.noise);
  c.a = s.a;
  for (int k = 0; k <= kMaxHistory; ++k) c.b[k] = s.b[k];
  c.w = s.w;
  c.hx = s.hx;
  c.hd = s.hd;
  c.c_noise = s.c_noise;
  c.x_out = as_cuda_or_null(s.x_out);
  c.e_out = as_cuda_or_null(s.e_out);
  c.n = s.n;
  c.coef = s.coef;
  c.guide = s.guide;
  c.sample_n = s.sample_n;
  return c;
}

}  // namespace

template <typename TX, typename TD, typename Acc>
void guided_step_cuda_on_current_stream(const StepArgs<TX, TD, Acc>& s, c10::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  const int err = guided_step_cuda(as_cuda_args(s), c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == 0, "guided_step: CUDA launch failed with error ", err);
}

template <typename TX, typename TD, typename Acc>
void guidance_sums_cuda_on_current_stream(const SumsArgs<TX, TD, Acc>& s, double* partial, c10::Device device) {
  SumsArgs<typename Cuda<TX>::type, typename Cuda<TD>::type, Acc> c{};
  c.x = as_cuda(s.x);
  c.d_cond = as_cuda(s.d_cond);
  c.d_uncond = as_cuda(s.d_uncond);
  c.mix = s.mix;
  c.out = s.out;
  c.batch = s.batch;
  c.sample_n = s.sample_n;
  const c10::cuda::CUDAGuard guard(device);
  const int err = guidance_sums_cuda(c, partial, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == 0, "guidance_sums: CUDA launch failed with error ", err);
}

template <typename TX, typename TD, typename Acc>
void guided_step_backward_cuda_on_current_stream(const StepGradArgs<TX, TD, Acc>& g, double* partial,
                                                 c10::Device device) {
  StepGradArgs<typename Cuda<TX>::type, typename Cuda<TD>::type, Acc> c{};
  c.step = as_cuda_args(g.step);
  c.g_x = as_cuda(g.g_x);
  c.g_e = as_cuda(g.g_e);
  c.grad_x = as_cuda(g.grad_x);
  c.grad_dc = as_cuda(g.grad_dc);
  c.grad_du = as_cuda_or_null(g.grad_du);
  for (int k = 0; k < g.step.n_history; ++k) c.grad_history[k] = as_cuda(g.grad_history[k]);
  c.grad_noise = as_cuda_or_null(g.grad_noise);
  const c10::cuda::CUDAGuard guard(device);
  const int err = guided_step_backward_cuda(c, partial, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == 0, "guided_step_backward: CUDA launch failed with error ", err);
}

template void guided_step_cuda_on_current_stream(const StepArgs<float, float, float>&, c10::Device);
template void guided_step_cuda_on_current_stream(const StepArgs<float, c10::Half, float>&, c10::Device);
template void guided_step_cuda_on_current_stream(const StepArgs<float, c10::BFloat16, float>&, c10::Device);
template void guided_step_cuda_on_current_stream(const StepArgs<c10::Half, c10::Half, float>&, c10::Device);
template void guided_step_cuda_on_current_stream(const StepArgs<c10::BFloat16, c10::BFloat16, float>&, c10::Device);
template void guided_step_cuda_on_current_stream(const StepArgs<double, double, double>&, c10::Device);

template void guidance_sums_cuda_on_current_stream(const SumsArgs<float, float, float>&, double*, c10::Device);
template void guidance_sums_cuda_on_current_stream(const SumsArgs<float, c10::Half, float>&, double*, c10::Device);
template void guidance_sums_cuda_on_current_stream(const SumsArgs<float, c10::BFloat16, float>&, double*,
                                                   c10::Device);
template void guidance_sums_cuda_on_current_stream(const SumsArgs<c10::Half, c10::Half, float>&, double*,
                                                   c10::Device);
template void guidance_sums_cuda_on_current_stream(const SumsArgs<c10::BFloat16, c10::BFloat16, float>&, double*,
                                                   c10::Device);
template void guidance_sums_cuda_on_current_stream(const SumsArgs<double, double, double>&, double*, c10::Device);


template void guided_step_backward_cuda_on_current_stream(const StepGradArgs<float, float, float>&, double*, c10::Device);
template void guided_step_backward_cuda_on_current_stream(const StepGradArgs<float, c10::Half, float>&, double*,
                                                          c10::Device);
template void guided_step_backward_cuda_on_current_stream(const StepGradArgs<float, c10::BFloat16, float>&, double*,
                                                          c10::Device);
template void guided_step_backward_cuda_on_current_stream(const StepGradArgs<c10::Half, c10::Half, float>&, double*,
                                                          c10::Device);
template void guided_step_backward_cuda_on_current_stream(
    const StepGradArgs<c10::BFloat16, c10::BFloat16, float>&, double*, c10::Device);
template void guided_step_backward_cuda_on_current_stream(const StepGradArgs<double, double, double>&, double*,
                                                          c10::Device);

}  // namespace fastdiff
