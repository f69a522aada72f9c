// Argument checks shared by the CPU and CUDA kernels: one text per problem, whatever the device.
// The CUDA kernels add their device checks (every tensor on the parameters' device) on top.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "path_sgd_math.h"

namespace pathsgd {
namespace checks {

inline void log_scale(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 && t.scalar_type() == at::kDouble, "pathsgd: ", name,
              " must be a 0-dim float64 tensor, got shape ", t.sizes(), " and dtype ", t.scalar_type());
}

inline void gamma(const at::Tensor& g, int64_t size, at::ScalarType opmath, const char* name) {
  TORCH_CHECK(g.dim() == 1 && g.size(0) == size, "pathsgd: ", name, " must have shape [", size, "], got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == opmath, "pathsgd: ", name, " must have dtype ", opmath, ", got ", g.scalar_type());
}

inline void gamma_forward_args(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& gamma_in, const at::Tensor& gamma_in_log_scale, double p) {
  TORCH_CHECK(weight.dim() == 2, "pathsgd.gamma_forward: weight must be 2-D, got shape ", weight.sizes());
  TORCH_CHECK(p >= 1.0, "pathsgd.gamma_forward: p must be >= 1, got ", p);
  gamma(gamma_in, weight.size(1), at::toOpMathType(weight.scalar_type()), "gamma_in");
  log_scale(gamma_in_log_scale, "gamma_in_log_scale");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "pathsgd.gamma_forward: bias must have shape [",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "pathsgd.gamma_forward: bias dtype ",
                bias->scalar_type(), " differs from weight dtype ", weight.scalar_type());
  }
}

inline void fused_dense_step_args(const at::Tensor& weight, const std::optional<at::Tensor>& grad,
                                  const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& gamma_in,
                                  const at::Tensor& gamma_in_log_scale, const at::Tensor& gamma_out,
                                  const at::Tensor& gamma_out_log_scale, double p, double momentum) {
  TORCH_CHECK(weight.dim() == 2, "pathsgd.fused_dense_step_: weight must be 2-D, got shape ", weight.sizes());
  TORCH_CHECK(p >= 1.0, "pathsgd.fused_dense_step_: p must be >= 1, got ", p);
  const auto opmath = at::toOpMathType(weight.scalar_type());
  gamma(gamma_in, weight.size(1), opmath, "gamma_in");
  gamma(gamma_out, weight.size(0), opmath, "gamma_out");
  log_scale(gamma_in_log_scale, "gamma_in_log_scale");
  log_scale(gamma_out_log_scale, "gamma_out_log_scale");
  if (grad.has_value()) {
    TORCH_CHECK(grad->sizes() == weight.sizes() && grad->scalar_type() == weight.scalar_type(),
                "pathsgd.fused_dense_step_: grad (shape ", grad->sizes(), ", dtype ", grad->scalar_type(),
                ") must match weight (shape ", weight.sizes(), ", dtype ", weight.scalar_type(), ")");
    TORCH_CHECK(!grad->is_sparse(), "pathsgd.fused_dense_step_: sparse gradients are not supported");
  }
  if (grad.has_value() && momentum != 0.0) {
    TORCH_CHECK(momentum_buffer.has_value(), "pathsgd.fused_dense_step_: momentum != 0 needs a momentum_buffer");
    TORCH_CHECK(momentum_buffer->sizes() == weight.sizes() && momentum_buffer->scalar_type() == weight.scalar_type() &&
                    momentum_buffer->is_contiguous(),
                "pathsgd.fused_dense_step_: momentum_buffer must be a contiguous tensor shaped and typed like weight");
  }
}

// The ops' `float[] sgd` argument (pathsgd/sgd_params.py), unpacked.
inline SgdArgs sgd_args(at::ArrayRef<double> sgd, const char* op) {
  TORCH_CHECK(sgd.size() == SgdArgs::kCount, "pathsgd.", op, ": sgd must have ", SgdArgs::kCount,
              " entries (lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, eps, clamp_min, "
              "clamp_max; pathsgd.sgd_params.SgdParams.packed()), got ", sgd.size());
  return SgdArgs::unpack(sgd.data());
}

