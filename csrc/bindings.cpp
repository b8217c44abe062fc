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

void check_like(const torch::Tensor& t, const torch::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "guided_step: ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "guided_step: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.numel() == x.numel(), "guided_step: ", name, " has ", t.numel(), " elements but x has ", x.numel());
  TORCH_CHECK(t.is_contiguous(), "guided_step: ", name, " must be contiguous");
}

template <typename T>
StepArgs<T> make_args(const torch::Tensor& x, const torch::Tensor& d_cond, const std::optional<torch::Tensor>& d_uncond,
                      const std::vector<torch::Tensor>& history, double a, const std::vector<double>& b, double w,
                      double hx, double hd, torch::Tensor& x_out, const std::optional<torch::Tensor>& e_out) {
  StepArgs<T> s{};
  s.x = x.data_ptr<T>();
  s.d_cond = d_cond.data_ptr<T>();
  s.d_uncond = d_uncond ? d_uncond->data_ptr<T>() : nullptr;
  s.n_history = static_cast<int>(history.size());
  for (int k = 0; k < s.n_history; ++k) s.history[k] = history[k].data_ptr<T>();
  s.a = static_cast<T>(a);
  for (size_t k = 0; k < b.size(); ++k) s.b[k] = static_cast<T>(b[k]);
  s.w = static_cast<T>(w);
  s.hx = static_cast<T>(hx);
  s.hd = static_cast<T>(hd);
  s.x_out = x_out.data_ptr<T>();
  s.e_out = e_out ? e_out->data_ptr<T>() : nullptr;
  s.n = x.numel();
  return s;
}

// x_out = a*x + b[0]*D + sum_k b[k+1]*history[k], with D = d_uncond + w*(d_cond - d_uncond) (or d_cond when
// d_uncond is None); e_out, when given, gets the history entry hx*x + hd*D. All tensors: same dtype (float32 or
// float64), device and number of elements, contiguous. x_out may alias x.
void guided_step(const torch::Tensor& x, const torch::Tensor& d_cond, const std::optional<torch::Tensor>& d_uncond,
                 const std::vector<torch::Tensor>& history, double a, const std::vector<double>& b, double w,
                 double hx, double hd, torch::Tensor x_out, const std::optional<torch::Tensor>& e_out) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat64,
              "guided_step: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(static_cast<int>(history.size()) <= kMaxHistory, "guided_step: at most ", kMaxHistory,
              " history tensors, got ", history.size());
  TORCH_CHECK(b.size() == history.size() + 1, "guided_step: need len(b) == len(history) + 1, got ", b.size(), " and ",
              history.size());
  TORCH_CHECK(x.is_contiguous(), "guided_step: x must be contiguous");
  check_like(d_cond, x, "d_cond");
  if (d_uncond) check_like(*d_uncond, x, "d_uncond");
  for (const auto& h : history) check_like(h, x, "history");
  check_like(x_out, x, "x_out");
  if (e_out) check_like(*e_out, x, "e_out");

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "guided_step", [&] {
    const auto s = make_args<scalar_t>(x, d_cond, d_uncond, history, a, b, w, hx, hd, x_out, e_out);
    if (x.is_cpu()) {
      guided_step_cpu(s);
    } else {
#ifdef WITH_CUDA
      guided_step_cuda_on_current_stream(s, x.device());
#else
      TORCH_CHECK(false, "guided_step: fastdiff._C was built without CUDA; x is on ", x.device());
#endif
    }
  });
}

}  // namespace
}  // namespace fastdiff

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff compiled kernels (CPU always; CUDA when built with it)";
  m.def("guided_step", &fastdiff::guided_step, "Fused guided solver step (see csrc/step_math.h)", py::arg("x"),
        py::arg("d_cond"), py::arg("d_uncond"), py::arg("history"), py::arg("a"), py::arg("b"), py::arg("w"),
        py::arg("hx"), py::arg("hd"), py::arg("x_out"), py::arg("e_out"));
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
