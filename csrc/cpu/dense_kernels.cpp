// CPU kernels for dense (nn.Linear) layers: the forward gamma pass and the
// fused backward pass that accumulates gamma_out and applies the update.
#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_common.h"
#include "../dense_chain_step.h"
#include "../trunk_chain_step.h"

namespace pathsgd {
namespace {

using at::vec::Vectorized;

// The largest of init and v[0..n), NaN entries skipped: std::max(acc, v[i]) in any order (SIMD lanes).
template <typename T>
T max_skip_nan(const T* v, int64_t n, T init) {
  using V = Vectorized<T>;
  V acc(init);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    const V x = V::loadu(v + i);
    acc = V::blendv(acc, x, acc < x);
  }
  T lanes[V::size()];
  acc.store(lanes);
  T out = init;
  for (int64_t k = 0; k < V::size(); ++k) out = std::max(out, lanes[k]);
  for (; i < n; ++i) out = std::max(out, v[i]);
  return out;
}

// Rescales y (whose true value is y * exp(log_scale), plus an optional addend
// at scale 1) to a vector with max in [1, 2]; returns the new log scale.
// The addend (|b|^p) is float64: a bias in range can have |b|^p out of float32 range.
// An all-zero result keeps log scale 0 so it stays an exact zero.
template <typename opmath_t>
double normalize_log_scaled(opmath_t* y, int64_t n, double log_scale, const double* addend) {
  const double y_max = static_cast<double>(max_skip_nan(y, n, opmath_t(0)));
  const double add_max = addend ? max_skip_nan(addend, n, 0.0) : 0.0;
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
  if (addend) {
    for (int64_t i = 0; i < n; ++i) {
      y[i] = static_cast<opmath_t>(static_cast<double>(y[i]) / inv_y * y_factor + addend[i] / inv_add * add_factor);
    }
  } else {  // the same formula with a zero addend
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<opmath_t>(static_cast<double>(y[i]) / inv_y * y_factor + 0.0);
  }
  return t;
}

// y = |W|^p x (+ |b|^p) normalized (normalize_log_scaled); returns y's log scale. W (and b) contiguous.
template <typename scalar_t, PowKind kind>
double gamma_forward_core(const scalar_t* W, int64_t rows, int64_t cols, const scalar_t* bias,
                          const at::opmath_type<scalar_t>* x, double in_log_scale, double p,
                          at::opmath_type<scalar_t>* y) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t pp = static_cast<opmath_t>(p);
  // Row-parallel dot products: each row is reduced by one thread in a fixed
  // order, so the result does not depend on the number of threads.
  at::parallel_for(0, rows, std::max<int64_t>(1, kElementGrain / std::max<int64_t>(cols, 1)),
                   [&](int64_t r0, int64_t r1) {
    int64_t i = r0;
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      using V = Vectorized<opmath_t>;
      constexpr int64_t kStep = 4 * V::size();
      // kR rows at a time, each with four independent accumulators (they hide the add latency; their
      // combination order is fixed, the same for every kR): kR streams of W in flight, where one
      // row's stream left this pass at half the read bandwidth of the fused pass on a VM.
      const auto rows_at = [&](auto rows_tag) {
        constexpr int kR = decltype(rows_tag)::value;
        const scalar_t* w[kR];
        V acc[kR][4];
        for (int r = 0; r < kR; ++r) {
          w[r] = W + (i + r) * cols;
          for (int a = 0; a < 4; ++a) acc[r][a] = V(opmath_t(0));
        }
        int64_t j = 0;
        for (; j + kStep <= cols; j += kStep) {
          const V x0 = V::loadu(x + j), x1 = V::loadu(x + j + V::size()), x2 = V::loadu(x + j + 2 * V::size()),
                  x3 = V::loadu(x + j + 3 * V::size());
          for (int r = 0; r < kR; ++r) {
            acc[r][0] = acc[r][0] + abs_pow(V::loadu(w[r] + j), kind, pp) * x0;
            acc[r][1] = acc[r][1] + abs_pow(V::loadu(w[r] + j + V::size()), kind, pp) * x1;
            acc[r][2] = acc[r][2] + abs_pow(V::loadu(w[r] + j + 2 * V::size()), kind, pp) * x2;
            acc[r][3] = acc[r][3] + abs_pow(V::loadu(w[r] + j + 3 * V::size()), kind, pp) * x3;
          }
        }
        for (; j + V::size() <= cols; j += V::size()) {
          const V xv = V::loadu(x + j);
          for (int r = 0; r < kR; ++r) acc[r][0] = acc[r][0] + abs_pow(V::loadu(w[r] + j), kind, pp) * xv;
        }
        if (j < cols) {  // the last cols - j < V::size() elements, zero-padded (|0|^p * 0 adds nothing)
          const V xv = V::loadu(x + j, cols - j);
          for (int r = 0; r < kR; ++r) acc[r][1] = acc[r][1] + abs_pow(V::loadu(w[r] + j, cols - j), kind, pp) * xv;
        }
        for (int r = 0; r < kR; ++r) {
          y[i + r] = at::vec::vec_reduce_all([](V a, V b) { return a + b; },
                                             (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]));
        }
        i += kR;
      };
      while (i + 4 <= r1) rows_at(std::integral_constant<int, 4>{});
      while (i < r1) rows_at(std::integral_constant<int, 1>{});
    }
    for (; i < r1; ++i) {  // half and bfloat16 storage: one element at a time
      const scalar_t* w = W + i * cols;
      opmath_t sum = opmath_t(0);
      for (int64_t j = 0; j < cols; ++j) sum += abs_pow(static_cast<opmath_t>(w[j]), kind, pp) * x[j];
      y[i] = sum;
    }
  });
  std::vector<double> bias_pow;
  if (bias) {
    bias_pow.resize(rows);
    for (int64_t i = 0; i < rows; ++i) bias_pow[i] = abs_pow(static_cast<double>(bias[i]), kind, p);
  }
  return normalize_log_scaled(y, rows, in_log_scale, bias ? bias_pow.data() : nullptr);
}

