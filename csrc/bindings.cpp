// Torch glue for fastdiff._C: checks tensors, fills StepArgs, and runs the CPU or CUDA implementation.
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "step_cpu.h"

#ifdef WITH_CUDA
#include "step_cuda.h"
#include "step_cuda_glue.h"
#endif

namespace fastdiff {
namespace {

using OptTensor = std::optional<torch::Tensor>;

// `op` names the op in the messages.
void check_like(const char* op, const torch::Tensor& t, const torch::Tensor& x, c10::ScalarType dtype,
                const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.numel() == x.numel(), op, ": ", name, " has ", t.numel(), " elements but x has ", x.numel());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// A per-sample tensor of the per-sample ops: [B, width] in the accumulation dtype (float64 for a float64 state,
// else float32) on x's device, contiguous, with B = x.size(0), so that each sample is x.numel() / B consecutive
// elements of every [B, ...] input.
void check_per_sample(const char* op, const torch::Tensor& t, const torch::Tensor& x, int64_t width,
                      const char* name) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-d tensor");
  const int64_t batch = x.size(0);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == width, op, ": ", name, " must be [B, ", width,
              "] with B = x.size(0) = ", batch, ", got ", t.sizes());
  TORCH_CHECK(batch > 0 && x.numel() % batch == 0, op, ": B = ", batch, " must divide x's ", x.numel(),
              " elements");
  const auto acc = x.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " for a ", x.scalar_type(), " state, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The kernels take every pointer as __restrict__ (step_math.h): they may reorder loads and stores, and read the
// inputs through the read-only cache, so an output that shares a byte with an input, or with the other output,
// would be silently wrong. The tensors are contiguous, so each spans [data_ptr, data_ptr + nbytes).
void check_no_overlap(const char* op, const torch::Tensor& out, const char* out_name, const torch::Tensor& in,
                      const std::string& in_name) {
  const auto* o = static_cast<const char*>(out.data_ptr());
  const auto* i = static_cast<const char*>(in.data_ptr());
  const bool overlap = o < i + in.nbytes() && i < o + out.nbytes();
  TORCH_CHECK(!overlap, op, ": ", out_name, " overlaps ", in_name,
              "; the outputs must not alias or overlap an input or each other");
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
  s.n = x.numel();
  if (coef.empty()) return s;  // coefficients in device memory, set by the caller
  // coef = [a, w, hx, hd, c_noise, b0, ..., bK]
  s.a = static_cast<Acc>(coef[0]);
  s.w = static_cast<Acc>(coef[1]);
  s.hx = static_cast<Acc>(coef[2]);
  s.hd = static_cast<Acc>(coef[3]);
  s.c_noise = static_cast<Acc>(coef[4]);
  for (size_t k = 5; k < coef.size(); ++k) s.b[k - 5] = static_cast<Acc>(coef[k]);
  return s;
}

// guide: the [B, 3] per-sample weights of guided_step_per_sample, or none for guided_step.
template <typename TX, typename TD, typename Acc>
void run(const char* op, const torch::Tensor& x, const torch::Tensor& d_cond, const OptTensor& d_uncond,
         const std::vector<torch::Tensor>& history, const OptTensor& noise, const std::vector<double>& coef,
         const OptTensor& device_coef, const OptTensor& guide, torch::Tensor& x_out, const OptTensor& e_out) {
  auto s = make_args<TX, TD, Acc>(x, d_cond, d_uncond, history, noise, coef);
  s.coef = device_coef ? device_coef->data_ptr<Acc>() : nullptr;
  s.guide = guide ? guide->data_ptr<Acc>() : nullptr;
  s.sample_n = guide ? x.numel() / guide->size(0) : 0;
  s.x_out = x_out.data_ptr<TX>();
  s.e_out = e_out ? e_out->data_ptr<TX>() : nullptr;
  if (x.is_cpu()) {
    guided_step_cpu(s);
  } else {
#ifdef WITH_CUDA
    guided_step_cuda_on_current_stream(s, x.device());
#else
    TORCH_CHECK(false, op, ": fastdiff._C was built without CUDA; x is on ", x.device());
#endif
  }
}

// Calls fn.template operator()<TX, TD, Acc>() for the dtype pair of (x, d_cond); raises for other pairs.
template <typename F>
void dispatch_dtypes(const char* op, c10::ScalarType tx, c10::ScalarType td, F&& fn) {
  using torch::kBFloat16, torch::kFloat16, torch::kFloat32, torch::kFloat64;
  if (tx == kFloat32 && td == kFloat32) return fn(float{}, float{}, float{});
  if (tx == kFloat32 && td == kFloat16) return fn(float{}, c10::Half{}, float{});
  if (tx == kFloat32 && td == kBFloat16) return fn(float{}, c10::BFloat16{}, float{});
  if (tx == kFloat16 && td == kFloat16) return fn(c10::Half{}, c10::Half{}, float{});
  if (tx == kBFloat16 && td == kBFloat16) return fn(c10::BFloat16{}, c10::BFloat16{}, float{});
  if (tx == kFloat64 && td == kFloat64) return fn(double{}, double{}, double{});
  TORCH_CHECK(false, op, ": unsupported dtypes: state ", tx, " with model outputs ", td,
              "; supported: float32 with float32/float16/bfloat16, float16, bfloat16, float64");
}

// x, and the model outputs like it; the history, noise and coefficient count only where the op takes them.
void check_x_and_model(const char* op, const torch::Tensor& x, const torch::Tensor& d_cond,
                       const OptTensor& d_uncond) {
  TORCH_CHECK(x.numel() > 0, op, ": x is empty");
  // A meta (or any other) tensor has no memory these kernels can read.
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), op, ": x is on ", x.device(), "; the kernels take CPU or CUDA tensors");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const auto td = d_cond.scalar_type();
  check_like(op, d_cond, x, td, "d_cond");
  if (d_uncond) check_like(op, *d_uncond, x, td, "d_uncond");
}

