// CPU multi-tensor kernels: the Path-SGD update with a materialized kappa
// (convolution weights, biases) and clamp_ (WGAN weight clipping).
#include <algorithm>
#include <cmath>

#include "cpu_common.h"

namespace pathsgd {
namespace {

using at::vec::Vectorized;

// Elements [i0, i1) of one tensor: SIMD lanes where the parameter is stored in its opmath
// type (kappa^(2/p) is formed per lane in double, then rounded), a scalar loop otherwise.
template <typename scalar_t, SgdVariant kV>
void scaled_update_range(int64_t i0, int64_t i1, scalar_t* W, const scalar_t* G, scalar_t* B, const double* K,
                         double e, const SgdParams<at::opmath_type<scalar_t>>& h_in) {
  using opmath_t = at::opmath_type<scalar_t>;
  const SgdParams<opmath_t> h = h_in;  // local copy: no aliasing with the stores below
  // kappa^(2/p) in float64: kappa may exceed the parameter's range.
  const auto kappa_pow = [&](int64_t i) { return static_cast<opmath_t>(e == 1.0 ? K[i] : std::pow(K[i], e)); };
  int64_t i = i0;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    using V = Vectorized<opmath_t>;
    opmath_t kp[V::size()];
    for (; i + V::size() <= i1; i += V::size()) {
      for (int64_t k = 0; k < V::size(); ++k) kp[k] = kappa_pow(i + k);
      V bv = B ? V::loadu(B + i) : V(opmath_t(0));
      path_sgd_element<kV>(V::loadu(W + i), V::loadu(G + i), bv, V::loadu(kp), h).store(W + i);
      if (B) bv.store(B + i);
    }
  }
  for (; i < i1; ++i) {
    opmath_t bv = B ? static_cast<opmath_t>(B[i]) : opmath_t(0);
    W[i] = static_cast<scalar_t>(path_sgd_element<kV>(static_cast<opmath_t>(W[i]), static_cast<opmath_t>(G[i]), bv,
                                                      kappa_pow(i), h));
    if (B) B[i] = static_cast<scalar_t>(bv);
  }
}

// One contiguous tensor (W, G, B contiguous; kappa K float64 of the same size).
template <typename scalar_t>
void scaled_update_contiguous(scalar_t* W, const scalar_t* G, scalar_t* B, const double* K, int64_t n, double p,
                              const SgdParams<at::opmath_type<scalar_t>>& h) {
  // Fixed blocks of kElementGrain (a multiple of every SIMD width): which elements take the
  // SIMD lanes and which the scalar tail depends on the size only, so results do not depend
  // on the thread count.
  const int64_t blocks = (n + kElementGrain - 1) / kElementGrain;
  dispatch_sgd_variant(h, [&](auto variant) {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scaled_update_range<scalar_t, variant.value>(b * kElementGrain, std::min(n, (b + 1) * kElementGrain), W, G, B,
                                                     K, 2.0 / p, h);
      }
    });
  });
}

template <typename scalar_t>
void scaled_update_one(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* buffer,
                       const at::Tensor& kappa, double p, const SgdParams<at::opmath_type<scalar_t>>& h) {
  const at::Tensor g = grad.contiguous();
  const at::Tensor k = kappa.contiguous();
  with_contiguous(param, [&](const at::Tensor& w) {
    scaled_update_contiguous<scalar_t>(w.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                       buffer ? buffer->mutable_data_ptr<scalar_t>() : nullptr,
                                       k.const_data_ptr<double>(), w.numel(), p, h);
  });
}

}  // namespace

void scaled_sgd_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           at::TensorList kappas, double p, at::ArrayRef<double> sgd,
                           const std::optional<at::Tensor>& lr_tensor) {
  const SgdArgs a = checks::sgd_args(sgd, "scaled_sgd_update_");
  checks::scaled_sgd_update_args(params, grads, momentum_buffers, kappas, p, a.momentum);
  const bool use_buffer = a.momentum != 0.0;
  for (size_t i = 0; i < params.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(), "scaled_sgd_update_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto h = make_sgd_params<opmath_t>(a, lr_tensor);
      scaled_update_one<scalar_t>(params[i], grads[i], use_buffer ? &momentum_buffers[i] : nullptr, kappas[i], p, h);
    });
  }
}

void scaled_sgd_update_raw(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* buffer,
                           const double* kappa, double p, const SgdArgs& a, double lr) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "scaled_sgd_update_cpu", [&] {
    scaled_update_contiguous<scalar_t>(param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                       buffer ? buffer->mutable_data_ptr<scalar_t>() : nullptr, kappa, param.numel(),
                                       p, make_sgd_params<at::opmath_type<scalar_t>>(a, lr));
  });
}

namespace {

void clamp_cpu(at::TensorList tensors, double lo, double hi) {
  checks::clamp_args(tensors, lo, hi);
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
