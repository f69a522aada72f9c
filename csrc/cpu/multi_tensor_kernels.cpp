// CPU multi-tensor kernels: the Path-SGD update with a materialized kappa
// (convolution weights, biases) and clamp_ (WGAN weight clipping).
#include <cmath>

#include "cpu_common.h"

namespace pathsgd {
namespace {

using at::vec::Vectorized;

template <typename scalar_t>
void scaled_update_one(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* buffer,
                       const at::Tensor& kappa, double p, const SgdParams<at::opmath_type<scalar_t>>& h_in) {
  using opmath_t = at::opmath_type<scalar_t>;
  const SgdParams<opmath_t> h = h_in;  // local copy: no aliasing with the stores below
  const at::Tensor g = grad.contiguous();
  const at::Tensor k = kappa.contiguous();
  with_contiguous(param, [&](const at::Tensor& w) {
    scalar_t* W = w.mutable_data_ptr<scalar_t>();
    const scalar_t* G = g.const_data_ptr<scalar_t>();
    const double* K = k.const_data_ptr<double>();
    scalar_t* B = buffer ? buffer->mutable_data_ptr<scalar_t>() : nullptr;
    const double e = 2.0 / p;
    at::parallel_for(0, w.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        // kappa^(2/p) in float64: kappa may exceed the parameter's range.
        const double kp = e == 1.0 ? K[i] : std::pow(K[i], e);
        opmath_t bv = B ? static_cast<opmath_t>(B[i]) : opmath_t(0);
        W[i] = static_cast<scalar_t>(path_sgd_element(static_cast<opmath_t>(W[i]), static_cast<opmath_t>(G[i]), bv,
                                                      static_cast<opmath_t>(kp), h));
        if (B) B[i] = static_cast<scalar_t>(bv);
      }
    });
  });
}

void scaled_sgd_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           at::TensorList kappas, double p, double lr, double momentum, double dampening,
                           double weight_decay, bool nesterov, bool maximize, bool first_step, double eps,
                           std::optional<double> clamp_min, std::optional<double> clamp_max,
                           const std::optional<at::Tensor>& lr_tensor) {
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
  for (size_t i = 0; i < params.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(), "scaled_sgd_update_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto h = make_sgd_params<opmath_t>(lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize,
                                               first_step, eps, clamp_min, clamp_max);
      scaled_update_one<scalar_t>(params[i], grads[i], use_buffer ? &momentum_buffers[i] : nullptr, kappas[i], p, h);
    });
  }
}

void clamp_cpu(at::TensorList tensors, double lo, double hi) {
  TORCH_CHECK(lo <= hi, "pathsgd.clamp_: lo must be <= hi, got lo=", lo, ", hi=", hi);
  for (const at::Tensor& t : tensors) {
    with_contiguous(t, [&](const at::Tensor& c) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "clamp_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        using M = MathOps<opmath_t>;
        scalar_t* x = c.mutable_data_ptr<scalar_t>();
        const opmath_t l = static_cast<opmath_t>(lo), u = static_cast<opmath_t>(hi);
        at::parallel_for(0, c.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            x[i] = static_cast<scalar_t>(M::min_keep_nan(M::max_keep_nan(static_cast<opmath_t>(x[i]), l), u));
          }
        });
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsgd, CPU, m) {
  m.impl("scaled_sgd_update_", &scaled_sgd_update_cpu);
  m.impl("clamp_", &clamp_cpu);
}

}  // namespace pathsgd
