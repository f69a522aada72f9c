// CUDA kernels for dense (nn.Linear) layers: the forward gamma pass and the
// fused backward pass that accumulates gamma_out and applies the update.
// Same semantics as csrc/cpu/dense_kernels.cpp.
//
// Determinism: every reduction has a fixed order that depends only on the
// shapes and dtype (never on timing, alignment or the GPU model), and there
// are no floating-point atomics. No host synchronization: the log scales and
// lr_tensor are read inside the kernels.
#include <cmath>
#include <limits>
#include <tuple>

#include "cuda_common.cuh"
#include "../dense_chain_step.h"
#include "../trunk_chain_step.h"
#include "../workspace.h"

namespace pathsgd {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// std::max semantics, (a < b) ? b : a: a NaN b is ignored, as on the CPU,
// where the running max starts at 0 and never becomes NaN.
__device__ __forceinline__ double max_like_cpu(double a, double b) { return a < b ? b : a; }

// ---------------------------------------------------------------------------
// normalize_log_scaled (the CPU function of the same name), on one block:
//   y <- y * exp(log_scale - t) + addend * exp(-t),  t = max(log_scale + log max y, log max addend)
// writes t to *out_log_scale; an all-zero result stays exactly zero with t = 0.
// The addend (|b|^p) is float64 (an in-range bias can have |b|^p out of float32
// range); the factors and the rescaling are float64, rounded to opmath once.
// The max is exact and order-independent.
// ---------------------------------------------------------------------------
constexpr int kNormThreads = 1024;

template <typename opmath_t>
__global__ void __launch_bounds__(kNormThreads)
    normalize_log_scaled_kernel(opmath_t* __restrict__ y, const double* __restrict__ addend, int64_t n,
                                DeviceScalar log_scale_in, double* __restrict__ out_log_scale) {
  __shared__ double s_ymax[kNormThreads / kWarp];
  __shared__ double s_amax[kNormThreads / kWarp];
  __shared__ double s_yf, s_af, s_ydiv, s_adiv;
  __shared__ bool s_zero;
  const int tid = threadIdx.x;
  double ymax = 0.0, amax = 0.0;
  for (int64_t i = tid; i < n; i += blockDim.x) {
    ymax = max_like_cpu(ymax, static_cast<double>(y[i]));
    if (addend != nullptr) amax = max_like_cpu(amax, static_cast<double>(addend[i]));
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    ymax = max_like_cpu(ymax, __shfl_down_sync(kFullMask, ymax, off));
    amax = max_like_cpu(amax, __shfl_down_sync(kFullMask, amax, off));
  }
  const int warp = tid / kWarp, lane = tid % kWarp;
  if (lane == 0) {
    s_ymax[warp] = ymax;
    s_amax[warp] = amax;
  }
  __syncthreads();
  if (tid == 0) {
    const int nwarps = blockDim.x / kWarp;
    for (int w = 1; w < nwarps; ++w) {
      ymax = max_like_cpu(ymax, s_ymax[w]);
      amax = max_like_cpu(amax, s_amax[w]);
    }
    const double log_scale = log_scale_in.get();
    const double ninf = -std::numeric_limits<double>::infinity();
    const double log_y = ymax > 0 ? log_scale + ::log(ymax) : ninf;
    const double log_add = amax > 0 ? ::log(amax) : ninf;
    const double t = log_y < log_add ? log_add : log_y;  // std::max(log_y, log_add)
    if (t == ninf) {
      s_zero = true;
      s_yf = 0.0;
      s_af = 0.0;
      *out_log_scale = 0.0;
    } else {
      // y / y_max * exp(log_y - t): the factor is <= 1, so a tiny (subnormal) y_max cannot overflow it
      // as exp(log_scale - t) = exp(-log(y_max)) would (the CPU kernel's normalize_log_scaled).
      s_zero = false;
      s_yf = ymax > 0 ? ::exp(log_y - t) : 0.0;
      s_af = amax > 0 ? ::exp(log_add - t) : 0.0;
      s_ydiv = ymax > 0 ? ymax : 1.0;
      s_adiv = amax > 0 ? amax : 1.0;
      *out_log_scale = t;
    }
  }
  __syncthreads();
  const bool zero = s_zero;
  const double yf = s_yf, af = s_af, ydiv = s_ydiv, adiv = s_adiv;
  for (int64_t i = tid; i < n; i += blockDim.x) {
    y[i] = zero ? opmath_t(0)
                : static_cast<opmath_t>(static_cast<double>(y[i]) / ydiv * yf +
                                        (addend != nullptr ? addend[i] / adiv * af : 0.0));
  }
}

template <typename opmath_t>
void launch_normalize(opmath_t* y, const double* addend, int64_t n, DeviceScalar log_scale, double* out_log_scale,
                      cudaStream_t stream) {
  // Always launched (also for n == 0) because it writes the output log scale.
  normalize_log_scaled_kernel<opmath_t><<<1, kNormThreads, 0, stream>>>(y, addend, n, log_scale, out_log_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// gamma_forward: y_i = sum_j |W_ij|^p x_j, kThreadsPerRow threads per row.
// Lane l of a row sums the 16-byte chunks l, l + kThreadsPerRow, ... in order
// (within a chunk, elements in order), then the lanes are combined by a fixed
// shuffle tree (and, for 256 threads per row, the 8 warp sums in warp order).
// |W|^p is computed in registers and never stored.
// ---------------------------------------------------------------------------
constexpr int kRowThreads = 256;

template <typename scalar_t, int kThreadsPerRow, bool kAligned>
__global__ void __launch_bounds__(kRowThreads)
    gamma_rows_kernel(const scalar_t* __restrict__ W, const at::opmath_type<scalar_t>* __restrict__ x,
                      const scalar_t* __restrict__ bias, at::opmath_type<scalar_t>* __restrict__ y,
                      double* __restrict__ bias_pow, int64_t rows, int64_t cols, PowKind kind,
                      at::opmath_type<scalar_t> p, double p_double) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  constexpr int kRowsPerBlock = kRowThreads / kThreadsPerRow;
  constexpr int kShfl = kThreadsPerRow < kWarp ? kThreadsPerRow : kWarp;
  const int lane = threadIdx.x % kThreadsPerRow;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const bool active = row < rows;
  opmath_t acc = opmath_t(0);
  if (active) {
    const scalar_t* w = W + row * cols;
    for (int64_t j = static_cast<int64_t>(lane) * VEC; j < cols; j += static_cast<int64_t>(kThreadsPerRow) * VEC) {
      opmath_t wv[VEC];
      load_chunk<kAligned, VEC>(w, j, cols, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (kAligned || j + k < cols) acc += abs_pow(wv[k], kind, p) * x[j + k];
      }
    }
  }
  // Fixed shuffle tree (all lanes take part, also those past the last row).
#pragma unroll
  for (int off = kShfl / 2; off > 0; off >>= 1) acc += __shfl_down_sync(kFullMask, acc, off, kShfl);
  if constexpr (kThreadsPerRow > kWarp) {
    static_assert(kThreadsPerRow == kRowThreads, "a row spans either at most one warp or the whole block");
    __shared__ opmath_t s_part[kRowThreads / kWarp];
    if (threadIdx.x % kWarp == 0) s_part[threadIdx.x / kWarp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc = s_part[0];
#pragma unroll
      for (int w = 1; w < kRowThreads / kWarp; ++w) acc += s_part[w];
    }
  }
  if (active && lane == 0) {
    y[row] = acc;
    if (bias != nullptr) bias_pow[row] = abs_pow(static_cast<double>(bias[row]), kind, p_double);
  }
}

template <typename scalar_t, int kThreadsPerRow>
void launch_gamma_rows(const scalar_t* W, const at::opmath_type<scalar_t>* x, const scalar_t* bias,
                       at::opmath_type<scalar_t>* y, double* bias_pow, int64_t rows, int64_t cols, PowKind kind,
                       at::opmath_type<scalar_t> p, double p_double, bool aligned, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kRowThreads / kThreadsPerRow;
  const int64_t blocks = ceil_div(rows, kRowsPerBlock);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "pathsgd.gamma_forward: too many rows (", rows, ")");
  if (aligned) {
    gamma_rows_kernel<scalar_t, kThreadsPerRow, true><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
        W, x, bias, y, bias_pow, rows, cols, kind, p, p_double);
  } else {
    gamma_rows_kernel<scalar_t, kThreadsPerRow, false><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
        W, x, bias, y, bias_pow, rows, cols, kind, p, p_double);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Its small tensors come from `ws` (the chain's workspace; fresh allocations for the op itself).
std::tuple<at::Tensor, at::Tensor> gamma_forward_cuda_in(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& gamma_in,
                                                         const at::Tensor& gamma_in_log_scale, double p,
                                                         Workspace& ws) {
  constexpr const char* op = "gamma_forward";
  checks::gamma_forward_args(weight, bias, gamma_in, gamma_in_log_scale, p);
  TORCH_CHECK(weight.is_cuda(), "pathsgd.gamma_forward: weight must be a CUDA tensor, got ", weight.device());
  const at::Device device = weight.device();
  check_cuda_tensor(gamma_in, device, op, "gamma_in");
  check_log_scale(gamma_in_log_scale, device, op, "gamma_in_log_scale");
  if (bias.has_value()) check_cuda_tensor(*bias, device, op, "bias");
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const at::Tensor w = weight.contiguous();
  const at::Tensor x = gamma_in.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = ws.empty({rows}, gamma_in.options());
  at::Tensor bias_pow = bias.has_value() ? ws.empty({rows}, gamma_in.options().dtype(at::kDouble)) : at::Tensor();
  at::Tensor out_log_scale = ws.empty({}, weight.options().dtype(at::kDouble));
  const DeviceScalar in_log_scale = log_scale_arg(gamma_in_log_scale);
  const PowKind kind = pow_kind(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gamma_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int VEC = vec_size<scalar_t>();
    opmath_t* y = out.mutable_data_ptr<opmath_t>();
    double* bp = bias.has_value() ? bias_pow.mutable_data_ptr<double>() : nullptr;
    if (rows > 0) {
      const scalar_t* W = w.const_data_ptr<scalar_t>();
      const opmath_t* X = x.const_data_ptr<opmath_t>();
      const scalar_t* B = bias.has_value() ? b.const_data_ptr<scalar_t>() : nullptr;
      const bool aligned = cols % VEC == 0 && is_aligned16(W);
      const opmath_t pp = static_cast<opmath_t>(p);
      // Threads per row: a function of the shape only, so the summation order is too.
      const int64_t chunks = ceil_div(cols, VEC);
      if (chunks <= 8) {
        launch_gamma_rows<scalar_t, 8>(W, X, B, y, bp, rows, cols, kind, pp, p, aligned, stream);
      } else if (rows >= 1024 || chunks <= 4 * kWarp) {
        launch_gamma_rows<scalar_t, kWarp>(W, X, B, y, bp, rows, cols, kind, pp, p, aligned, stream);
      } else {
        launch_gamma_rows<scalar_t, kRowThreads>(W, X, B, y, bp, rows, cols, kind, pp, p, aligned, stream);
      }
    }
    launch_normalize<opmath_t>(y, bp, rows, in_log_scale, out_log_scale.mutable_data_ptr<double>(), stream);
  });
  return {out, out_log_scale};
}

std::tuple<at::Tensor, at::Tensor> gamma_forward_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& gamma_in, const at::Tensor& gamma_in_log_scale,
                                                      double p) {
  Workspace fresh;
  return gamma_forward_cuda_in(weight, bias, gamma_in, gamma_in_log_scale, p, fresh);
}

