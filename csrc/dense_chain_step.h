// The step plan of a dense chain (DESIGN.md section 2), written once for every backend: the
// gamma forward over all layers, then the fused backward pass of every layer, output to input
// (reads W, grad, momentum buffer once; accumulates gamma_out from the old weights; writes the
// update), the bias kappas (gamma_out at each layer's output) and one multi-tensor bias update.
// A backend instantiates it with its per-layer kernels (host functions that launch and never
// synchronize), so a whole step is one op call.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

#include <optional>
#include <tuple>
#include <vector>

namespace pathsgd {

// gamma_forward, fused_step, scaled_update: the backend's kernels of the ops of the same names (their
// host functions, with the op signatures).
template <typename GammaForward, typename FusedStep, typename ScaledUpdate>
std::tuple<at::Tensor, at::Tensor> dense_chain_step(
    at::TensorList weights, at::TensorList weight_grads, at::TensorList weight_buffers, at::TensorList biases,
    at::TensorList bias_grads, at::TensorList bias_buffers, at::IntArrayRef bias_layers,
    const std::optional<at::Tensor>& gamma0, const std::optional<at::Tensor>& gamma0_log_scale, double p,
    at::ArrayRef<double> sgd, const std::optional<at::Tensor>& lr_tensor, GammaForward&& gamma_forward,
    FusedStep&& fused_step, ScaledUpdate&& scaled_update) {
  const SgdArgs a = checks::sgd_args(sgd, "dense_chain_step_");
  checks::dense_chain_step_args(weights, weight_grads, weight_buffers, biases, bias_grads, bias_buffers, bias_layers,
                                gamma0, gamma0_log_scale, p, a.momentum);
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
                                p);
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
                             as_opmath(gamma_in[l].first, w), gamma_in[l].second, as_opmath(gout, w), gout_scale, p,
                             sgd, lr_tensor);
    gout = std::move(v);
    gout_scale = std::move(s);
  }
  // 3. the biases, one multi-tensor update.
  if (!biases.empty()) {
    scaled_update(biases, bias_grads, bias_buffers, bias_kappas, p, sgd, lr_tensor);
  }
  return {gout, gout_scale};
}

}  // namespace pathsgd
