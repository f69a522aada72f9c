// The step plan of a dense chain (DESIGN.md section 2), written once for every backend: the
// gamma forward over all layers, then the fused backward pass of every layer, output to input
// (reads W, grad, momentum buffer once; accumulates gamma_out from the old weights; writes the
// update), the bias kappas (gamma_out at each layer's output) and one multi-tensor bias update.
// A backend instantiates it with its per-layer kernels (host functions that launch and never
// synchronize), so a whole step is one op call.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace pathsgd {

// The hyper-parameters of the ops' signatures, as one value (the order of the schemas).
struct SgdArgs {
  double p, lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
  double eps;
  std::optional<double> clamp_min, clamp_max;
  std::optional<at::Tensor> lr_tensor;
};

inline void check_dense_chain(at::TensorList weights, at::TensorList weight_grads, at::TensorList weight_buffers,
                              at::TensorList biases, at::TensorList bias_grads, at::TensorList bias_buffers,
                              at::IntArrayRef bias_layers, const std::optional<at::Tensor>& gamma0,
                              const std::optional<at::Tensor>& gamma0_log_scale, const SgdArgs& a) {
  constexpr const char* op = "pathsgd.dense_chain_step_";
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n > 0, op, ": needs at least one layer");
  TORCH_CHECK(a.p >= 1.0, op, ": p must be >= 1, got ", a.p);
  TORCH_CHECK(static_cast<int64_t>(weight_grads.size()) == n, op, ": ", weight_grads.size(), " weight grads for ", n,
              " weights");
  const bool momentum = a.momentum != 0.0;
  TORCH_CHECK(static_cast<int64_t>(weight_buffers.size()) == (momentum ? n : 0), op, ": momentum ", a.momentum,
              " needs ", momentum ? n : 0, " weight momentum buffers, got ", weight_buffers.size());
  TORCH_CHECK(bias_grads.size() == biases.size() && bias_layers.size() == biases.size(), op, ": ", biases.size(),
              " biases, ", bias_grads.size(), " bias grads and ", bias_layers.size(), " bias layer indices");
  TORCH_CHECK(bias_buffers.size() == (momentum ? biases.size() : 0), op, ": momentum ", a.momentum, " needs ",
              momentum ? biases.size() : 0, " bias momentum buffers, got ", bias_buffers.size());
  const at::Device device = weights[0].device();
  for (int64_t l = 0; l < n; ++l) {
    TORCH_CHECK(weights[l].dim() == 2, op, ": weight ", l, " must be 2-D, got shape ", weights[l].sizes());
    TORCH_CHECK(weights[l].device() == device, op, ": weight ", l, " is on ", weights[l].device(), ", weight 0 on ",
                device);
    TORCH_CHECK(l == 0 || weights[l].size(1) == weights[l - 1].size(0), op, ": weight ", l, " has shape ",
                weights[l].sizes(), " but layer ", l - 1, " has ", weights[l - 1].size(0), " outputs");
  }
  for (size_t k = 0; k < bias_layers.size(); ++k) {
    TORCH_CHECK(bias_layers[k] >= 0 && bias_layers[k] < n && (k == 0 || bias_layers[k] > bias_layers[k - 1]), op,
                ": bias_layers must be increasing layer indices below ", n, ", got ", bias_layers);
  }
  for (size_t k = 0; k < biases.size(); ++k) {
    const int64_t l = bias_layers[k];
    TORCH_CHECK(biases[k].dim() == 1 && biases[k].size(0) == weights[l].size(0), op, ": bias of layer ", l,
                " must have shape [", weights[l].size(0), "], got ", biases[k].sizes());
    TORCH_CHECK(biases[k].device() == device, op, ": bias of layer ", l, " is on ", biases[k].device(),
                ", weight 0 on ", device);
  }
  TORCH_CHECK(gamma0.has_value() == gamma0_log_scale.has_value(), op,
              ": gamma0 and gamma0_log_scale must be given together");
  if (gamma0.has_value()) {
    TORCH_CHECK(gamma0->dim() == 1 && gamma0->size(0) == weights[0].size(1) &&
                    gamma0->scalar_type() == at::toOpMathType(weights[0].scalar_type()) && gamma0->device() == device,
                op, ": gamma0 must be a [", weights[0].size(1), "] ", at::toOpMathType(weights[0].scalar_type()),
                " tensor on ", device, ", got ", gamma0->sizes(), " ", gamma0->scalar_type(), " on ", gamma0->device());
    TORCH_CHECK(gamma0_log_scale->dim() == 0 && gamma0_log_scale->scalar_type() == at::kDouble, op,
                ": gamma0_log_scale must be a 0-dim float64 tensor, got ", gamma0_log_scale->sizes(), " ",
                gamma0_log_scale->scalar_type());
  }
}