// ---------------------------------------------------------------------------
// fused_dense_step_
//
// 1. kappa_factors_kernel (one block): kappa^(2/p) = row_scale_i * col_scale_j split as
//    the CPU's KappaPowFactors does (choose_kappa_split), in float64 then cast to opmath,
//    or an exact per-element flag when no split fits; O(rows + cols).
// 2. fused_tile_kernel, grid (column tiles, row tiles), block 32 x 8: thread x owns the
//    VEC columns of one 16-byte chunk, warp y walks rows r0 + y, r0 + y + 8, ... of the
//    row tile. It reads W (and grad, momentum buffer) once, accumulates |W_old|^p gamma_out
//    per column in registers, applies path_sgd_element with kappa_pow = row_scale_i *
//    col_scale_j and writes W (and the buffer) once. The 8 warp sums are combined in
//    warp order through shared memory into partial[row_tile][col].
// 3. reduce_partials_kernel: y_j = sum over row tiles in order (skipped for one row tile).
// 4. normalize_log_scaled_kernel with gamma_out_log_scale.
// ---------------------------------------------------------------------------
constexpr int kTileWarps = 8;
constexpr int kTileThreads = kWarp * kTileWarps;
constexpr int64_t kTargetTileBlocks = 1024;
constexpr int64_t kMinRowsPerTile = 64;

