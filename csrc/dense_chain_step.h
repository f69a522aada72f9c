// The step plan of a dense chain (DESIGN.md section 2), written once for every backend: the
// gamma forward over all layers, then the fused backward pass of every layer, output to input
// (reads W, grad, momentum buffer once; accumulates gamma_out from the old weights; writes the
// update), the bias kappas (gamma_out at each layer's output) and the bias update. A whole step
// is one op call.
//
// dense_chain_walk is the order of that step. A backend gives it the gammas' representation and the
// per-layer steps (a `Chain` policy): TensorChain below runs the backend's per-layer op kernels on
// small tensors (the CUDA backend: host functions that launch and never synchronize); the CPU
// backend keeps the gammas in host buffers (csrc/cpu/dense_kernels.cpp).
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "workspace.h"

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace pathsgd {

// Chain must provide: a Gamma type (a gamma vector with its log scale), and
//   Gamma input_gamma()                     gamma_in of layer 0 (gamma0, or ones)
//   Gamma output_gamma()                    gamma_out of the last layer (ones)
//   Gamma forward(l, Gamma& gamma_in)       gamma_in of layer l + 1
//   void bias_kappa(k, const Gamma& gout)   kappa of bias k (of the layer whose gamma_out is gout)
//   Gamma fused(l, Gamma& gin, Gamma& gout) the fused pass of layer l; returns its input's gamma_out
//                                           (may skip it for layer 0 without gamma0: nothing reads it)
//   void update_biases()                    the update of every bias with its kappa
//   void finish(Gamma& gout)                the gamma_out at the chain's input, into gamma0 when given
// A given gamma0 is the chain's input gamma as float64 values (what the conv trunk in front of the
// chain computes): it enters as (values / s, log s) with s = max(max(gamma0), tiny) and leaves as
// values * exp(log scale), the formulas of to_log_scaled / from_log_scaled in pathsgd/reference.py.
template <typename Chain>
void dense_chain_walk(Chain& chain, int64_t layers, at::IntArrayRef bias_layers) {
  // 1. gamma forward: gamma_in of every layer (the chain's output gamma is not needed).
  std::vector<typename Chain::Gamma> gamma_in;
  gamma_in.reserve(layers);
  gamma_in.push_back(chain.input_gamma());
  for (int64_t l = 0; l + 1 < layers; ++l) gamma_in.push_back(chain.forward(l, gamma_in[l]));
  // 2. fused backward passes, output to input, each from the old weights of its layer.
  typename Chain::Gamma gout = chain.output_gamma();
  size_t k = bias_layers.size();
  for (int64_t l = layers - 1; l >= 0; --l) {
    if (k > 0 && bias_layers[k - 1] == l) chain.bias_kappa(--k, gout);  // gamma_out at the layer's output
    gout = chain.fused(l, gamma_in[l], gout);
  }
  // 3. the biases.
  chain.update_biases();
  chain.finish(gout);
}

// The chain over a backend's per-layer op kernels (gamma_forward, fused_dense_step_: their host
// functions, with the op signatures and a Workspace last; scaled_sgd_update_) on small tensors, all
// taken from the caller's workspace.
template <typename GammaForward, typename FusedStep, typename ScaledUpdate>
struct TensorChain {
  using Gamma = std::pair<at::Tensor, at::Tensor>;  // values (a layer's opmath dtype), 0-dim float64 log scale

  at::TensorList weights, weight_grads, weight_buffers, biases, bias_grads, bias_buffers;
  const std::optional<at::Tensor>& gamma0;
  double p;
  at::ArrayRef<double> sgd;
  const std::optional<at::Tensor>& lr_tensor;
  GammaForward& gamma_forward;
  FusedStep& fused_step;
  ScaledUpdate& scaled_update;
  Workspace& workspace;
  bool momentum;
  std::vector<std::optional<at::Tensor>> bias_of;
  std::vector<at::Tensor> bias_kappas;

  at::ScalarType opmath_of(int64_t l) const { return at::toOpMathType(weights[l].scalar_type()); }
  // Gammas follow each layer's opmath dtype (a chain may mix dtypes).
  at::Tensor as_opmath(const at::Tensor& g, int64_t l) const {
    return g.scalar_type() == opmath_of(l) ? g : g.to(opmath_of(l));
  }
  at::Tensor filled(int64_t n, at::ScalarType dtype, double value) {
    return workspace.empty(n < 0 ? at::IntArrayRef{} : at::IntArrayRef{n}, weights[0].options().dtype(dtype))
        .fill_(value);
  }
  Gamma unit_gamma(int64_t l, int64_t n) { return {filled(n, opmath_of(l), 1.0), filled(-1, at::kDouble, 0.0)}; }

  Gamma input_gamma() {
    if (gamma0.has_value()) {
      const at::TensorOptions f64 = gamma0->options();
      at::Tensor scale = workspace.empty({}, f64);
      at::amax_out(scale, *gamma0, {0});
      scale.clamp_min_(std::numeric_limits<double>::min());
      at::Tensor v = workspace.empty({gamma0->size(0)}, f64);
      at::div_out(v, *gamma0, scale);
      at::Tensor log_scale = workspace.empty({}, f64);
      at::log_out(log_scale, scale);
      if (opmath_of(0) == at::kDouble) return {v, log_scale};
      return {workspace.empty({v.size(0)}, f64.dtype(opmath_of(0))).copy_(v), log_scale};
    }
    return unit_gamma(0, weights[0].size(1));
  }
  Gamma output_gamma() {
    const int64_t last = static_cast<int64_t>(weights.size()) - 1;
    return unit_gamma(last, weights[last].size(0));
  }
  Gamma forward(int64_t l, Gamma& gin) {
    auto [v, scale] = gamma_forward(weights[l], bias_of[l], as_opmath(gin.first, l), gin.second, p, workspace);
    return {std::move(v), std::move(scale)};
  }
  // gamma_out * exp(log scale) in float64.
  void bias_kappa(size_t k, const Gamma& gout) {
    const at::TensorOptions f64 = gout.first.options().dtype(at::kDouble);
    at::Tensor scale = workspace.empty({}, f64);
    at::exp_out(scale, gout.second);
    bias_kappas[k] = workspace.empty({gout.first.size(0)}, f64).copy_(gout.first).mul_(scale);
  }
  Gamma fused(int64_t l, Gamma& gin, Gamma& gout) {
    at::Tensor w = weights[l];
    auto [v, scale] = fused_step(w, weight_grads[l],
                                 momentum ? std::optional<at::Tensor>(weight_buffers[l]) : std::nullopt,
                                 as_opmath(gin.first, l), gin.second, as_opmath(gout.first, l), gout.second, p, sgd,
                                 lr_tensor, workspace);
    return {std::move(v), std::move(scale)};
  }
  void update_biases() {
    if (!biases.empty()) scaled_update(biases, bias_grads, bias_buffers, bias_kappas, p, sgd, lr_tensor);
  }
  // The caller's gamma0 tensors take the result (the workspace's are overwritten by the next step),
  // after which the workspace grows to what this step took.
  void finish(Gamma& gout) {
    if (gamma0.has_value()) {
      at::Tensor scale = workspace.empty({}, gamma0->options());
      at::exp_out(scale, gout.second);
      gamma0->copy_(gout.first).mul_(scale);
    }
    workspace.finish();
  }
};

template <typename GammaForward, typename FusedStep, typename ScaledUpdate>
void dense_chain_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                      at::IntArrayRef bias_layers, at::TensorList gamma0, double p, at::ArrayRef<double> sgd,
                      const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& workspace,
                      GammaForward&& gamma_forward, FusedStep&& fused_step, ScaledUpdate&& scaled_update) {
  const SgdArgs a = checks::sgd_args(sgd, "dense_chain_step_");
  const checks::ChainArgs c =
      checks::dense_chain_step_args(params, grads, momentum_buffers, bias_layers, gamma0, p, a.momentum, workspace);
  const int64_t n = static_cast<int64_t>(c.weights.size());
  Workspace scratch(workspace);
  TensorChain<GammaForward, FusedStep, ScaledUpdate> chain{
      c.weights, c.weight_grads, c.weight_buffers, c.biases, c.bias_grads, c.bias_buffers, c.gamma0, p, sgd,
      lr_tensor, gamma_forward, fused_step, scaled_update, scratch, a.momentum != 0.0, {}, {}};
  chain.bias_of.resize(n);
  for (size_t k = 0; k < c.biases.size(); ++k) chain.bias_of[bias_layers[k]] = c.biases[k];
  chain.bias_kappas.resize(c.biases.size());
  dense_chain_walk(chain, n, bias_layers);
}

}  // namespace pathsgd
