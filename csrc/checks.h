// Argument checks shared by the CPU and CUDA kernels: one text per problem, whatever the device.
// The CUDA kernels add their device checks (every tensor on the parameters' device) on top.
#pragma once

#include <ATen/ATen.h>

#include <optional>

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

}  // namespace checks
}  // namespace pathsgd