template <typename scalar_t>
double gamma_forward_dispatch(const scalar_t* W, int64_t rows, int64_t cols, const scalar_t* bias,
                              const at::opmath_type<scalar_t>* x, double in_log_scale, double p,
                              at::opmath_type<scalar_t>* y) {
  double out = 0.0;
  dispatch_pow_kind(pow_kind(p), [&](auto kind) {
    out = gamma_forward_core<scalar_t, kind.value>(W, rows, cols, bias, x, in_log_scale, p, y);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gamma_forward_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                     const at::Tensor& gamma_in, const at::Tensor& gamma_in_log_scale,
                                                     double p) {
  checks::gamma_forward_args(weight, bias, gamma_in, gamma_in_log_scale, p);
  const at::Tensor w = weight.contiguous();
  const at::Tensor x = gamma_in.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({weight.size(0)}, gamma_in.options());
  double out_log_scale = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gamma_forward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    out_log_scale = gamma_forward_dispatch<scalar_t>(
        w.const_data_ptr<scalar_t>(), w.size(0), w.size(1), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
        x.const_data_ptr<opmath_t>(), gamma_in_log_scale.item<double>(), p, out.mutable_data_ptr<opmath_t>());
  });
  return {out, at::scalar_tensor(out_log_scale, gamma_in_log_scale.options())};
}

// The smallest positive and the largest entry of a non-negative vector (NaN entries are
// skipped here and propagate through the update itself).
template <typename opmath_t>
std::pair<double, double> positive_range(const opmath_t* v, int64_t n) {
  using V = Vectorized<opmath_t>;
  const V zero(opmath_t(0));
  V lo(std::numeric_limits<opmath_t>::infinity()), hi(opmath_t(0));
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    const V x = V::loadu(v + i);
    lo = V::blendv(lo, x, (x > zero) & (x < lo));
    hi = V::blendv(hi, x, hi < x);
  }
  opmath_t lo_lanes[V::size()], hi_lanes[V::size()];
  lo.store(lo_lanes);
  hi.store(hi_lanes);
  double out_lo = INFINITY, out_hi = 0.0;
  for (int64_t k = 0; k < V::size(); ++k) {  // lanes without a positive entry hold lo = inf, hi = 0
    out_lo = std::min(out_lo, static_cast<double>(lo_lanes[k]));
    out_hi = std::max(out_hi, static_cast<double>(hi_lanes[k]));
  }
  for (; i < n; ++i) {
    const double x = static_cast<double>(v[i]);
    if (x > 0.0) out_lo = std::min(out_lo, x), out_hi = std::max(out_hi, x);
  }
  return {out_lo, out_hi};
}