constexpr int kFactorThreads = 1024;

// One block: logs of the kappa factors, their ranges, the split of choose_kappa_split
// (the CPU's KappaPowFactors), and the factors themselves; O(rows + cols), no host sync.
// `exact_flag` tells the tile kernel to use exp(log_row_i + log_col_j) per element.
template <typename opmath_t>
__global__ void __launch_bounds__(kFactorThreads)
    kappa_factors_kernel(const opmath_t* __restrict__ gout, const opmath_t* __restrict__ gin,
                         opmath_t* __restrict__ row_scale, opmath_t* __restrict__ col_scale,
                         double* __restrict__ log_row, double* __restrict__ log_col, int* __restrict__ exact_flag,
                         int64_t rows, int64_t cols, double e, DeviceScalar s_in, DeviceScalar s_out, double log_eps,
                         double log_limit) {
  __shared__ double s_red[4][kFactorThreads];
  __shared__ double s_split;
  const int t = threadIdx.x;
  const double log_scale = s_in.get() + s_out.get();
  double rmin = INFINITY, rmax = -INFINITY, cmin = INFINITY, cmax = -INFINITY;
  for (int64_t i = t; i < rows; i += kFactorThreads) {
    const double v = e * ::log(static_cast<double>(gout[i]));
    log_row[i] = v;
    if (v > -INFINITY) rmin = fmin(rmin, v), rmax = fmax(rmax, v);
  }
  for (int64_t j = t; j < cols; j += kFactorThreads) {
    const double v = e * (::log(static_cast<double>(gin[j])) + log_scale);
    log_col[j] = v;
    if (v > -INFINITY) cmin = fmin(cmin, v), cmax = fmax(cmax, v);
  }
  s_red[0][t] = rmin, s_red[1][t] = rmax, s_red[2][t] = cmin, s_red[3][t] = cmax;
  __syncthreads();
  for (int stride = kFactorThreads / 2; stride > 0; stride /= 2) {  // min/max: order-independent
    if (t < stride) {
      s_red[0][t] = fmin(s_red[0][t], s_red[0][t + stride]);
      s_red[1][t] = fmax(s_red[1][t], s_red[1][t + stride]);
      s_red[2][t] = fmin(s_red[2][t], s_red[2][t + stride]);
      s_red[3][t] = fmax(s_red[3][t], s_red[3][t + stride]);
    }
    __syncthreads();
  }
  if (t == 0) {
    const KappaSplit split = choose_kappa_split(s_red[0][0], s_red[1][0], s_red[2][0], s_red[3][0], log_eps, log_limit);
    s_split = split.split;
    *exact_flag = split.exact ? 1 : 0;
  }
  __syncthreads();
  const double split = s_split;
  for (int64_t i = t; i < rows; i += kFactorThreads) row_scale[i] = static_cast<opmath_t>(::exp(log_row[i] + split));
  for (int64_t j = t; j < cols; j += kFactorThreads) col_scale[j] = static_cast<opmath_t>(::exp(log_col[j] - split));
}

