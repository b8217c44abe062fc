// Torch glue for fastdiff._C: checks tensors, fills StepArgs, and runs the CPU or CUDA implementation.
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "step_cpu.h"

#ifdef WITH_CUDA
#include "step_cuda_glue.h"
#endif

namespace fastdiff {
namespace {

using OptTensor = std::optional<torch::Tensor>;

void check_like(const torch::Tensor& t, const torch::Tensor& x, c10::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, "guided_step: ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.device() == x.device(), "guided_step: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.numel() == x.numel(), "guided_step: ", name, " has ", t.numel(), " elements but x has ", x.numel());
  TORCH_CHECK(t.is_contiguous(), "guided_step: ", name, " must be contiguous");
}

template <typename TX, typename TD, typename Acc>
void run(const torch::Tensor& x, const torch::Tensor& d_cond, const OptTensor& d_uncond,
         const std::vector<torch::Tensor>& history, const OptTensor& noise, const std::vector<double>& coef,
         torch::Tensor& x_out, const OptTensor& e_out) {
  StepArgs<TX, TD, Acc> s{};
  s.x = x.data_ptr<TX>();
  s.d_cond = d_cond.data_ptr<TD>();
  s.d_uncond = d_uncond ? d_uncond->data_ptr<TD>() : nullptr;
  s.n_history = static_cast<int>(history.size());
  for (int k = 0; k < s.n_history; ++k) s.history[k] = history[k].data_ptr<TX>();
  s.noise = noise ? noise->data_ptr<TX>() : nullptr;
  // coef = [a, w, hx, hd, c_noise, b0, ..., bK]
  s.a = static_cast<Acc>(coef[0]);
  s.w = static_cast<Acc>(coef[1]);
  s.hx = static_cast<Acc>(coef[2]);
  s.hd = static_cast<Acc>(coef[3]);
  s.c_noise = static_cast<Acc>(coef[4]);
  for (size_t k = 5; k < coef.size(); ++k) s.b[k - 5] = static_cast<Acc>(coef[k]);
  s.x_out = x_out.data_ptr<TX>();
  s.e_out = e_out ? e_out->data_ptr<TX>() : nullptr;
  s.n = x.numel();
  if (x.is_cpu()) {
    guided_step_cpu(s);
  } else {
#ifdef WITH_CUDA
    guided_step_cuda_on_current_stream(s, x.device());
#else
    TORCH_CHECK(false, "guided_step: fastdiff._C was built without CUDA; x is on ", x.device());
#endif
  }
}

// x_out = a*x + b0*D + sum_k b[k+1]*history[k] + c_noise*noise, with D = d_uncond + w*(d_cond - d_uncond) (or
// d_cond when d_uncond is None); e_out, when given, gets the history entry hx*x + hd*D.
// coef = [a, w, hx, hd, c_noise, b0, ..., bK]. x, history, noise, x_out and e_out share the state dtype; d_cond
// and d_uncond share the model dtype (see step_math.h for the pairs). All tensors contiguous, on one device,
// with the same number of elements. x_out may alias x.
void guided_step(const torch::Tensor& x, const torch::Tensor& d_cond, const OptTensor& d_uncond,
                 const std::vector<torch::Tensor>& history, const OptTensor& noise, const std::vector<double>& coef,
                 torch::Tensor x_out, const OptTensor& e_out) {
  TORCH_CHECK(static_cast<int>(history.size()) <= kMaxHistory, "guided_step: at most ", kMaxHistory,
              " history tensors, got ", history.size());
  TORCH_CHECK(coef.size() == history.size() + 6, "guided_step: need 6 + len(history) coefficients, got ",
              coef.size(), " for ", history.size(), " history tensors");
  for (double c : coef) TORCH_CHECK(std::isfinite(c), "guided_step: coefficients must be finite, got ", c);
  TORCH_CHECK(x.is_contiguous(), "guided_step: x must be contiguous");
  const auto tx = x.scalar_type();
  const auto td = d_cond.scalar_type();
  check_like(d_cond, x, td, "d_cond");
  if (d_uncond) check_like(*d_uncond, x, td, "d_uncond");
  for (const auto& h : history) check_like(h, x, tx, "history");
  if (noise) check_like(*noise, x, tx, "noise");
  check_like(x_out, x, tx, "x_out");
  if (e_out) check_like(*e_out, x, tx, "e_out");

  using torch::kBFloat16, torch::kFloat16, torch::kFloat32, torch::kFloat64;
  const auto args = std::forward_as_tuple(x, d_cond, d_uncond, history, noise, coef, x_out, e_out);
  if (tx == kFloat32 && td == kFloat32) {
    std::apply(run<float, float, float>, args);
  } else if (tx == kFloat32 && td == kFloat16) {
    std::apply(run<float, c10::Half, float>, args);
  } else if (tx == kFloat32 && td == kBFloat16) {
    std::apply(run<float, c10::BFloat16, float>, args);
  } else if (tx == kFloat16 && td == kFloat16) {
    std::apply(run<c10::Half, c10::Half, float>, args);
  } else if (tx == kBFloat16 && td == kBFloat16) {
    std::apply(run<c10::BFloat16, c10::BFloat16, float>, args);
  } else if (tx == kFloat64 && td == kFloat64) {
    std::apply(run<double, double, double>, args);
  } else {
    TORCH_CHECK(false, "guided_step: unsupported dtypes: state ", tx, " with model outputs ", td,
                "; supported: float32 with float32/float16/bfloat16, float16, bfloat16, float64");
  }
}

}  // namespace
}  // namespace fastdiff

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff compiled kernels (CPU always; CUDA when built with it)";
  m.def("guided_step", &fastdiff::guided_step, "Fused guided solver step (see csrc/step_math.h)", py::arg("x"),
        py::arg("d_cond"), py::arg("d_uncond"), py::arg("history"), py::arg("noise"), py::arg("coef"),
        py::arg("x_out"), py::arg("e_out"));
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