// factor[i] = gamma[i]^e * c and inv[i] = 1 / (gamma[i]^e * c), formed in double and rounded to
// opmath; one loop per exponent so the common ones (e = 1, 2) run on SIMD lanes.
template <typename opmath_t>
void fill_factors(const opmath_t* gamma, int64_t n, double e, double c, opmath_t* factor, opmath_t* inv) {
  const auto fill = [&](auto pow) {
    for (int64_t i = 0; i < n; ++i) {
      const double r = pow(static_cast<double>(gamma[i])) * c;
      factor[i] = static_cast<opmath_t>(r);
      inv[i] = static_cast<opmath_t>(1.0 / r);
    }
  };
  if (e == 1.0) return fill([](double x) { return x; });
  if (e == 2.0) return fill([](double x) { return x * x; });
  fill([e](double x) { return std::pow(x, e); });
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
  opmath_t max_inv_col = opmath_t(0);     // the largest inv_col (NaN entries skipped)
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
      fill_factors(gamma_out, rows, e, std::exp(row_c), row.data(), inv_row.data());
      fill_factors(gamma_in, cols, e, std::exp(col_c), col.data(), inv_col.data());
      set_max_inv_col();
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
    set_max_inv_col();
  }

  void set_max_inv_col() { max_inv_col = max_skip_nan(inv_col.data(), static_cast<int64_t>(inv_col.size()), opmath_t(0)); }
};

