// The step of a conv net (a trunk of abs-pow programs, then a dense head) in one op call,
// written once for every backend:
//   1. the trunk's |w|^p leaves in float64 (the foreach ops of reference.abs_pow_list_);
//   2. the trunk's abs-pow forward program (pathsgd::abs_pow_forward) up to the head's input;
//   3. the head's dense_chain_step_ (the backend's kernel), which replaces the head's input gamma
//      with the gamma_out there (from the head's old weights);
//   4. the trunk's VJP program (pathsgd::abs_pow_vjp) seeded with it: every trunk leaf's kappa;
//   5. the trunk's scaled_sgd_update_ (the backend's kernel).
// The trunk's order of pathsgd/step_plans.py, without the Python between the ops (most of a small
// conv net's step). Every tensor the step writes is checked before anything changes. The
// abs-pow programs are device-generic ATen programs: they are called through the dispatcher.
//
// The `layout` argument (built by reference.trunk_layout, read by TrunkLayout):
//   [n_trunk, input_ndim, *input_shape, stop_value, stop_slot, n_bias, *bias_layers,
//    n_forward, *forward_program, n_slots, *slot_values, *vjp_program]
// n_trunk: the trunk's parameters (leaf order) that come first in params; input_shape: the
// abs-pow network's all-ones input; stop_value: the forward output that is the head's input
// (-1: the input); stop_slot: its VJP slot; bias_layers: the head's (dense_chain_step_);
// slot_values: the forward output of each VJP slot (-1: the input).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "checks.h"

#include <optional>
#include <vector>

namespace pathsgd {

struct TrunkLayout {
  int64_t trunk = 0, stop_value = -1, stop_slot = 0;
  std::vector<int64_t> input_shape, slot_values;
  at::IntArrayRef bias_layers, forward_program, vjp_program;

  explicit TrunkLayout(at::IntArrayRef layout) {
    constexpr const char* op = "pathsgd.trunk_chain_step_";
    size_t pos = 0;
    const auto next = [&]() {
      TORCH_CHECK(pos < layout.size(), op, ": truncated layout at position ", pos);
      return layout[pos++];
    };
    const auto span = [&](int64_t n) {
      TORCH_CHECK(n >= 0 && pos + static_cast<size_t>(n) <= layout.size(), op, ": layout entry of length ", n,
                  " at position ", pos, " runs past its end (", layout.size(), ")");
      const at::IntArrayRef out = layout.slice(pos, n);
      pos += n;
      return out;
    };
    trunk = next();
    input_shape = span(next()).vec();
    stop_value = next();
    stop_slot = next();
    bias_layers = span(next());
    forward_program = span(next());
    slot_values = span(next()).vec();
    vjp_program = layout.slice(pos);
    TORCH_CHECK(stop_slot >= 0 && stop_slot < static_cast<int64_t>(slot_values.size()), op, ": stop slot ",
                stop_slot, " out of range [0, ", slot_values.size(), ")");
  }
};

// The trunk's |w|^p leaves: float64 copies of its parameters, then reference.abs_pow_list_'s ops
// (p >= 1), so the bits are those of the step plan's per-op path.
inline std::vector<at::Tensor> trunk_abs_pow_leaves(at::TensorList params, double p) {
  std::vector<at::Tensor> leaves;
  leaves.reserve(params.size());
  for (const at::Tensor& w : params) leaves.push_back(w.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true));
  if (p == 2.0) {
    at::_foreach_mul_(leaves, leaves);
  } else {
    at::_foreach_abs_(leaves);
    if (p != 1.0) at::_foreach_pow_(leaves, p);
  }
  return leaves;
}

