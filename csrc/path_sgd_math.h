// Scalar/vector math shared by the CPU (at::vec) and CUDA kernels: one definition of the
// Path-SGD element update, so every backend applies exactly the same formula.
#pragma once

#include <cmath>
#include <optional>

#if defined(__CUDACC__)
#define PATHSGD_HD __host__ __device__ __forceinline__
#else
#define PATHSGD_HD inline
#endif

namespace pathsgd {

// How |w|^p is computed: w*w for p=2 and |w| for p=1 are exact and cheap; only
// other p pay for exp(p*log|w|).
enum class PowKind : int { kAbs = 1, kSquare = 2, kGeneral = 0 };

inline PowKind pow_kind(double p) {
  if (p == 1.0) return PowKind::kAbs;
  if (p == 2.0) return PowKind::kSquare;
  return PowKind::kGeneral;
}

// Elementary functions for a scalar opmath type. The CPU code specializes this
// for at::vec::Vectorized<T> so the same templates below serve both.
template <typename T>
struct MathOps {
  static PATHSGD_HD T abs(T x) { return x < T(0) ? -x : x; }
  // NaN-propagating max/min (like torch.clamp): a NaN in x survives.
  static PATHSGD_HD T max_keep_nan(T x, T lo) { return x < lo ? lo : x; }
  static PATHSGD_HD T min_keep_nan(T x, T hi) { return x > hi ? hi : x; }
  static PATHSGD_HD T pow(T x, T e) {
#if defined(__CUDA_ARCH__)
    return ::pow(x, e);
#else
    return std::pow(x, e);
#endif
  }
};

template <typename T, typename S>
PATHSGD_HD T abs_pow(T w, PowKind kind, S p) {
  using M = MathOps<T>;
  if (kind == PowKind::kSquare) return w * w;
  if (kind == PowKind::kAbs) return M::abs(w);
  return M::pow(M::abs(w), T(p));
}

// Hyper-parameters of one SGD update, in opmath precision.
template <typename S>
struct SgdParams {
  S lr = S(0);
  S momentum = S(0);
  S dampening = S(0);
  S weight_decay = S(0);
  S eps = S(0);
  S clamp_min = S(0);
  S clamp_max = S(0);
  bool nesterov = false;
  bool maximize = false;
  bool first_step = false;  // momentum buffer is initialized to g_tilde (torch.optim.SGD semantics)
  bool has_momentum = false;
  bool has_clamp_min = false;
  bool has_clamp_max = false;
};

// The ops' `float[] sgd` argument, unpacked: pathsgd/sgd_params.py (SgdParams.packed) writes
// these fields in this order. A missing clamp bound is -inf / +inf, which clamps nothing.
struct SgdArgs {
  static constexpr int kCount = 10;
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
  double eps, clamp_min, clamp_max;

