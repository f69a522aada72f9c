// Helpers shared by the CPU kernels: hyper-parameters with a CPU lr tensor, dispatch helpers,
// and the at::vec specialization of MathOps.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "../checks.h"
#include "../path_sgd_math.h"

namespace pathsgd {

// Vectorized specialization so path_sgd_element / abs_pow run on SIMD lanes.
template <typename S>
struct MathOps<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V abs(V x) { return x.abs(); }
  static V max_keep_nan(V x, V lo) { return V::blendv(x, lo, x < lo); }
  static V min_keep_nan(V x, V hi) { return V::blendv(x, hi, x > hi); }
  static V pow(V x, V e) { return x.pow(e); }
};

// Elements per parallel chunk for element-wise loops: large enough that
// at::parallel_for overhead is negligible.
constexpr int64_t kElementGrain = 32768;

// On CPU a tensor lr costs no device synchronization to read.
template <typename S>
SgdParams<S> make_sgd_params(const SgdArgs& a, const std::optional<at::Tensor>& lr_tensor) {
  return make_sgd_params<S>(a, lr_tensor.has_value() ? lr_tensor->item<double>() : a.lr);
}

// Calls fn with the PowKind of p as a compile-time constant.
template <typename Fn>
void dispatch_pow_kind(PowKind kind, Fn&& fn) {
  switch (kind) {
    case PowKind::kSquare: return fn(std::integral_constant<PowKind, PowKind::kSquare>{});
    case PowKind::kAbs: return fn(std::integral_constant<PowKind, PowKind::kAbs>{});
    default: return fn(std::integral_constant<PowKind, PowKind::kGeneral>{});
  }
}

// Calls fn with the SgdVariant of h as a compile-time constant.
template <typename S, typename Fn>
void dispatch_sgd_variant(const SgdParams<S>& h, Fn&& fn) {
  switch (sgd_variant(h)) {
    case SgdVariant::kPlain: return fn(std::integral_constant<SgdVariant, SgdVariant::kPlain>{});
    case SgdVariant::kPlainMomentum: return fn(std::integral_constant<SgdVariant, SgdVariant::kPlainMomentum>{});
    default: return fn(std::integral_constant<SgdVariant, SgdVariant::kAll>{});
  }
}

// The multi-tensor update with materialized kappa (csrc/cpu/multi_tensor_kernels.cpp).
void scaled_sgd_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           at::TensorList kappas, double p, at::ArrayRef<double> sgd,
                           const std::optional<at::Tensor>& lr_tensor);

// The same update of one contiguous param (grad and buffer contiguous too) with its float64 kappa
// given as a host array of param.numel() values; `lr` already read (the dense chain's bias update).
void scaled_sgd_update_raw(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* buffer,
                           const double* kappa, double p, const SgdArgs& a, double lr);

// Runs fn on a contiguous version of `t` and writes the result back when `t`
// itself is not contiguous (a rare case: costs one temporary of t's size).
template <typename Fn>
void with_contiguous(const at::Tensor& t, Fn&& fn) {
  if (t.is_contiguous()) {
    fn(t);
  } else {
    at::Tensor c = t.contiguous();
    fn(c);
    t.copy_(c);
  }
}

}  // namespace pathsgd
