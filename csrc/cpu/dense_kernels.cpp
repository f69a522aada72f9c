// CPU kernels for dense (nn.Linear) layers: the forward gamma pass and the
// fused backward pass that accumulates gamma_out and applies the update.
#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_common.h"
#include "../dense_chain_step.h"

namespace pathsgd {
namespace {

using at::vec::Vectorized;

// Rescales y (whose true value is y * exp(log_scale), plus an optional addend
// at scale 1) to a vector with max in [1, 2]; returns the new log scale.
// The addend (|b|^p) is float64: a bias in range can have |b|^p out of float32 range.
// An all-zero result keeps log scale 0 so it stays an exact zero.
template <typename opmath_t>
double normalize_log_scaled(opmath_t* y, int64_t n, double log_scale, const double* addend) {
  double y_max = 0.0, add_max = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    y_max = std::max(y_max, static_cast<double>(y[i]));
    if (addend) add_max = std::max(add_max, static_cast<double>(addend[i]));
  }
  const double ninf = -std::numeric_limits<double>::infinity();
  const double log_y = y_max > 0 ? log_scale + std::log(y_max) : ninf;
  const double log_add = add_max > 0 ? std::log(add_max) : ninf;
  const double t = std::max(log_y, log_add);
  if (t == ninf) {
    for (int64_t i = 0; i < n; ++i) y[i] = opmath_t(0);
    return 0.0;
  }
  // y / y_max * exp(log_y - t): the factor is <= 1, so a tiny (subnormal) y_max cannot overflow it as
  // exp(log_scale - t) = exp(-log(y_max)) would (then inf * 0 = NaN further down the chain).
  const double y_factor = y_max > 0 ? std::exp(log_y - t) : 0.0;
  const double add_factor = add_max > 0 ? std::exp(log_add - t) : 0.0;
  const double inv_y = y_max > 0 ? y_max : 1.0, inv_add = add_max > 0 ? add_max : 1.0;
  for (int64_t i = 0; i < n; ++i) {
    y[i] = static_cast<opmath_t>(static_cast<double>(y[i]) / inv_y * y_factor +
                                 (addend ? addend[i] / inv_add * add_factor : 0.0));
  }
  return t;
}

template <typename scalar_t, PowKind kind>
void gamma_forward_kernel(const at::Tensor& weight, const at::Tensor* bias, const at::Tensor& gamma_in,
                          double in_log_scale, double p, at::Tensor& out, double& out_log_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const scalar_t* W = weight.const_data_ptr<scalar_t>();
  const opmath_t* x = gamma_in.const_data_ptr<opmath_t>();
  opmath_t* y = out.mutable_data_ptr<opmath_t>();
  const opmath_t pp = static_cast<opmath_t>(p);
  // Row-parallel dot products: each row is reduced by one thread in a fixed
  // order, so the result does not depend on the number of threads.
  at::parallel_for(0, rows, std::max<int64_t>(1, kElementGrain / std::max<int64_t>(cols, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const scalar_t* w = W + i * cols;
      int64_t j = 0;
      opmath_t sum = opmath_t(0);
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        using V = Vectorized<opmath_t>;
        constexpr int64_t kStep = 4 * V::size();
        // Four independent accumulators hide the add latency; their combination order is fixed.
        V acc0(opmath_t(0)), acc1(opmath_t(0)), acc2(opmath_t(0)), acc3(opmath_t(0));
        for (; j + kStep <= cols; j += kStep) {
          acc0 = acc0 + abs_pow(V::loadu(w + j), kind, pp) * V::loadu(x + j);
          acc1 = acc1 + abs_pow(V::loadu(w + j + V::size()), kind, pp) * V::loadu(x + j + V::size());
          acc2 = acc2 + abs_pow(V::loadu(w + j + 2 * V::size()), kind, pp) * V::loadu(x + j + 2 * V::size());
          acc3 = acc3 + abs_pow(V::loadu(w + j + 3 * V::size()), kind, pp) * V::loadu(x + j + 3 * V::size());
        }
        for (; j + V::size() <= cols; j += V::size()) {
          acc0 = acc0 + abs_pow(V::loadu(w + j), kind, pp) * V::loadu(x + j);
        }
        sum = at::vec::vec_reduce_all([](V a, V b) { return a + b; }, (acc0 + acc1) + (acc2 + acc3));
      }
      for (; j < cols; ++j) sum += abs_pow(static_cast<opmath_t>(w[j]), kind, pp) * x[j];
      y[i] = sum;
    }
  });
  std::vector<double> bias_pow;
  if (bias) {
    const at::Tensor b = bias->contiguous();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    bias_pow.resize(rows);
    for (int64_t i = 0; i < rows; ++i) bias_pow[i] = abs_pow(static_cast<double>(bp[i]), kind, p);
  }
  out_log_scale = normalize_log_scaled(y, rows, in_log_scale, bias ? bias_pow.data() : nullptr);
}