// Rows [i0, i1) of the fused pass: y[j] = sum over these rows, in row order, of |W_ij|^p gamma_out_i,
// and the update of the rows. kKind and kV are compile-time so the inner loops have no per-vector
// branches. y null: the update only (the first layer of a whole-model chain: nobody needs the
// gamma_out of the model input); in the vectorized path that skips the sums, else they go to a
// scratch row.
template <typename scalar_t, bool kUpdate, PowKind kKind, SgdVariant kV>
void dense_block(int64_t i0, int64_t i1, int64_t cols, scalar_t* W, const scalar_t* G, scalar_t* B,
                 const at::opmath_type<scalar_t>* gout, const KappaPowFactors<at::opmath_type<scalar_t>>* kappa,
                 at::opmath_type<scalar_t>* y, at::opmath_type<scalar_t> p,
                 const SgdParams<at::opmath_type<scalar_t>>& h_in) {
  using opmath_t = at::opmath_type<scalar_t>;
  // A local copy: stores through W could alias the fields of h_in, which would force
  // the compiler to reload every hyper-parameter for every vector.
  const SgdParams<opmath_t> h = h_in;
  const bool exact = kUpdate && kappa->exact;
  const bool buffered = kUpdate && h.has_momentum;
  const opmath_t inv_eps_s = opmath_t(1) / h.eps;  // inf when eps == 0, like g / 0
  const bool sums = y != nullptr;
  std::vector<opmath_t> scratch;
  if (!sums && !(std::is_same_v<scalar_t, opmath_t> && !exact)) {
    scratch.resize(cols);  // the element-wise path below always accumulates
    y = scratch.data();
  }
  if (y != nullptr) std::fill(y, y + cols, opmath_t(0));
  int64_t i = i0;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    using V = Vectorized<opmath_t>;
    using M = MathOps<V>;
    constexpr bool kBuffer = kV == SgdVariant::kPlainMomentum;  // kAll reads `buffered` at run time
    // kR rows at a time: the partial sums y and the column factors are loaded and y stored once per
    // kR rows (per row otherwise), and y still gets the rows' terms one by one in row order.
    const auto rows_at = [&](auto rows_tag, auto bounded_tag, auto sums_tag) {
      constexpr int kR = decltype(rows_tag)::value;
      constexpr bool kBounded = decltype(bounded_tag)::value;
      constexpr bool kSums = decltype(sums_tag)::value;
      scalar_t* w[kR];
      const scalar_t* g[kR];
      scalar_t* b[kR];
      V vgo[kR], vir[kR];
      for (int r = 0; r < kR; ++r) {
        w[r] = W + (i + r) * cols;
        g[r] = kUpdate ? G + (i + r) * cols : nullptr;
        b[r] = buffered ? B + (i + r) * cols : nullptr;
        vgo[r] = V(gout[i + r]);
        vir[r] = V(kUpdate ? kappa->inv_row[i + r] : opmath_t(0));
      }
      const V inv_eps(inv_eps_s);
      const opmath_t* ics = kUpdate ? kappa->inv_col.data() : nullptr;
      // n = V::size() lanes, or the rows' last n < V::size() elements (masked loads and stores:
      // a narrow layer's rows would otherwise spend most of their time in a scalar loop).
      const auto lanes = [&](int64_t j, int64_t n) {
        V yv = kSums ? V::loadu(y + j, n) : V(opmath_t(0));
        const V ic = kUpdate ? V::loadu(ics + j, n) : V(opmath_t(0));
        for (int r = 0; r < kR; ++r) {
          const V wv = V::loadu(w[r] + j, n);
          if constexpr (kSums) yv = yv + abs_pow(wv, kKind, p) * vgo[r];
          if constexpr (kUpdate) {
            const bool with_buffer = kBuffer || (kV == SgdVariant::kAll && buffered);
            V bv = with_buffer ? V::loadu(b[r] + j, n) : V(opmath_t(0));
            V gv = V::loadu(g[r] + j, n);
            if (kV == SgdVariant::kAll && h.maximize) gv = V(opmath_t(0)) - gv;
            const V scale = vir[r] * ic;
            sgd_apply<kV>(wv, gv * (kBounded ? scale : M::min_keep_nan(scale, inv_eps)), bv, h).store(w[r] + j, n);
            if (with_buffer) bv.store(b[r] + j, n);
          }
        }
        if constexpr (kSums) yv.store(y + j, n);
      };
      int64_t j = 0;
      for (; j + V::size() <= cols; j += V::size()) lanes(j, V::size());
      if (j < cols) lanes(j, cols - j);
    };
    // Rows where inv_row * max_inv_col <= 1/eps never reach the eps bound and skip that min (the same
    // values: the min is the identity there). NaN-safe: a NaN product fails the test.
    const auto bounded = [&](int64_t r0, int64_t r1) {
      if (!kUpdate) return true;
      for (int64_t r = r0; r < r1; ++r) {
        if (!(kappa->inv_row[r] * kappa->max_inv_col <= inv_eps_s)) return false;
      }
      return true;
    };
    const auto with_sums = [&](auto rows_tag, auto bounded_tag) {
      if (!kUpdate || sums) {
        rows_at(rows_tag, bounded_tag, std::true_type{});
      } else if constexpr (kUpdate) {
        rows_at(rows_tag, bounded_tag, std::false_type{});
      }
    };
    const auto run = [&](auto rows_tag) {
      constexpr int kR = decltype(rows_tag)::value;
      if (bounded(i, i + kR)) {
        with_sums(rows_tag, std::true_type{});
      } else {
        with_sums(rows_tag, std::false_type{});
      }
      i += kR;
    };
    if (!exact) {
      while (i + 4 <= i1) run(std::integral_constant<int, 4>{});
      while (i < i1) run(std::integral_constant<int, 1>{});
    }
  }
  // Half/bfloat16 storage and the exact (per-element exp) kappa path: one element at a time.
  for (; i < i1; ++i) {
    scalar_t* w = W + i * cols;
    const scalar_t* g = kUpdate ? G + i * cols : nullptr;
    scalar_t* b = buffered ? B + i * cols : nullptr;
    const opmath_t go = gout[i];
    for (int64_t j = 0; j < cols; ++j) {
      const opmath_t wv = static_cast<opmath_t>(w[j]);
      y[j] += abs_pow(wv, kKind, p) * go;
      if constexpr (kUpdate) {
        const opmath_t kp = exact ? static_cast<opmath_t>(std::exp(kappa->log_row[i] + kappa->log_col[j]))
                                  : kappa->row[i] * kappa->col[j];
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

// More than one block: a multiple of 4, so 2 or 4 threads get equal shares (the count depends on the
// shape only, never on the thread count: the sums do not either).
int64_t row_block_count(int64_t rows, int64_t cols) {
  int64_t blocks = (rows * cols + kElementGrain - 1) / kElementGrain;
  if (blocks > 1) blocks = (blocks + 3) / 4 * 4;
  return std::max<int64_t>(1, std::min({blocks, kMaxRowBlocks, rows}));
}

// The fused pass of one layer over contiguous data: Y = |W_old|^pT gout normalized (returns its log
// scale) and, when G is given, the update with kappa_ij = gout_i gin_j (B: the momentum buffer or null).
// Y null (with G): the update only, no sums (returns 0).
template <typename scalar_t>
double fused_dense_core(scalar_t* W, const scalar_t* G, scalar_t* B, int64_t rows, int64_t cols,
                        const at::opmath_type<scalar_t>* gi, double gin_log_scale,
                        const at::opmath_type<scalar_t>* go, double gout_log_scale, double p, const SgdArgs& a,
                        double lr, at::opmath_type<scalar_t>* Y) {
  using opmath_t = at::opmath_type<scalar_t>;
  const bool update = G != nullptr;
  std::optional<KappaPowFactors<opmath_t>> kappa;
  SgdParams<opmath_t> h;
  if (update) {
    h = make_sgd_params<opmath_t>(a, lr);
    kappa.emplace(go, rows, gi, cols, gin_log_scale + gout_log_scale, p, a.eps);
  }
  const opmath_t pp = static_cast<opmath_t>(p);
  // Row blocks, each streaming its rows of W (and grad, buffer) front to back into its
  // own partial column sums; the partials are then added in block order. The blocks
  // depend only on the shape, so the sums do not depend on the thread count.
  const bool sums = Y != nullptr || !update;
  const int64_t blocks = row_block_count(rows, cols);
  const int64_t block_rows = (rows + blocks - 1) / blocks;
  std::vector<opmath_t> partial(blocks > 1 && sums ? blocks * cols : 0);
  dispatch_pow_kind(pow_kind(p), [&](auto kind) {
    const auto run = [&](auto update_tag, auto variant) {
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          dense_block<scalar_t, decltype(update_tag)::value, kind.value, variant.value>(
              b * block_rows, std::min(rows, (b + 1) * block_rows), cols, W, G, B, go,
              update ? &*kappa : nullptr, !sums ? nullptr : blocks > 1 ? partial.data() + b * cols : Y, pp, h);
        }
      });
      if (blocks > 1 && sums) {  // Y[j] = partial_0[j] + partial_1[j] + ... in block order
        at::parallel_for(0, cols, kElementGrain, [&](int64_t j0, int64_t j1) {
          std::copy(partial.begin() + j0, partial.begin() + j1, Y + j0);
          for (int64_t b = 1; b < blocks; ++b) {
            const opmath_t* part = partial.data() + b * cols;
            for (int64_t j = j0; j < j1; ++j) Y[j] += part[j];
          }
        });
      }
    };
    if (!update) return run(std::false_type{}, std::integral_constant<SgdVariant, SgdVariant::kAll>{});
    dispatch_sgd_variant(h, [&](auto variant) { run(std::true_type{}, variant); });
  });
  return sums ? normalize_log_scaled(Y, cols, gout_log_scale, static_cast<const double*>(nullptr)) : 0.0;
}