void check_step_inputs(const char* op, const torch::Tensor& x, const torch::Tensor& d_cond,
                       const OptTensor& d_uncond, const std::vector<torch::Tensor>& history, const OptTensor& noise,
                       size_t n_coef) {
  TORCH_CHECK(static_cast<int>(history.size()) <= kMaxHistory, op, ": at most ", kMaxHistory,
              " history tensors, got ", history.size());
  TORCH_CHECK(n_coef == history.size() + 6, op, ": need 6 + len(history) coefficients, got ", n_coef, " for ",
              history.size(), " history tensors");
  check_x_and_model(op, x, d_cond, d_uncond);
  for (const auto& h : history) check_like(op, h, x, x.scalar_type(), "history");
  if (noise) check_like(op, *noise, x, x.scalar_type(), "noise");
}

// Coefficients as the caller holds them: host values (checked finite here), or a tensor. A CPU tensor is read
// on the host; a CUDA tensor, which must be on x's device in the accumulation dtype (float64 for a float64
// state, else float32), is read by the kernel itself, with no host round trip and so no finiteness check.
struct Coef {
  std::vector<double> host;
  OptTensor device;

  // A float32-accumulating state needs its coefficients to fit in float32: converting a larger double to float is
  // undefined behaviour, and gives inf in practice.
  static Coef of(const char* op, const std::vector<double>& values, const torch::Tensor& x) {
    const bool f64 = x.scalar_type() == torch::kFloat64;
    for (double c : values) {
      TORCH_CHECK(std::isfinite(c), op, ": coefficients must be finite, got ", c);
      TORCH_CHECK(f64 || std::abs(c) <= std::numeric_limits<float>::max(), op, ": coefficients must fit in ",
                  "float32, the accumulation dtype of a ", x.scalar_type(), " state; got ", c);
    }
    return {values, std::nullopt};
  }
  static Coef of(const char* op, const torch::Tensor& t, const torch::Tensor& x) {
    TORCH_CHECK(t.dim() == 1 && t.is_floating_point(), op, ": coef must be a 1-D float tensor");
    if (t.is_cpu()) {
      auto h = t.to(torch::kFloat64).contiguous();
      return of(op, std::vector<double>(h.data_ptr<double>(), h.data_ptr<double>() + h.numel()), x);
    }
    const auto acc = x.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    TORCH_CHECK(t.device() == x.device(), op, ": coef is on ", t.device(), " but x is on ", x.device());
    TORCH_CHECK(t.scalar_type() == acc, op, ": coef on the device must be ", acc, " for a ", x.scalar_type(),
                " state, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": coef must be contiguous");
    return {{}, t};
  }
  size_t size() const { return device ? static_cast<size_t>(device->numel()) : host.size(); }
};

// x_out = a*x + b0*D + sum_k b[k+1]*history[k] + c_noise*noise, with D = d_uncond + w*(d_cond - d_uncond) (or
// d_cond when d_uncond is None); e_out, when given, gets the history entry hx*x + hd*D.
// coef = [a, w, hx, hd, c_noise, b0, ..., bK]. x, history, noise, x_out and e_out share the state dtype; d_cond
// and d_uncond share the model dtype (see step_math.h for the pairs). All tensors contiguous, on one device,
// with the same number of elements. x_out and e_out must not overlap any input or each other (checked).
// With a guide (guided_step_per_sample), D = guide[b,0]*x + guide[b,1]*d_cond + guide[b,2]*d_uncond for the
// elements of sample b (see check_per_sample), and w is unused.
void guided_step(const char* op, const torch::Tensor& x, const torch::Tensor& d_cond, const OptTensor& d_uncond,
                 const std::vector<torch::Tensor>& history, const OptTensor& noise, const Coef& coef,
                 const OptTensor& guide, torch::Tensor x_out, const OptTensor& e_out) {
  check_step_inputs(op, x, d_cond, d_uncond, history, noise, coef.size());
  if (guide) check_per_sample(op, *guide, x, 3, "guide");
  check_like(op, x_out, x, x.scalar_type(), "x_out");
  if (e_out) check_like(op, *e_out, x, x.scalar_type(), "e_out");
  std::vector<std::pair<const torch::Tensor*, std::string>> inputs = {{&x, "x"}, {&d_cond, "d_cond"}};
  if (d_uncond) inputs.emplace_back(&*d_uncond, "d_uncond");
  for (size_t k = 0; k < history.size(); ++k) inputs.emplace_back(&history[k], "history[" + std::to_string(k) + "]");
  if (noise) inputs.emplace_back(&*noise, "noise");
  if (coef.device) inputs.emplace_back(&*coef.device, "coef");
  if (guide) inputs.emplace_back(&*guide, "guide");
  for (const auto& [in, name] : inputs) {
    check_no_overlap(op, x_out, "x_out", *in, name);
    if (e_out) check_no_overlap(op, *e_out, "e_out", *in, name);
  }
  if (e_out) check_no_overlap(op, *e_out, "e_out", x_out, "x_out");
  dispatch_dtypes(op, x.scalar_type(), d_cond.scalar_type(), [&](auto tx, auto td, auto acc) {
    run<decltype(tx), decltype(td), decltype(acc)>(op, x, d_cond, d_uncond, history, noise, coef.host, coef.device,
                                                   guide, x_out, e_out);
  });
}

// guided_step with the per-sample guided estimate of the guidance methods (step_math.h): guide is [B, 3] in the
// accumulation dtype on x's device, B = x.size(0), sample b the x.numel() / B consecutive elements from b.
void guided_step_per_sample(const torch::Tensor& x, const torch::Tensor& d_cond, const torch::Tensor& d_uncond,
                            const std::vector<torch::Tensor>& history, const OptTensor& noise, const Coef& coef,
                            const torch::Tensor& guide, torch::Tensor x_out, const OptTensor& e_out) {
  guided_step("guided_step_per_sample", x, d_cond, d_uncond, history, noise, coef, guide, x_out, e_out);
}

// out[b] = [sum u, sum v, sum u^2, sum v^2, sum u*v] over sample b's elements, with u = mix[b,0]*x +
// mix[b,1]*d_cond + mix[b,2]*d_uncond and v likewise with mix[b,3:6] (step_math.h). x: [B, ...] in the state
// dtype; d_cond, d_uncond in the model dtype (the step's pairs), with x's number of elements; mix [B, 6] and out
// [B, 5] in the accumulation dtype. All contiguous, on one device; out must not overlap an input (checked).
void guidance_sums(const torch::Tensor& x, const torch::Tensor& d_cond, const torch::Tensor& d_uncond,
                   const torch::Tensor& mix, torch::Tensor out) {
  constexpr const char* op = "guidance_sums";
  check_x_and_model(op, x, d_cond, d_uncond);
  check_per_sample(op, mix, x, kNumMix, "mix");
  check_per_sample(op, out, x, kNumSums, "out");
  const std::pair<const torch::Tensor*, const char*> inputs[] = {
      {&x, "x"}, {&d_cond, "d_cond"}, {&d_uncond, "d_uncond"}, {&mix, "mix"}};
  for (const auto& [in, name] : inputs) check_no_overlap(op, out, "out", *in, name);
  dispatch_dtypes(op, x.scalar_type(), d_cond.scalar_type(), [&](auto tx, auto td, auto acc) {
    using TX = decltype(tx);
    using TD = decltype(td);
    using Acc = decltype(acc);
    SumsArgs<TX, TD, Acc> s{};
    s.x = x.data_ptr<TX>();
    s.d_cond = d_cond.data_ptr<TD>();
    s.d_uncond = d_uncond.data_ptr<TD>();
    s.mix = mix.data_ptr<Acc>();
    s.out = out.data_ptr<Acc>();
    s.batch = x.size(0);
    s.sample_n = x.numel() / s.batch;
    if (x.is_cpu()) {
      guidance_sums_cpu(s);
    } else {
#ifdef WITH_CUDA
      // Scratch from torch's caching allocator: no sync, and a CUDA graph capture takes it from its own pool.
      const torch::Tensor partial = torch::empty({guidance_sums_blocks(s.batch, s.sample_n), kNumSums},
                                                 torch::dtype(torch::kFloat64).device(x.device()));
      guidance_sums_cuda_on_current_stream(s, partial.data_ptr<double>(), x.device());
#else
      TORCH_CHECK(false, op, ": fastdiff._C was built without CUDA; x is on ", x.device());
#endif
    }
  });
}

// The backward of guided_step (see step_math.h). g_x and g_e: gradients of x_next and E, in the state dtype.
// Returns (grad_x, grad_d_cond, grad_d_uncond or None, grad_history, grad_noise or None, grad_coef as a float64
// tensor of 6 + len(history) values on x's device).
std::tuple<torch::Tensor, torch::Tensor, OptTensor, std::vector<torch::Tensor>, OptTensor, torch::Tensor>
guided_step_backward(const torch::Tensor& x, const torch::Tensor& d_cond, const OptTensor& d_uncond,
                     const std::vector<torch::Tensor>& history, const OptTensor& noise, const Coef& coef,
                     const torch::Tensor& g_x, const torch::Tensor& g_e) {
  check_step_inputs("guided_step", x, d_cond, d_uncond, history, noise, coef.size());
  check_like("guided_step", g_x, x, x.scalar_type(), "g_x");
  check_like("guided_step", g_e, x, x.scalar_type(), "g_e");
  auto grad_x = torch::empty_like(x);
  auto grad_dc = torch::empty_like(d_cond);
  OptTensor grad_du = d_uncond ? OptTensor(torch::empty_like(*d_uncond)) : std::nullopt;
  std::vector<torch::Tensor> grad_h;
  for (const auto& h : history) grad_h.push_back(torch::empty_like(h));
  OptTensor grad_noise = noise ? OptTensor(torch::empty_like(*noise)) : std::nullopt;
  const int64_t n_coef = 6 + static_cast<int64_t>(history.size());
  torch::Tensor grad_coef;
  dispatch_dtypes("guided_step", x.scalar_type(), d_cond.scalar_type(), [&](auto tx, auto td, auto acc) {
    using TX = decltype(tx);
    using TD = decltype(td);
    using Acc = decltype(acc);
    StepGradArgs<TX, TD, Acc> g{};
    g.step = make_args<TX, TD, Acc>(x, d_cond, d_uncond, history, noise, coef.host);
    g.step.coef = coef.device ? coef.device->data_ptr<Acc>() : nullptr;
    g.g_x = g_x.data_ptr<TX>();
    g.g_e = g_e.data_ptr<TX>();
    g.grad_x = grad_x.data_ptr<TX>();
    g.grad_dc = grad_dc.data_ptr<TD>();
    g.grad_du = grad_du ? grad_du->data_ptr<TD>() : nullptr;
    for (size_t k = 0; k < grad_h.size(); ++k) g.grad_history[k] = grad_h[k].data_ptr<TX>();
    g.grad_noise = grad_noise ? grad_noise->data_ptr<TX>() : nullptr;
    if (x.is_cpu()) {
      std::vector<double> sums(kNumCoef, 0.0);
      guided_step_backward_cpu(g, sums.data());
      grad_coef = torch::tensor(std::vector<double>(sums.begin(), sums.begin() + n_coef), torch::kFloat64);
    } else {
#ifdef WITH_CUDA
      auto partial = torch::empty({guided_step_backward_blocks(x.numel()), kNumCoef},
                                  torch::dtype(torch::kFloat64).device(x.device()));
      guided_step_backward_cuda_on_current_stream(g, partial.data_ptr<double>(), x.device());
      grad_coef = partial.sum(0).narrow(0, 0, n_coef);
#else
      TORCH_CHECK(false, "guided_step_backward: fastdiff._C was built without CUDA; x is on ", x.device());
#endif
    }
  });
  return {grad_x, grad_dc, grad_du, grad_h, grad_noise, grad_coef};
}

template <typename Values>
void bind_step(py::module& m, Values) {
  using Out = torch::Tensor;
  m.def(
      "guided_step",
      [](const Out& x, const Out& d_cond, const OptTensor& d_uncond, const std::vector<Out>& history,
         const OptTensor& noise, const Values& coef, Out x_out, const OptTensor& e_out) {
        guided_step("guided_step", x, d_cond, d_uncond, history, noise, Coef::of("guided_step", coef, x),
                    std::nullopt, x_out, e_out);
      },
      "Fused guided solver step (see csrc/step_math.h)", py::arg("x"), py::arg("d_cond"), py::arg("d_uncond"),
      py::arg("history"), py::arg("noise"), py::arg("coef"), py::arg("x_out"), py::arg("e_out"));
  m.def(
      "guided_step_per_sample",
      [](const Out& x, const Out& d_cond, const Out& d_uncond, const std::vector<Out>& history,
         const OptTensor& noise, const Values& coef, const Out& guide, Out x_out, const OptTensor& e_out) {
        guided_step_per_sample(x, d_cond, d_uncond, history, noise, Coef::of("guided_step_per_sample", coef, x),
                               guide, x_out, e_out);
      },
      "guided_step with a per-sample guided estimate D = guide[b] . (x, d_cond, d_uncond) (see csrc/step_math.h)",
      py::arg("x"), py::arg("d_cond"), py::arg("d_uncond"), py::arg("history"), py::arg("noise"), py::arg("coef"),
      py::arg("guide"), py::arg("x_out"), py::arg("e_out"));
  m.def(
      "guided_step_backward",
      [](const Out& x, const Out& d_cond, const OptTensor& d_uncond, const std::vector<Out>& history,
         const OptTensor& noise, const Values& coef, const Out& g_x, const Out& g_e) {
        return guided_step_backward(x, d_cond, d_uncond, history, noise, Coef::of("guided_step", coef, x), g_x,
                                    g_e);
      },
      "Backward of guided_step", py::arg("x"), py::arg("d_cond"), py::arg("d_uncond"), py::arg("history"),
      py::arg("noise"), py::arg("coef"), py::arg("g_x"), py::arg("g_e"));
}

}  // namespace
}  // namespace fastdiff

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff compiled kernels (CPU always; CUDA when built with it)";
  // coef as a tensor or as a list of floats. The tensor overload comes first: pybind11 would otherwise turn a
  // tensor into a list element by element, a host read of every coefficient.
  fastdiff::bind_step(m, torch::Tensor{});
  fastdiff::bind_step(m, std::vector<double>{});
  m.def("guidance_sums", &fastdiff::guidance_sums,
        "Per-sample sums of two combinations of (x, d_cond, d_uncond), written to out (see csrc/step_math.h)",
        py::arg("x"), py::arg("d_cond"), py::arg("d_uncond"), py::arg("mix"), py::arg("out"));
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