std::tuple<at::Tensor, at::Tensor> gamma_forward_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                     const at::Tensor& gamma_in, const at::Tensor& gamma_in_log_scale,
                                                     double p) {
  checks::gamma_forward_args(weight, bias, gamma_in, gamma_in_log_scale, p);
  const at::Tensor w = weight.contiguous();
  const at::Tensor x = gamma_in.contiguous();
  at::Tensor out = at::empty({weight.size(0)}, gamma_in.options());
  double out_log_scale = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gamma_forward_cpu", [&] {
    dispatch_pow_kind(pow_kind(p), [&](auto kind) {
      gamma_forward_kernel<scalar_t, kind.value>(w, bias.has_value() ? &*bias : nullptr, x,
                                                 gamma_in_log_scale.item<double>(), p, out, out_log_scale);
    });
  });
  return {out, at::scalar_tensor(out_log_scale, gamma_in_log_scale.options())};
}

// x^e in double for e = 2/p: exact products for p = 2 and p = 1, std::pow otherwise.
inline double pow_e(double x, double e) { return e == 1.0 ? x : e == 2.0 ? x * x : std::pow(x, e); }

// The smallest positive and the largest entry of a non-negative vector (NaN entries are
// skipped here and propagate through the update itself).
template <typename opmath_t>
std::pair<double, double> positive_range(const opmath_t* v, int64_t n) {
  double lo = INFINITY, hi = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(v[i]);
    if (x > 0.0) lo = std::min(lo, x), hi = std::max(hi, x);
  }
  return {lo, hi};
}

// kappa_ij^(2/p) of a dense layer as factors row_i * col_j (see choose_kappa_split),
// or, when no split keeps both in the opmath range, as exact per-element logs.
template <typename opmath_t>
struct KappaPowFactors {
  std::vector<opmath_t> row, col;
  // Reciprocals: 1 / max(row_i col_j, eps) = min(inv_row_i inv_col_j, 1/eps) turns the
  // per-element division into a multiplication (the fast path is compute-bound otherwise).
  std::vector<opmath_t> inv_row, inv_col;
  std::vector<double> log_row, log_col;  // per-element logs: only when the products below are not used
  bool exact = false;