inline void clamp_args(at::TensorList tensors, double lo, double hi) {
  TORCH_CHECK(lo <= hi, "pathsgd.clamp_: lo must be <= hi, got lo=", lo, ", hi=", hi);
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(at::isFloatingType(tensors[i].scalar_type()), "pathsgd.clamp_: tensor ", i,
                " must be floating point, got dtype ", tensors[i].scalar_type());
  }
}

inline void scaled_sgd_update_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                   at::TensorList kappas, double p, double momentum) {
  const bool use_buffer = momentum != 0.0;
  TORCH_CHECK(p >= 1.0, "pathsgd.scaled_sgd_update_: p must be >= 1, got ", p);
  TORCH_CHECK(grads.size() == params.size() && kappas.size() == params.size(),
              "pathsgd.scaled_sgd_update_: params, grads and kappas must have the same length, got ", params.size(),
              ", ", grads.size(), ", ", kappas.size());
  TORCH_CHECK(!use_buffer || momentum_buffers.size() == params.size(),
              "pathsgd.scaled_sgd_update_: momentum != 0 needs one momentum buffer per param, got ",
              momentum_buffers.size(), " for ", params.size(), " params");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(grads[i].sizes() == params[i].sizes() && grads[i].scalar_type() == params[i].scalar_type(),
                "pathsgd.scaled_sgd_update_: grad ", i, " (shape ", grads[i].sizes(), ", dtype ",
                grads[i].scalar_type(), ") must match its param (shape ", params[i].sizes(), ", dtype ",
                params[i].scalar_type(), ")");
    TORCH_CHECK(!grads[i].is_sparse(), "pathsgd.scaled_sgd_update_: sparse gradients are not supported (grad ", i,
                ")");
    TORCH_CHECK(kappas[i].sizes() == params[i].sizes() && kappas[i].scalar_type() == at::kDouble,
                "pathsgd.scaled_sgd_update_: kappa ", i, " must be float64 shaped like its param ",
                params[i].sizes(), ", got ", kappas[i].scalar_type(), " ", kappas[i].sizes());
    if (use_buffer) {
      TORCH_CHECK(momentum_buffers[i].sizes() == params[i].sizes() &&
                      momentum_buffers[i].scalar_type() == params[i].scalar_type() &&
                      momentum_buffers[i].is_contiguous(),
                  "pathsgd.scaled_sgd_update_: momentum buffer ", i,
                  " must be a contiguous tensor shaped and typed like its param");
    }
  }
}

// `t` (a grad or momentum buffer of entry `index` of a list) matches its parameter.
inline void like(const at::Tensor& t, const at::Tensor& param, const at::Device& device, const char* op,
                 const char* what, int64_t index, bool contiguous) {
  TORCH_CHECK(t.sizes() == param.sizes() && t.scalar_type() == param.scalar_type() && t.device() == device &&
                  !t.is_sparse() && (!contiguous || t.is_contiguous()),
              op, ": ", what, " ", index, " (shape ", t.sizes(), ", dtype ", t.scalar_type(), ", on ", t.device(),
              t.is_sparse() ? ", sparse" : "", contiguous && !t.is_contiguous() ? ", not contiguous" : "",
              ") must be a dense", contiguous ? " contiguous" : "", " tensor shaped and typed like its parameter (",
              param.sizes(), ", ", param.scalar_type(), ") on ", device);
}

// The dense chain op's arguments as per-kind lists: `params` are the chain's weights, then the
// biases of the layers in `bias_layers`; `grads` and `momentum_buffers` follow the same order
// (`momentum_buffers` empty without momentum); `gamma0` is empty or the chain's float64 input gamma.
struct ChainArgs {
  at::TensorList weights, weight_grads, weight_buffers, biases, bias_grads, bias_buffers;
  std::optional<at::Tensor> gamma0;
};