// kappa^(2/p) factors as the tile kernel reads them (see kappa_factors_kernel).
template <typename opmath_t>
struct KappaFactorsDev {
  const opmath_t* row = nullptr;
  const opmath_t* col = nullptr;
  const double* log_row = nullptr;
  const double* log_col = nullptr;
  const int* exact = nullptr;
};

template <typename scalar_t, bool kUpdate, bool kAligned>
__global__ void __launch_bounds__(kTileThreads)
    fused_tile_kernel(scalar_t* __restrict__ W, const scalar_t* __restrict__ G, scalar_t* __restrict__ B,
                      const at::opmath_type<scalar_t>* __restrict__ gout,
                      KappaFactorsDev<at::opmath_type<scalar_t>> kappa,
                      at::opmath_type<scalar_t>* __restrict__ partial, int64_t rows, int64_t cols,
                      int64_t rows_per_tile, PowKind kind, at::opmath_type<scalar_t> p,
                      SgdParams<at::opmath_type<scalar_t>> h, DeviceScalar lr) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  constexpr int kTileCols = kWarp * VEC;
  __shared__ opmath_t s_acc[kTileWarps][kTileCols];

  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t j = col0 + static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_tile;
  const int64_t r_end = r_begin + rows_per_tile < rows ? r_begin + rows_per_tile : rows;
  const bool active = j < cols;

  opmath_t acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = opmath_t(0);

  if (active) {
    opmath_t cs[VEC];
    SgdParams<opmath_t> hh = h;
    bool exact = false;
    if constexpr (kUpdate) {
      load_chunk<false, VEC>(kappa.col, j, cols, cs);
      hh = with_lr(h, lr);
      exact = *kappa.exact != 0;
    }
    const bool read_buf = kUpdate && hh.has_momentum && !hh.first_step;
    const bool write_buf = kUpdate && hh.has_momentum;
#pragma unroll 2
    for (int64_t i = r_begin + threadIdx.y; i < r_end; i += kTileWarps) {
      const int64_t off = i * cols;
      opmath_t wv[VEC];
      load_chunk<kAligned, VEC>(W + off, j, cols, wv);
      const opmath_t go = gout[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += abs_pow(wv[k], kind, p) * go;
      if constexpr (kUpdate) {
        opmath_t gv[VEC], bv[VEC];
        load_chunk<kAligned, VEC>(G + off, j, cols, gv);
        if (read_buf) {
          load_chunk<kAligned, VEC>(B + off, j, cols, bv);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) bv[k] = opmath_t(0);
        }
        const opmath_t rs = kappa.row[i];
        if (exact) {  // factors out of range: per-element kappa^(2/p) from the logs (rare)
          const double lr_i = kappa.log_row[i];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const opmath_t kp = j + k < cols ? static_cast<opmath_t>(::exp(lr_i + kappa.log_col[j + k])) : opmath_t(1);
            wv[k] = path_sgd_element(wv[k], gv[k], bv[k], kp, hh);
          }
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) wv[k] = path_sgd_element(wv[k], gv[k], bv[k], rs * cs[k], hh);
        }
        store_chunk<kAligned, VEC>(W + off, j, cols, wv);
        if (write_buf) store_chunk<kAligned, VEC>(B + off, j, cols, bv);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) s_acc[threadIdx.y][threadIdx.x * VEC + k] = acc[k];
  __syncthreads();
  const int t = threadIdx.y * kWarp + threadIdx.x;
  opmath_t* out = partial + static_cast<int64_t>(blockIdx.y) * cols + col0;
  for (int c = t; c < kTileCols; c += kTileThreads) {
    if (col0 + c < cols) {
      opmath_t s = s_acc[0][c];
#pragma unroll
      for (int w = 1; w < kTileWarps; ++w) s += s_acc[w][c];
      out[c] = s;
    }
  }
}