  KappaPowFactors(const opmath_t* gamma_out, int64_t rows, const opmath_t* gamma_in, int64_t cols, double log_scale,
                  double p, double eps) {
    const double e = 2.0 / p;
    // log is increasing, so the range of e*log(gamma) needs only the smallest positive and the
    // largest gamma of each vector: four logs, not one per row and column (a Linear(4096, 1)
    // would otherwise spend more time in exp/log than in its update).
    const auto [gout_lo, gout_hi] = positive_range(gamma_out, rows);
    const auto [gin_lo, gin_hi] = positive_range(gamma_in, cols);
    // An all-zero vector gives the empty range (INFINITY, -INFINITY), as the per-element loop did.
    const double rmin = gout_hi > 0 ? e * std::log(gout_lo) : INFINITY;
    const double rmax = gout_hi > 0 ? e * std::log(gout_hi) : -INFINITY;
    const double cmin = gin_hi > 0 ? e * (std::log(gin_lo) + log_scale) : INFINITY;
    const double cmax = gin_hi > 0 ? e * (std::log(gin_hi) + log_scale) : -INFINITY;
    // Stay well inside the opmath range (float: e^80 ~ 5.5e34).
    const double limit = std::is_same_v<opmath_t, double> ? 700.0 : 80.0;
    const KappaSplit split = choose_kappa_split(rmin, rmax, cmin, cmax, eps > 0 ? std::log(eps) : -INFINITY, limit);
    exact = split.exact;
    // Factors as gamma^e times a constant, in double: safe while gamma^e and both constants stay
    // inside the double range (always for float parameters, whose gamma^e < 1e77).
    const double row_c = split.split, col_c = e * log_scale - split.split;
    const auto in_double_range = [&](double lo, double hi) {
      return hi <= 0 || (e * std::log(hi) < 700.0 && e * std::log(lo) > -700.0);
    };
    const bool products = !exact && std::abs(row_c) < 700.0 && std::abs(col_c) < 700.0 &&
                          in_double_range(gout_lo, gout_hi) && in_double_range(gin_lo, gin_hi);
    if (!products) {  // per-element logs (the exact path, or factors too far out for products)
      log_row.resize(rows);
      log_col.resize(cols);
      for (int64_t i = 0; i < rows; ++i) log_row[i] = e * std::log(static_cast<double>(gamma_out[i]));
      for (int64_t j = 0; j < cols; ++j) log_col[j] = e * (std::log(static_cast<double>(gamma_in[j])) + log_scale);
      if (exact) return;
    }
    row.resize(rows);
    col.resize(cols);
    inv_row.resize(rows);
    inv_col.resize(cols);
    if (products) {
      const double rs = std::exp(row_c), cs = std::exp(col_c);
      for (int64_t i = 0; i < rows; ++i) {
        const double r = pow_e(static_cast<double>(gamma_out[i]), e) * rs;
        row[i] = static_cast<opmath_t>(r);
        inv_row[i] = static_cast<opmath_t>(1.0 / r);
      }
      for (int64_t j = 0; j < cols; ++j) {
        const double c = pow_e(static_cast<double>(gamma_in[j]), e) * cs;
        col[j] = static_cast<opmath_t>(c);
        inv_col[j] = static_cast<opmath_t>(1.0 / c);
      }
      return;
    }
    for (int64_t i = 0; i < rows; ++i) {
      row[i] = static_cast<opmath_t>(std::exp(log_row[i] + split.split));
      inv_row[i] = static_cast<opmath_t>(std::exp(-(log_row[i] + split.split)));
    }
    for (int64_t j = 0; j < cols; ++j) {
      col[j] = static_cast<opmath_t>(std::exp(log_col[j] - split.split));
      inv_col[j] = static_cast<opmath_t>(std::exp(split.split - log_col[j]));
    }
  }
};