std::tuple<at::Tensor, at::Tensor> fused_dense_step_cpu(
    at::Tensor& weight, const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& momentum_buffer,
    const at::Tensor& gamma_in, const at::Tensor& gamma_in_log_scale, const at::Tensor& gamma_out,
    const at::Tensor& gamma_out_log_scale, double p, at::ArrayRef<double> sgd,
    const std::optional<at::Tensor>& lr_tensor) {
  const SgdArgs a = checks::sgd_args(sgd, "fused_dense_step_");
  checks::fused_dense_step_args(weight, grad, momentum_buffer, gamma_in, gamma_in_log_scale, gamma_out,
                                gamma_out_log_scale, p, a.momentum);
  const bool update = grad.has_value();
  const bool use_buffer = update && a.momentum != 0.0;
  const at::Tensor gin = gamma_in.contiguous();
  const at::Tensor gout = gamma_out.contiguous();
  at::Tensor y = at::empty({weight.size(1)}, gamma_in.options());
  const at::Tensor g = update ? grad->contiguous() : at::Tensor();
  const double lr = update && lr_tensor.has_value() ? lr_tensor->item<double>() : a.lr;
  const double gin_log_scale = gamma_in_log_scale.item<double>();
  const double gout_log_scale = gamma_out_log_scale.item<double>();
  double out_log_scale = 0.0;
  with_contiguous(weight, [&](const at::Tensor& w) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fused_dense_step_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      out_log_scale = fused_dense_core<scalar_t>(
          w.mutable_data_ptr<scalar_t>(), update ? g.const_data_ptr<scalar_t>() : nullptr,
          use_buffer ? momentum_buffer->mutable_data_ptr<scalar_t>() : nullptr, w.size(0), w.size(1),
          gin.const_data_ptr<opmath_t>(), gin_log_scale, gout.const_data_ptr<opmath_t>(), gout_log_scale, p, a, lr,
          y.mutable_data_ptr<opmath_t>());
    });
  });
  return {y, at::scalar_tensor(out_log_scale, gamma_out_log_scale.options())};
}