// Splits the op's lists (checking their lengths) and checks every tensor the step reads or writes.
inline ChainArgs dense_chain_step_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                       at::IntArrayRef bias_layers, at::TensorList gamma0, double p,
                                       double momentum_value, const std::optional<at::Tensor>& workspace) {
  constexpr const char* op = "pathsgd.dense_chain_step_";
  const int64_t n = static_cast<int64_t>(params.size()) - static_cast<int64_t>(bias_layers.size());
  TORCH_CHECK(n > 0, op, ": needs at least one layer: params are the chain's weights, then the biases of its ",
              bias_layers.size(), " bias_layers, got ", params.size(), " params");
  TORCH_CHECK(p >= 1.0, op, ": p must be >= 1, got ", p);
  TORCH_CHECK(grads.size() == params.size(), op, ": ", grads.size(), " grads for ", params.size(), " params");
  const bool momentum = momentum_value != 0.0;
  TORCH_CHECK(momentum_buffers.size() == (momentum ? params.size() : 0), op, ": momentum ", momentum_value, " needs ",
              momentum ? params.size() : 0, " momentum buffers (one per param), got ", momentum_buffers.size());
  TORCH_CHECK(gamma0.size() <= 1, op, ": gamma0 must be empty or one float64 vector, got ", gamma0.size(),
              " tensors");
  const auto head = [](at::TensorList list, int64_t k) { return list.empty() ? list : list.slice(0, k); };
  const auto tail = [](at::TensorList list, int64_t k) { return list.empty() ? list : list.slice(k); };
  ChainArgs args{head(params, n), head(grads, n), head(momentum_buffers, n), tail(params, n), tail(grads, n),
                 tail(momentum_buffers, n), std::nullopt};
  if (!gamma0.empty()) args.gamma0 = gamma0[0];
  const at::TensorList weights = args.weights, weight_grads = args.weight_grads, weight_buffers = args.weight_buffers,
                       biases = args.biases, bias_grads = args.bias_grads, bias_buffers = args.bias_buffers;
  const at::Device device = weights[0].device();
  for (int64_t l = 0; l < n; ++l) {
    TORCH_CHECK(weights[l].dim() == 2, op, ": weight ", l, " must be 2-D, got shape ", weights[l].sizes());
    TORCH_CHECK(weights[l].device() == device, op, ": weight ", l, " is on ", weights[l].device(), ", weight 0 on ",
                device);
    TORCH_CHECK(l == 0 || weights[l].size(1) == weights[l - 1].size(0), op, ": weight ", l, " has shape ",
                weights[l].sizes(), " but layer ", l - 1, " has ", weights[l - 1].size(0), " outputs");
  }
  // Every tensor the step writes or reads is checked here, before anything changes: the per-layer
  // kernels' own checks would come after the layers behind them were updated.
  for (int64_t l = 0; l < n; ++l) {
    like(weight_grads[l], weights[l], device, op, "weight grad", l, false);
    if (momentum) like(weight_buffers[l], weights[l], device, op, "weight momentum buffer", l, true);
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
    TORCH_CHECK(biases[k].scalar_type() == weights[l].scalar_type(), op, ": bias of layer ", l, " has dtype ",
                biases[k].scalar_type(), ", its weight ", weights[l].scalar_type());
    like(bias_grads[k], biases[k], device, op, "bias grad", static_cast<int64_t>(k), false);
    if (momentum) like(bias_buffers[k], biases[k], device, op, "bias momentum buffer", static_cast<int64_t>(k), true);
  }
  if (args.gamma0.has_value()) {
    const at::Tensor& g0 = *args.gamma0;
    TORCH_CHECK(g0.dim() == 1 && g0.size(0) == weights[0].size(1) && g0.scalar_type() == at::kDouble &&
                    g0.device() == device,
                op, ": gamma0 must be a [", weights[0].size(1), "] float64 tensor on ", device, ", got ", g0.sizes(),
                " ", g0.scalar_type(), " on ", g0.device());
  }
  if (workspace.has_value()) {
    TORCH_CHECK(workspace->dim() == 1 && workspace->scalar_type() == at::kByte && workspace->is_contiguous() &&
                    workspace->storage_offset() == 0 && workspace->device() == device,
                op, ": workspace must be a 1-D contiguous uint8 tensor of its own on ", device, " (e.g. "
                "torch.empty(0, dtype=torch.uint8, device=...)), got ", workspace->sizes(), " ",
                workspace->scalar_type(), " on ", workspace->device());
  }
  return args;
}

}  // namespace checks
}  // namespace pathsgd