// One block (rows [i0, i1), columns [j0, j1)) of the fused pass: y[j] = sum over the
// block's rows, in row order, of |W_ij|^p gamma_out_i, and the update of the block.
// kKind and kV are compile-time so the inner loop has no per-vector branches.
template <typename scalar_t, bool kUpdate, PowKind kKind, SgdVariant kV>
void dense_block(int64_t i0, int64_t i1, int64_t cols, int64_t j0, int64_t j1, scalar_t* W, const scalar_t* G,
                        scalar_t* B, const at::opmath_type<scalar_t>* gout,
                        const KappaPowFactors<at::opmath_type<scalar_t>>* kappa, at::opmath_type<scalar_t>* y,
                        at::opmath_type<scalar_t> p, const SgdParams<at::opmath_type<scalar_t>>& h_in) {
  using opmath_t = at::opmath_type<scalar_t>;
  // A local copy: stores through W could alias the fields of h_in, which would force
  // the compiler to reload every hyper-parameter for every vector.
  const SgdParams<opmath_t> h = h_in;
  const bool exact = kUpdate && kappa->exact;
  const opmath_t inv_eps_s = opmath_t(1) / h.eps;  // inf when eps == 0, like g / 0
  // Largest 1/col factor of the block: rows where inv_row * max_inv_col <= 1/eps
  // never reach the eps bound and skip that min.
  opmath_t max_inv_col = opmath_t(0);
  if (kUpdate && !exact) {
    for (int64_t j = j0; j < j1; ++j) max_inv_col = std::max(max_inv_col, kappa->inv_col[j]);
  }
  for (int64_t j = j0; j < j1; ++j) y[j] = opmath_t(0);
  for (int64_t i = i0; i < i1; ++i) {
    scalar_t* w = W + i * cols;
    const scalar_t* g = kUpdate ? G + i * cols : nullptr;
    scalar_t* b = (kUpdate && h.has_momentum) ? B + i * cols : nullptr;
    const opmath_t go = gout[i];
    const opmath_t rs = (kUpdate && !exact) ? kappa->row[i] : opmath_t(0);
    const opmath_t* cs = (kUpdate && !exact) ? kappa->col.data() : nullptr;
    int64_t j = j0;
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      using V = Vectorized<opmath_t>;
      using M = MathOps<V>;
      const V vgo(go);
      const opmath_t ir = (kUpdate && !exact) ? kappa->inv_row[i] : opmath_t(0);
      const V vir(ir);
      const V inv_eps(inv_eps_s);
      // NaN-safe: a NaN product fails the test and takes the min path.
      const bool bounded = kUpdate && !exact && ir * max_inv_col <= inv_eps_s;
      const opmath_t* ics = (kUpdate && !exact) ? kappa->inv_col.data() : nullptr;
      // One loop per (bounded) value, with restrict pointers: the stores to y and w never alias the
      // loads, so the compiler may keep several iterations in flight.
      const auto vector_loop = [&](auto bounded_tag) {
        constexpr bool kBounded = decltype(bounded_tag)::value;
        scalar_t* __restrict__ wr = w;
        const scalar_t* __restrict__ gr = g;
        scalar_t* __restrict__ br = b;
        opmath_t* __restrict__ yr = y;
        const opmath_t* __restrict__ icr = ics;
        for (; j + V::size() <= j1; j += V::size()) {
          const V wv = V::loadu(wr + j);
          (V::loadu(yr + j) + abs_pow(wv, kKind, p) * vgo).store(yr + j);
          if constexpr (kUpdate) {
            V bv = (kV == SgdVariant::kPlainMomentum || (kV == SgdVariant::kAll && br)) ? V::loadu(br + j)
                                                                                       : V(opmath_t(0));
            V gv = V::loadu(gr + j);
            if (kV == SgdVariant::kAll && h.maximize) gv = V(opmath_t(0)) - gv;
            const V scale = vir * V::loadu(icr + j);
            sgd_apply<kV>(wv, gv * (kBounded ? scale : M::min_keep_nan(scale, inv_eps)), bv, h).store(wr + j);
            if (kV == SgdVariant::kPlainMomentum || (kV == SgdVariant::kAll && br)) bv.store(br + j);
          }
        }
      };
      if (!exact) {
        if (bounded) {
          vector_loop(std::true_type{});
        } else {
          vector_loop(std::false_type{});
        }
      }
    }
    for (; j < j1; ++j) {
      const opmath_t wv = static_cast<opmath_t>(w[j]);
      y[j] += abs_pow(wv, kKind, p) * go;
      if constexpr (kUpdate) {
        const opmath_t kp = exact ? static_cast<opmath_t>(std::exp(kappa->log_row[i] + kappa->log_col[j])) : rs * cs[j];
        opmath_t bv = b ? static_cast<opmath_t>(b[j]) : opmath_t(0);
        w[j] = static_cast<scalar_t>(path_sgd_element<kV>(wv, static_cast<opmath_t>(g[j]), bv, kp, h));
        if (b) b[j] = static_cast<scalar_t>(bv);
      }
    }
  }
}

// Row blocks of the fused pass: about kElementGrain elements each, at most kMaxRowBlocks
// (the partial sums take blocks x cols floats: O(neurons)).
constexpr int64_t kMaxRowBlocks = 16;

int64_t row_block_count(int64_t rows, int64_t cols) {
  const int64_t by_size = (rows * cols + kElementGrain - 1) / kElementGrain;
  return std::max<int64_t>(1, std::min({by_size, kMaxRowBlocks, rows}));
}

