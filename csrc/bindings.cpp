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
StepArgs<TX, TD, Acc> make_args(const torch::Tensor& x, const torch::Tensor& d_cond, const OptTensor& d_uncond,
                                const std::vector<torch::Tensor>& history, const OptTensor& noise,
                                const std::vector<double>& coef) {
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
  s.n = x.numel();
  return s;
}

template <typename TX, typename TD, typename Acc>
void run(const torch::Tensor& x, const torch::Tensor& d_cond, const OptTensor& d_uncond,
         const std::vector<torch::Tensor>& history, const OptTensor& noise, const std::vector<double>& coef,
         torch::Tensor& x_out, const OptTensor& e_out) {
  auto s = make_args<TX, TD, Acc>(x, d_cond, d_uncond, history, noise, coef);
  s.x_out = x_out.data_ptr<TX>();
  s.e_out = e_out ? e_out->data_ptr<TX>() : nullptr;
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

// Calls fn.template operator()<TX, TD, Acc>() for the dtype pair of (x, d_cond); raises for other pairs.
template <typename F>
void dispatch_dtypes(c10::ScalarType tx, c10::ScalarType td, F&& fn) {
  using torch::kBFloat16, torch::kFloat16, torch::kFloat32, torch::kFloat64;
  if (tx == kFloat32 && td == kFloat32) return fn(float{}, float{}, float{});
  if (tx == kFloat32 && td == kFloat16) return fn(float{}, c10::Half{}, float{});
  if (tx == kFloat32 && td == kBFloat16) return fn(float{}, c10::BFloat16{}, float{});
  if (tx == kFloat16 && td == kFloat16) return fn(c10::Half{}, c10::Half{}, float{});
  if (tx == kBFloat16 && td == kBFloat16) return fn(c10::BFloat16{}, c10::BFloat16{}, float{});
  if (tx == kFloat64 && td == kFloat64) return fn(double{}, double{}, double{});
  TORCH_CHECK(false, "guided_step: unsupported dtypes: state ", tx, " with model outputs ", td,
              "; supported: float32 with float32/float16/bfloat16, float16, bfloat16, float64");
}

void check_step_inputs(const torch::Tensor& x, const torch::Tensor& d_cond, const OptTensor& d_uncond,
                       const std::vector<torch::Tensor>& history, const OptTensor& noise,
                       const std::vector<double>& coef) {
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
}

// x_out = a*x + b0*D + sum_k b[k+1]*history[k] + c_noise*noise, with D = d_uncond + w*(d_cond - d_uncond) (or
// d_cond when d_uncond is None); e_out, when given, gets the history entry hx*x + hd*D.
// coef = [a, w, hx, hd, c_noise, b0, ..., bK]. x, history, noise, x_out and e_out share the state dtype; d_cond
// and d_uncond share the model dtype (see step_math.h for the pairs). All tensors contiguous, on one device,
// with the same number of elements. x_out may alias x.
void guided_step(const torch::Tensor& x, const torch::Tensor& d_cond, const OptTensor& d_uncond,
                 const std::vector<torch::Tensor>& history, const OptTensor& noise, const std::vector<double>& coef,
                 torch::Tensor x_out, const OptTensor& e_out) {
  check_step_inputs(x, d_cond, d_uncond, history, noise, coef);
  check_like(x_out, x, x.scalar_type(), "x_out");
  if (e_out) check_like(*e_out, x, x.scalar_type(), "e_out");
  dispatch_dtypes(x.scalar_type(), d_cond.scalar_type(), [&](auto tx, auto td, auto acc) {
    run<decltype(tx), decltype(td), decltype(acc)>(x, d_cond, d_uncond, history, noise, coef, x_out, e_out);
  });
}

// The backward of guided_step for CPU tensors (see step_math.h). g_x and g_e: gradients of x_next and E, in
// the state dtype. Returns (grad_x, grad_d_cond, grad_d_uncond or None, grad_history, grad_noise or None,
// grad_coef as a float64 tensor of 6 + len(history) values).
std::tuple<torch::Tensor, torch::Tensor, OptTensor, std::vector<torch::Tensor>, OptTensor, torch::Tensor>
guided_step_backward(const torch::Tensor& x, const torch::Tensor& d_cond, const OptTensor& d_uncond,
                     const std::vector<torch::Tensor>& history, const OptTensor& noise, const std::vector<double>& coef,
                     const torch::Tensor& g_x, const torch::Tensor& g_e) {
  check_step_inputs(x, d_cond, d_uncond, history, noise, coef);
  check_like(g_x, x, x.scalar_type(), "g_x");
  check_like(g_e, x, x.scalar_type(), "g_e");
  TORCH_CHECK(x.is_cpu(), "guided_step_backward: only CPU tensors, x is on ", x.device());
  auto grad_x = torch::empty_like(x);
  auto grad_dc = torch::empty_like(d_cond);
  OptTensor grad_du = d_uncond ? OptTensor(torch::empty_like(*d_uncond)) : std::nullopt;
  std::vector<torch::Tensor> grad_h;
  for (const auto& h : history) grad_h.push_back(torch::empty_like(h));
  OptTensor grad_noise = noise ? OptTensor(torch::empty_like(*noise)) : std::nullopt;
  std::vector<double> sums(kNumCoef, 0.0);
  dispatch_dtypes(x.scalar_type(), d_cond.scalar_type(), [&](auto tx, auto td, auto acc) {
    using TX = decltype(tx);
    using TD = decltype(td);
    StepGradArgs<TX, TD, decltype(acc)> g{};
    g.step = make_args<TX, TD, decltype(acc)>(x, d_cond, d_uncond, history, noise, coef);
    g.g_x = g_x.data_ptr<TX>();
    g.g_e = g_e.data_ptr<TX>();
    g.grad_x = grad_x.data_ptr<TX>();
    g.grad_dc = grad_dc.data_ptr<TD>();
    g.grad_du = grad_du ? grad_du->data_ptr<TD>() : nullptr;
    for (size_t k = 0; k < grad_h.size(); ++k) g.grad_history[k] = grad_h[k].data_ptr<TX>();
    g.grad_noise = grad_noise ? grad_noise->data_ptr<TX>() : nullptr;
    guided_step_backward_cpu(g, sums.data());
  });
  auto grad_coef = torch::tensor(std::vector<double>(sums.begin(), sums.begin() + 6 + history.size()),
                                 torch::dtype(torch::kFloat64));
  return {grad_x, grad_dc, grad_du, grad_h, grad_noise, grad_coef};
}

}  // namespace
}  // namespace fastdiff

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff compiled kernels (CPU always; CUDA when built with it)";
  m.def("guided_step", &fastdiff::guided_step, "Fused guided solver step (see csrc/step_math.h)", py::arg("x"),
        py::arg("d_cond"), py::arg("d_uncond"), py::arg("history"), py::arg("noise"), py::arg("coef"),
        py::arg("x_out"), py::arg("e_out"));
  m.def("guided_step_backward", &fastdiff::guided_step_backward, "Backward of guided_step (CPU)", py::arg("x"),
        py::arg("d_cond"), py::arg("d_uncond"), py::arg("history"), py::arg("noise"), py::arg("coef"),
        py::arg("g_x"), py::arg("g_e"));
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