// gamma_forward, fused_step, scaled_update: the backend's kernels of the ops of the same names (their
// host functions, with the op signatures).
template <typename GammaForward, typename FusedStep, typename ScaledUpdate>
std::tuple<at::Tensor, at::Tensor> dense_chain_step(
    at::TensorList weights, at::TensorList weight_grads, at::TensorList weight_buffers, at::TensorList biases,
    at::TensorList bias_grads, at::TensorList bias_buffers, at::IntArrayRef bias_layers,
    const std::optional<at::Tensor>& gamma0, const std::optional<at::Tensor>& gamma0_log_scale, const SgdArgs& a,
    GammaForward&& gamma_forward, FusedStep&& fused_step, ScaledUpdate&& scaled_update) {
  check_dense_chain(weights, weight_grads, weight_buffers, biases, bias_grads, bias_buffers, bias_layers, gamma0,
                    gamma0_log_scale, a);
  const int64_t n = static_cast<int64_t>(weights.size());
  const bool momentum = a.momentum != 0.0;
  const auto opmath_of = [](const at::Tensor& w) { return at::toOpMathType(w.scalar_type()); };
  // Gammas follow each layer's opmath dtype (a chain may mix dtypes).
  const auto as_opmath = [&](const at::Tensor& g, const at::Tensor& w) {
    return g.scalar_type() == opmath_of(w) ? g : g.to(opmath_of(w));
  };
  const at::TensorOptions scale_options = weights[0].options().dtype(at::kDouble);
  std::vector<std::optional<at::Tensor>> bias_of(n);
  for (size_t k = 0; k < biases.size(); ++k) bias_of[bias_layers[k]] = biases[k];

  // 1. gamma forward: gamma_in of every layer (the chain's output gamma is not needed).
  std::vector<std::pair<at::Tensor, at::Tensor>> gamma_in;
  gamma_in.reserve(n);
  if (gamma0.has_value()) {
    gamma_in.emplace_back(*gamma0, *gamma0_log_scale);
  } else {
    gamma_in.emplace_back(at::ones({weights[0].size(1)}, weights[0].options().dtype(opmath_of(weights[0]))),
                          at::zeros({}, scale_options));
  }
  for (int64_t l = 0; l + 1 < n; ++l) {
    auto [v, s] = gamma_forward(weights[l], bias_of[l], as_opmath(gamma_in[l].first, weights[l]), gamma_in[l].second,
                                a.p);
    gamma_in.emplace_back(std::move(v), std::move(s));
  }
  // 2. fused backward passes, output to input, each from the old weights of its layer.
  at::Tensor gout = at::ones({weights[n - 1].size(0)}, weights[n - 1].options().dtype(opmath_of(weights[n - 1])));
  at::Tensor gout_scale = at::zeros({}, scale_options);
  std::vector<at::Tensor> bias_kappas(biases.size());
  size_t k = biases.size();
  for (int64_t l = n - 1; l >= 0; --l) {
    if (k > 0 && bias_layers[k - 1] == l) {  // kappa of b_l = gamma_out at the layer's output
      --k;
      bias_kappas[k] = gout.to(at::kDouble) * gout_scale.exp();
    }
    at::Tensor w = weights[l];
    auto [v, s] = fused_step(w, weight_grads[l], momentum ? std::optional<at::Tensor>(weight_buffers[l]) : std::nullopt,
                             as_opmath(gamma_in[l].first, w), gamma_in[l].second, as_opmath(gout, w), gout_scale, a.p,
                             a.lr, a.momentum, a.dampening, a.weight_decay, a.nesterov, a.maximize, a.first_step,
                             a.eps, a.clamp_min, a.clamp_max, a.lr_tensor);
    gout = std::move(v);
    gout_scale = std::move(s);
  }
  // 3. the biases, one multi-tensor update.
  if (!biases.empty()) {
    scaled_update(biases, bias_grads, bias_buffers, bias_kappas, a.p, a.lr, a.momentum, a.dampening, a.weight_decay,
                  a.nesterov, a.maximize, a.first_step, a.eps, a.clamp_min, a.clamp_max, a.lr_tensor);
  }
  return {gout, gout_scale};
}

}  // namespace pathsgd