template <typename opmath_t>
__global__ void reduce_partials_kernel(const opmath_t* __restrict__ partial, opmath_t* __restrict__ y,
                                       int64_t num_tiles, int64_t cols) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  opmath_t s = opmath_t(0);
  for (int64_t t = 0; t < num_tiles; ++t) s += partial[t * cols + j];
  y[j] = s;
}

template <typename scalar_t, bool kUpdate>
void launch_fused_tiles(bool aligned, dim3 grid, cudaStream_t stream, scalar_t* W, const scalar_t* G, scalar_t* B,
                        const at::opmath_type<scalar_t>* gout, KappaFactorsDev<at::opmath_type<scalar_t>> kappa,
                        at::opmath_type<scalar_t>* partial, int64_t rows,
                        int64_t cols, int64_t rows_per_tile, PowKind kind, at::opmath_type<scalar_t> p,
                        const SgdParams<at::opmath_type<scalar_t>>& h, DeviceScalar lr) {
  const dim3 block(kWarp, kTileWarps);
  if (aligned) {
    fused_tile_kernel<scalar_t, kUpdate, true><<<grid, block, 0, stream>>>(
        W, G, B, gout, kappa, partial, rows, cols, rows_per_tile, kind, p, h, lr);
  } else {
    fused_tile_kernel<scalar_t, kUpdate, false><<<grid, block, 0, stream>>>(
        W, G, B, gout, kappa, partial, rows, cols, rows_per_tile, kind, p, h, lr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> fused_dense_step_cuda_in(
    at::Tensor& weight, const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& momentum_buffer,
    const at::Tensor& gamma_in, const at::Tensor& gamma_in_log_scale, const at::Tensor& gamma_out,
    const at::Tensor& gamma_out_log_scale, double p, at::ArrayRef<double> sgd,
    const std::optional<at::Tensor>& lr_tensor, Workspace& ws) {
  constexpr const char* op = "fused_dense_step_";
  const SgdArgs a = checks::sgd_args(sgd, op);
  checks::fused_dense_step_args(weight, grad, momentum_buffer, gamma_in, gamma_in_log_scale, gamma_out,
                                gamma_out_log_scale, p, a.momentum);
  TORCH_CHECK(weight.is_cuda(), "pathsgd.fused_dense_step_: weight must be a CUDA tensor, got ", weight.device());
  const at::Device device = weight.device();
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const auto opmath = at::toOpMathType(weight.scalar_type());
  check_cuda_tensor(gamma_in, device, op, "gamma_in");
  check_cuda_tensor(gamma_out, device, op, "gamma_out");
  check_log_scale(gamma_in_log_scale, device, op, "gamma_in_log_scale");
  check_log_scale(gamma_out_log_scale, device, op, "gamma_out_log_scale");
  const bool update = grad.has_value();
  const bool use_buffer = update && a.momentum != 0.0;
  if (update) check_cuda_tensor(*grad, device, op, "grad");
  if (use_buffer) check_cuda_tensor(*momentum_buffer, device, op, "momentum_buffer");
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  at::Tensor lr_holder;
  const DeviceScalar lr_scalar = update ? lr_arg(a.lr, lr_tensor, device, op, lr_holder) : DeviceScalar{};
  const DeviceScalar s_in = log_scale_arg(gamma_in_log_scale);
  const DeviceScalar s_out = log_scale_arg(gamma_out_log_scale);
  const at::Tensor gin = gamma_in.contiguous();
  const at::Tensor gout = gamma_out.contiguous();
  at::Tensor y = ws.empty({cols}, gamma_in.options());
  at::Tensor out_log_scale = ws.empty({}, weight.options().dtype(at::kDouble));
  const at::Tensor g = update ? grad->contiguous() : at::Tensor();
  with_contiguous(weight, [&](const at::Tensor& w) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fused_dense_step_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      constexpr int VEC = vec_size<scalar_t>();
      constexpr int64_t kTileCols = kWarp * VEC;
      opmath_t* Y = y.mutable_data_ptr<opmath_t>();
      if (rows > 0 && cols > 0) {
        const opmath_t* go = gout.const_data_ptr<opmath_t>();
        const opmath_t* gi = gin.const_data_ptr<opmath_t>();
        scalar_t* W = w.mutable_data_ptr<scalar_t>();
        const scalar_t* G = update ? g.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* B = use_buffer ? momentum_buffer->mutable_data_ptr<scalar_t>() : nullptr;
        at::Tensor row_scale, col_scale, logs, exact_flag;
        KappaFactorsDev<opmath_t> kappa;
        SgdParams<opmath_t> h;
        if (update) {
          h = make_sgd_params<opmath_t>(a, a.lr);
          row_scale = ws.empty({rows}, gamma_out.options());
          col_scale = ws.empty({cols}, gamma_in.options());
          logs = ws.empty({rows + cols}, gamma_in.options().dtype(at::kDouble));
          exact_flag = ws.empty({1}, gamma_in.options().dtype(at::kInt));
          // Stay well inside the opmath range (float: e^80 ~ 5.5e34), as on the CPU.
          const double log_limit = std::is_same_v<opmath_t, double> ? 700.0 : 80.0;
          kappa_factors_kernel<opmath_t><<<1, kFactorThreads, 0, stream>>>(
              go, gi, row_scale.mutable_data_ptr<opmath_t>(), col_scale.mutable_data_ptr<opmath_t>(),
              logs.mutable_data_ptr<double>(), logs.mutable_data_ptr<double>() + rows,
              exact_flag.mutable_data_ptr<int>(), rows, cols, 2.0 / p, s_in, s_out,
              a.eps > 0 ? std::log(a.eps) : -INFINITY, log_limit);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          kappa = {row_scale.const_data_ptr<opmath_t>(), col_scale.const_data_ptr<opmath_t>(),
                   logs.const_data_ptr<double>(), logs.const_data_ptr<double>() + rows,
                   exact_flag.const_data_ptr<int>()};
        }
        // Tile shape: a function of (rows, cols, dtype) only, so the summation order is too.
        const int64_t col_tiles = ceil_div(cols, kTileCols);
        const int64_t target_row_tiles = std::max<int64_t>(1, kTargetTileBlocks / col_tiles);
        int64_t rows_per_tile = std::max(kMinRowsPerTile, ceil_div(rows, target_row_tiles));
        rows_per_tile = std::max(rows_per_tile, ceil_div(rows, 65535));  // gridDim.y limit
        rows_per_tile = ceil_div(rows_per_tile, kTileWarps) * kTileWarps;
        const int64_t row_tiles = ceil_div(rows, rows_per_tile);
        TORCH_CHECK(col_tiles <= std::numeric_limits<int32_t>::max(), "pathsgd.fused_dense_step_: too many columns (",
                    cols, ")");
        at::Tensor partial = row_tiles > 1 ? ws.empty({row_tiles, cols}, gamma_in.options()) : y;
        opmath_t* P = partial.mutable_data_ptr<opmath_t>();
        const bool aligned = cols % VEC == 0 && is_aligned16(W) && (G == nullptr || is_aligned16(G)) &&
                             (B == nullptr || is_aligned16(B));
        const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
        const PowKind kind = pow_kind(p);
        const opmath_t pp = static_cast<opmath_t>(p);
        if (update) {
          launch_fused_tiles<scalar_t, true>(aligned, grid, stream, W, G, B, go, kappa, P, rows, cols, rows_per_tile,
                                             kind, pp, h, lr_scalar);
        } else {
          launch_fused_tiles<scalar_t, false>(aligned, grid, stream, W, G, B, go, kappa, P, rows, cols,
                                              rows_per_tile, kind, pp, h, lr_scalar);
        }
        if (row_tiles > 1) {
          constexpr int kThreads = 256;
          reduce_partials_kernel<opmath_t><<<static_cast<unsigned>(ceil_div(cols, kThreads)), kThreads, 0, stream>>>(
              P, Y, row_tiles, cols);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      } else if (cols > 0) {
        y.zero_();  // no rows: |W|^pT gamma_out is all zeros
      }
      launch_normalize<opmath_t>(Y, nullptr, cols, s_out, out_log_scale.mutable_data_ptr<double>(), stream);
    });
  });
  return {y, out_log_scale};
}

std::tuple<at::Tensor, at::Tensor> fused_dense_step_cuda(
    at::Tensor& weight, const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& momentum_buffer,
    const at::Tensor& gamma_in, const at::Tensor& gamma_in_log_scale, const at::Tensor& gamma_out,
    const at::Tensor& gamma_out_log_scale, double p, at::ArrayRef<double> sgd,
    const std::optional<at::Tensor>& lr_tensor) {
  Workspace fresh;
  return fused_dense_step_cuda_in(weight, grad, momentum_buffer, gamma_in, gamma_in_log_scale, gamma_out,
                                  gamma_out_log_scale, p, sgd, lr_tensor, fresh);
}


// The whole dense chain in one call (csrc/dense_chain_step.h) over this file's kernels.
void dense_chain_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           at::IntArrayRef bias_layers, at::TensorList gamma0, double p, at::ArrayRef<double> sgd,
                           const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& workspace) {
  TORCH_CHECK(!params.empty(), "pathsgd.dense_chain_step_: needs at least one layer");
  check_cuda_tensor(params[0], params[0].device(), "dense_chain_step_", "params[0]");
  const c10::cuda::CUDAGuard guard(params[0].device());  // the chain's own small tensors and ops
  dense_chain_step(params, grads, momentum_buffers, bias_layers, gamma0, p, sgd, lr_tensor, workspace,
                   gamma_forward_cuda_in, fused_dense_step_cuda_in, scaled_sgd_update_cuda);
}

// A conv net's step in one call (csrc/trunk_chain_step.h) over the CUDA chain and update kernels.
void trunk_chain_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           at::IntArrayRef layout, at::ArrayRef<double> factors, double p, at::ArrayRef<double> sgd,
                           const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& workspace) {
  TORCH_CHECK(!params.empty(), "pathsgd.trunk_chain_step_: needs the trunk's and the head's parameters");
  check_cuda_tensor(params[0], params[0].device(), "trunk_chain_step_", "params[0]");
  const c10::cuda::CUDAGuard guard(params[0].device());  // the trunk's small tensors and ops
  trunk_chain_step(params, grads, momentum_buffers, layout, factors, p, sgd, lr_tensor, workspace,
                   dense_chain_step_cuda, scaled_sgd_update_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsgd, CUDA, m) {
  m.impl("gamma_forward", &gamma_forward_cuda);
  m.impl("fused_dense_step_", &fused_dense_step_cuda);
  m.impl("dense_chain_step_", &dense_chain_step_cuda);
  m.impl("trunk_chain_step_", &trunk_chain_step_cuda);
}

}  // namespace cuda
}  // namespace pathsgd