// A gamma vector of the chain on the host, in one layer's opmath type (float or double), with its
// log scale: the chain's small vectors are plain host buffers, not tensors (no allocator or
// dispatcher call per layer).
struct HostGamma {
  at::ScalarType type = at::kFloat;
  std::vector<float> f;
  std::vector<double> d;
  double log_scale = 0.0;

  HostGamma(at::ScalarType t, int64_t n, double fill) : type(t) {
    if (t == at::kDouble) d.assign(n, fill); else f.assign(n, static_cast<float>(fill));
  }
  int64_t size() const { return type == at::kDouble ? static_cast<int64_t>(d.size()) : static_cast<int64_t>(f.size()); }
  template <typename T> T* data() {
    if constexpr (std::is_same_v<T, double>) return d.data(); else return f.data();
  }
  double at(int64_t i) const { return type == at::kDouble ? d[i] : static_cast<double>(f[i]); }
  // The values in opmath type t (what `gamma.to(opmath)` does between layers of different dtypes).
  HostGamma& as(at::ScalarType t) {
    if (t == type) return *this;
    if (t == at::kDouble) {
      d.assign(f.begin(), f.end());
      f.clear();
    } else {
      f.resize(d.size());
      for (size_t i = 0; i < d.size(); ++i) f[i] = static_cast<float>(d[i]);
      d.clear();
    }
    type = t;
    return *this;
  }
};

// The chain (csrc/dense_chain_step.h) on the host: gammas and log scales in host buffers, the
// hyper-parameters unpacked and lr read once, this file's kernel cores on contiguous data.
struct HostChain {
  using Gamma = HostGamma;

  at::TensorList weights, weight_grads, weight_buffers, biases, bias_grads, bias_buffers;
  const std::optional<at::Tensor>& gamma0;  // float64 values (see csrc/dense_chain_step.h)
  double p;
  SgdArgs a;
  double lr;
  std::vector<at::Tensor> w, b, bias_of;  // contiguous weights and biases (bias_of: by layer)
  std::vector<std::vector<double>> bias_kappas;

  at::ScalarType opmath_of(int64_t l) const { return at::toOpMathType(weights[l].scalar_type()); }