std::tuple<at::Tensor, at::Tensor> fused_dense_step_cpu(
    at::Tensor& weight, const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& momentum_buffer,
    const at::Tensor& gamma_in, const at::Tensor& gamma_in_log_scale, const at::Tensor& gamma_out,
    const at::Tensor& gamma_out_log_scale, double p, at::ArrayRef<double> sgd,
    const std::optional<at::Tensor>& lr_tensor) {
  const SgdArgs a = checks::sgd_args(sgd, "fused_dense_step_");
  checks::fused_dense_step_args(weight, grad, momentum_buffer, gamma_in, gamma_in_log_scale, gamma_out,
                                gamma_out_log_scale, p, a.momentum);
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const bool update = grad.has_value();
  const bool use_buffer = update && a.momentum != 0.0;
  const at::Tensor gin = gamma_in.contiguous();
  const at::Tensor gout = gamma_out.contiguous();
  at::Tensor y = at::empty({cols}, gamma_in.options());
  const at::Tensor g = update ? grad->contiguous() : at::Tensor();
  double out_log_scale = 0.0;
  with_contiguous(weight, [&](const at::Tensor& w) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fused_dense_step_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const opmath_t* go = gout.const_data_ptr<opmath_t>();
      const opmath_t* gi = gin.const_data_ptr<opmath_t>();
      std::optional<KappaPowFactors<opmath_t>> kappa;
      SgdParams<opmath_t> h;
      if (update) {
        h = make_sgd_params<opmath_t>(a, lr_tensor);
        kappa.emplace(go, rows, gi, cols, gamma_in_log_scale.item<double>() + gamma_out_log_scale.item<double>(), p,
                      a.eps);
      }
      scalar_t* W = w.mutable_data_ptr<scalar_t>();
      const scalar_t* G = update ? g.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* B = use_buffer ? momentum_buffer->mutable_data_ptr<scalar_t>() : nullptr;
      opmath_t* Y = y.mutable_data_ptr<opmath_t>();
      const opmath_t pp = static_cast<opmath_t>(p);
      // Row blocks, each streaming its rows of W (and grad, buffer) front to back into its
      // own partial column sums; the partials are then added in block order. The blocks
      // depend only on the shape, so the sums do not depend on the thread count.
      const int64_t blocks = row_block_count(rows, cols);
      const int64_t block_rows = (rows + blocks - 1) / blocks;
      std::vector<opmath_t> partial(blocks > 1 ? blocks * cols : 0);
      dispatch_pow_kind(pow_kind(p), [&](auto kind) {
        const auto run = [&](auto update_tag, auto variant) {
          at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b) {
              dense_block<scalar_t, decltype(update_tag)::value, kind.value, variant.value>(
                  b * block_rows, std::min(rows, (b + 1) * block_rows), cols, 0, cols, W, G, B, go,
                  update ? &*kappa : nullptr, blocks > 1 ? partial.data() + b * cols : Y, pp, h);
            }
          });
          if (blocks > 1) {
            at::parallel_for(0, cols, kElementGrain, [&](int64_t j0, int64_t j1) {
              for (int64_t j = j0; j < j1; ++j) {
                opmath_t sum = partial[j];
                for (int64_t b = 1; b < blocks; ++b) sum += partial[b * cols + j];
                Y[j] = sum;
              }
            });
          }
        };
        if (!update) return run(std::false_type{}, std::integral_constant<SgdVariant, SgdVariant::kAll>{});
        dispatch_sgd_variant(h, [&](auto variant) { run(std::true_type{}, variant); });
      });
      out_log_scale = normalize_log_scaled(Y, cols, gamma_out_log_scale.item<double>(), static_cast<const double*>(nullptr));
    });
  });
  return {y, at::scalar_tensor(out_log_scale, gamma_out_log_scale.options())};
}


// The whole dense chain in one call (csrc/dense_chain_step.h) over this file's kernels.
std::tuple<at::Tensor, at::Tensor> dense_chain_step_cpu(
    at::TensorList weights, at::TensorList weight_grads, at::TensorList weight_buffers, at::TensorList biases,
    at::TensorList bias_grads, at::TensorList bias_buffers, at::IntArrayRef bias_layers,
    const std::optional<at::Tensor>& gamma0, const std::optional<at::Tensor>& gamma0_log_scale, double p,
    at::ArrayRef<double> sgd, const std::optional<at::Tensor>& lr_tensor) {
  return dense_chain_step(weights, weight_grads, weight_buffers, biases, bias_grads, bias_buffers, bias_layers,
                          gamma0, gamma0_log_scale, p, sgd, lr_tensor, gamma_forward_cpu, fused_dense_step_cpu,
                          scaled_sgd_update_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsgd, CPU, m) {
  m.impl("gamma_forward", &gamma_forward_cpu);
  m.impl("fused_dense_step_", &fused_dense_step_cpu);
  m.impl("dense_chain_step_", &dense_chain_step_cpu);
}

}  // namespace pathsgd