  static SgdArgs unpack(const double* v) {
    return SgdArgs{v[0], v[1], v[2], v[3], v[4] != 0.0, v[5] != 0.0, v[6] != 0.0, v[7], v[8], v[9]};
  }
};

// The hyper-parameters in opmath precision (host side, every backend); `lr` is the packed lr or
// the backend's reading of lr_tensor (a CPU tensor on the host; a CUDA one is read in the kernel).
template <typename S>
SgdParams<S> make_sgd_params(const SgdArgs& a, double lr) {
  SgdParams<S> h;
  h.lr = static_cast<S>(lr);
  h.momentum = static_cast<S>(a.momentum);
  h.dampening = static_cast<S>(a.dampening);
  h.weight_decay = static_cast<S>(a.weight_decay);
  h.eps = static_cast<S>(a.eps);
  h.nesterov = a.nesterov;
  h.maximize = a.maximize;
  h.first_step = a.first_step;
  h.has_momentum = a.momentum != 0.0;
  h.has_clamp_min = a.clamp_min != -INFINITY;
  h.has_clamp_max = a.clamp_max != INFINITY;
  h.clamp_min = h.has_clamp_min ? static_cast<S>(a.clamp_min) : S(0);
  h.clamp_max = h.has_clamp_max ? static_cast<S>(a.clamp_max) : S(0);
  return h;
}

// Which of torch.optim.SGD's optional terms an update checks for. kAll reads every
// flag at run time. kPlain / kPlainMomentum are the usual training configurations
// (no weight decay, nesterov, maximize, clamp, and not the buffer-initializing first
// step; without / with momentum) with those terms removed at compile time, so a CPU
// inner loop carries no per-vector branches. Every variant computes the same formula.
enum class SgdVariant : int { kAll = 0, kPlain = 1, kPlainMomentum = 2 };

template <typename S>
inline SgdVariant sgd_variant(const SgdParams<S>& h) {
  const bool plain = h.weight_decay == S(0) && !h.nesterov && !h.maximize && !h.first_step && !h.has_clamp_min &&
                     !h.has_clamp_max;
  if (!plain) return SgdVariant::kAll;
  return h.has_momentum ? SgdVariant::kPlainMomentum : SgdVariant::kPlain;
}

// torch.optim.SGD's update of one element given the path-scaled gradient
// g_tilde (already negated under maximize): weight decay, momentum (the first
// step sets the buffer to g_tilde), lr, then the optional clamp. Returns the new
// weight and updates `buf` in place when momentum is on.
template <SgdVariant kV = SgdVariant::kAll, typename T, typename S>
PATHSGD_HD T sgd_apply(T w, T d, T& buf, const SgdParams<S>& h) {
  using M = MathOps<T>;
  constexpr bool kAll = kV == SgdVariant::kAll;
  if (kAll && h.weight_decay != S(0)) d = d + T(h.weight_decay) * w;
  if (kV == SgdVariant::kPlainMomentum || (kAll && h.has_momentum)) {
    buf = (kAll && h.first_step) ? d : T(h.momentum) * buf + T(S(1) - h.dampening) * d;
    d = (kAll && h.nesterov) ? d + T(h.momentum) * buf : buf;
  }
  w = w - T(h.lr) * d;
  if (kAll && h.has_clamp_min) w = M::max_keep_nan(w, T(h.clamp_min));
  if (kAll && h.has_clamp_max) w = M::min_keep_nan(w, T(h.clamp_max));
  return w;
}

// One Path-SGD element update: the exact torch.optim.SGD update applied to
//   g_tilde = g / max(kappa^(2/p), eps)
// followed by the optional clamp. `kappa_pow` is kappa^(2/p).
template <SgdVariant kV = SgdVariant::kAll, typename T, typename S>
PATHSGD_HD T path_sgd_element(T w, T g, T& buf, T kappa_pow, const SgdParams<S>& h) {
  using M = MathOps<T>;
  if (kV == SgdVariant::kAll && h.maximize) g = T(S(0)) - g;
  return sgd_apply<kV>(w, g / M::max_keep_nan(kappa_pow, T(h.eps)), buf, h);
}

// kappa_ij^(2/p) = exp(log_row_i + log_col_j) is applied as row_i * col_j with
// row_i = exp(log_row_i + split) and col_j = exp(log_col_j - split). `split`
// centres both factor ranges. Rows/columns whose every product is below eps are
// ignored (max(kappa_pow, eps) is eps for them whether or not a factor underflows).
// If the factors still cannot stay within +-log_limit, `exact` asks for the
// per-element exp(log_row_i + log_col_j) path.
struct KappaSplit {
  double split = 0.0;
  bool exact = false;
};

PATHSGD_HD KappaSplit choose_kappa_split(double row_min, double row_max, double col_min, double col_max,
                                         double log_eps, double log_limit) {
  KappaSplit s;
  if (!(row_max > -INFINITY) || !(col_max > -INFINITY)) return s;  // kappa == 0 everywhere
  // Lower ends that matter: below them every product is < eps.
  const double row_lo = row_min > log_eps - col_max ? row_min : log_eps - col_max;
  const double col_lo = col_min > log_eps - row_max ? col_min : log_eps - row_max;
  s.split = 0.5 * ((col_max + col_lo) - (row_max + row_lo));
  s.exact = row_max + s.split > log_limit || row_lo + s.split < -log_limit || col_max - s.split > log_limit ||
            col_lo - s.split < -log_limit;
  return s;
}

}  // namespace pathsgd