  Gamma input_gamma() {
    if (!gamma0.has_value()) return HostGamma(opmath_of(0), weights[0].size(1), 1.0);
    const at::Tensor g0 = gamma0->contiguous();
    const double* x = g0.const_data_ptr<double>();
    const int64_t n = g0.numel();
    // amax (NaN propagates), then clamp_min(tiny): an all-zero vector stays zero.
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i) top = std::isnan(x[i]) || std::isnan(top) ? NAN : std::max(top, x[i]);
    const double scale = std::isnan(top) ? top : std::max(top, std::numeric_limits<double>::min());
    HostGamma g(opmath_of(0), n, 0.0);
    AT_DISPATCH_FLOATING_TYPES(g.type, "dense_chain_step_cpu", [&] {
      scalar_t* v = g.data<scalar_t>();
      for (int64_t i = 0; i < n; ++i) v[i] = static_cast<scalar_t>(x[i] / scale);
    });
    g.log_scale = std::log(scale);
    return g;
  }
  Gamma output_gamma() {
    const int64_t last = static_cast<int64_t>(weights.size()) - 1;
    return HostGamma(opmath_of(last), weights[last].size(0), 1.0);
  }
  Gamma forward(int64_t l, Gamma& gin) {
    HostGamma& x = gin.as(opmath_of(l));
    HostGamma y(opmath_of(l), weights[l].size(0), 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[l].scalar_type(), "dense_chain_step_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      y.log_scale = gamma_forward_dispatch<scalar_t>(
          w[l].const_data_ptr<scalar_t>(), weights[l].size(0), weights[l].size(1),
          bias_of[l].defined() ? bias_of[l].const_data_ptr<scalar_t>() : nullptr, x.data<opmath_t>(), x.log_scale, p,
          y.data<opmath_t>());
    });
    return y;
  }
  // gamma_out * exp(log scale) in float64 (exp on the host, by the C library).
  void bias_kappa(size_t k, const Gamma& gout) {
    const double scale = std::exp(gout.log_scale);
    bias_kappas[k].resize(gout.size());
    for (int64_t i = 0; i < gout.size(); ++i) bias_kappas[k][i] = gout.at(i) * scale;
  }
  // Layer 0 of a chain that starts at the model input: its gamma_out is not needed (no sums).
  Gamma fused(int64_t l, Gamma& gin_, Gamma& gout_) {
    HostGamma& gi = gin_.as(opmath_of(l));
    HostGamma& go = gout_.as(opmath_of(l));
    const bool sums = l > 0 || gamma0.has_value();
    HostGamma y(opmath_of(l), sums ? weights[l].size(1) : 0, 0.0);
    const at::Tensor g = weight_grads[l].contiguous();
    const bool momentum = a.momentum != 0.0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[l].scalar_type(), "dense_chain_step_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      y.log_scale = fused_dense_core<scalar_t>(
          w[l].mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
          momentum ? weight_buffers[l].mutable_data_ptr<scalar_t>() : nullptr, weights[l].size(0), weights[l].size(1),
          gi.data<opmath_t>(), gi.log_scale, go.data<opmath_t>(), go.log_scale, p, a, lr,
          sums ? y.data<opmath_t>() : nullptr);
    });
    if (!w[l].is_same(weights[l])) weights[l].copy_(w[l]);
    return y;
  }
  void update_biases() {
    const bool momentum = a.momentum != 0.0;
    for (size_t k = 0; k < biases.size(); ++k) {
      scaled_sgd_update_raw(b[k], bias_grads[k].contiguous(), momentum ? &bias_buffers[k] : nullptr,
                            bias_kappas[k].data(), p, a, lr);
      if (!b[k].is_same(biases[k])) biases[k].copy_(b[k]);
    }
  }
  // The gamma_out at the chain's input into the caller's gamma0, as float64 values.
  void finish(Gamma& gout) {
    if (!gamma0.has_value()) return;
    at::Tensor out = gamma0->contiguous();
    double* y = out.mutable_data_ptr<double>();
    const double scale = std::exp(gout.log_scale);
    for (int64_t i = 0; i < gout.size(); ++i) y[i] = gout.at(i) * scale;
    if (!out.is_same(*gamma0)) gamma0->copy_(out);
  }
};

void dense_chain_step_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::IntArrayRef bias_layers,
    at::TensorList gamma0, double p, at::ArrayRef<double> sgd, const std::optional<at::Tensor>& lr_tensor,
    const std::optional<at::Tensor>& workspace) {  // checked, not used: the CPU keeps its small vectors on the host
  const SgdArgs a = checks::sgd_args(sgd, "dense_chain_step_");
  const checks::ChainArgs c =
      checks::dense_chain_step_args(params, grads, momentum_buffers, bias_layers, gamma0, p, a.momentum, workspace);
  const int64_t n = static_cast<int64_t>(c.weights.size());
  HostChain chain{c.weights, c.weight_grads, c.weight_buffers, c.biases, c.bias_grads, c.bias_buffers, c.gamma0, p,
                  a, lr_tensor.has_value() ? lr_tensor->item<double>() : a.lr, {}, {}, {}, {}};
  chain.w.resize(n);
  chain.bias_of.resize(n);
  for (int64_t l = 0; l < n; ++l) chain.w[l] = c.weights[l].contiguous();  // a copy only when strided (written back)
  for (size_t k = 0; k < c.biases.size(); ++k) {
    chain.b.push_back(c.biases[k].contiguous());
    chain.bias_of[bias_layers[k]] = chain.b.back();
  }
  chain.bias_kappas.resize(c.biases.size());
  dense_chain_walk(chain, n, bias_layers);
}

// A conv net's step in one call (csrc/trunk_chain_step.h) over the CPU chain and update kernels.
void trunk_chain_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                          at::IntArrayRef layout, at::ArrayRef<double> factors, double p, at::ArrayRef<double> sgd,
                          const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& workspace) {
  trunk_chain_step(params, grads, momentum_buffers, layout, factors, p, sgd, lr_tensor, workspace,
                   dense_chain_step_cpu, scaled_sgd_update_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsgd, CPU, m) {
  m.impl("gamma_forward", &gamma_forward_cpu);
  m.impl("fused_dense_step_", &fused_dense_step_cpu);
  m.impl("dense_chain_step_", &dense_chain_step_cpu);
  m.impl("trunk_chain_step_", &trunk_chain_step_cpu);
}

}  // namespace pathsgd