// ChainStep, Update: the backend's dense_chain_step_ and scaled_sgd_update_ kernels (their op
// signatures).
template <typename ChainStep, typename Update>
void trunk_chain_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                      at::IntArrayRef layout, at::ArrayRef<double> factors, double p, at::ArrayRef<double> sgd,
                      const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& workspace,
                      ChainStep chain_step, Update update) {
  constexpr const char* op = "pathsgd.trunk_chain_step_";
  const TrunkLayout t(layout);
  const SgdArgs a = checks::sgd_args(sgd, "trunk_chain_step_");
  const bool momentum = a.momentum != 0.0;
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(t.trunk > 0 && t.trunk < n, op, ": the layout's ", t.trunk, " trunk parameters must leave the head ",
              "at least one of the ", n, " params");
  TORCH_CHECK(p >= 1.0, op, ": p must be >= 1, got ", p);
  TORCH_CHECK(grads.size() == params.size(), op, ": ", grads.size(), " grads for ", n, " params");
  TORCH_CHECK(momentum_buffers.size() == (momentum ? params.size() : 0), op, ": momentum ", a.momentum, " needs ",
              momentum ? n : 0, " momentum buffers (one per param), got ", momentum_buffers.size());
  const at::TensorList trunk = params.slice(0, t.trunk), trunk_grads = grads.slice(0, t.trunk);
  const at::TensorList trunk_buffers = momentum ? momentum_buffers.slice(0, t.trunk) : momentum_buffers;
  const at::Device device = trunk[0].device();
  for (int64_t i = 0; i < t.trunk; ++i) {
    TORCH_CHECK(trunk[i].device() == device, op, ": trunk parameter ", i, " is on ", trunk[i].device(),
                ", trunk parameter 0 on ", device);
    checks::like(trunk_grads[i], trunk[i], device, op, "trunk grad", i, false);
    if (momentum) checks::like(trunk_buffers[i], trunk[i], device, op, "trunk momentum buffer", i, true);
  }

  // 1-2. the trunk's abs-pow network up to the head's input (changes nothing)
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pathsgd::abs_pow_forward", "")
          .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::IntArrayRef, at::ArrayRef<double>)>();
  static const auto vjp = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("pathsgd::abs_pow_vjp", "")
                              .typed<std::vector<at::Tensor>(at::TensorList, at::TensorList, at::TensorList,
                                                             at::IntArrayRef, at::IntArrayRef, at::ArrayRef<double>)>();
  const std::vector<at::Tensor> leaves = trunk_abs_pow_leaves(trunk, p);
  const at::Tensor ones = at::ones(t.input_shape, leaves[0].options());
  const std::vector<at::Tensor> values = forward.call(ones, leaves, t.forward_program, factors);
  const auto value = [&](int64_t k) -> const at::Tensor& {
    TORCH_CHECK(k >= -1 && k < static_cast<int64_t>(values.size()), op, ": forward output ", k, " out of range");
    return k < 0 ? ones : values[k];
  };
  std::vector<at::Tensor> slots;
  slots.reserve(t.slot_values.size());
  for (int64_t k : t.slot_values) slots.push_back(value(k));
  // the head's input gamma; the chain op writes its gamma_out there into it
  const std::vector<at::Tensor> gamma{value(t.stop_value).reshape(-1).clone()};

  // 3. the head (it checks its own arguments before it changes anything)
  const std::vector<at::Tensor> no_buffers;
  chain_step(params.slice(t.trunk), grads.slice(t.trunk),
             momentum ? momentum_buffers.slice(t.trunk) : at::TensorList(no_buffers), t.bias_layers, gamma, p, sgd,
             lr_tensor, workspace);

  // 4-5. the trunk's kappas, seeded with the gamma_out at the head's input, and its update
  const std::vector<at::Tensor> seed{gamma[0].reshape(slots[t.stop_slot].sizes())};
  const std::vector<at::Tensor> kappas = vjp.call(slots, leaves, seed, {t.stop_slot}, t.vjp_program, factors);
  update(trunk, trunk_grads, trunk_buffers, kappas, p, sgd, lr_tensor);
}

}  // namespace pathsgd
