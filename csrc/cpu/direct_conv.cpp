// Direct loops for the abs-pow network's batch-1 float64 convolutions and sum pools (see
// csrc/direct_conv.h).
// A 1-D convolution is a 2-D one of height 1. Each loop keeps a block of up to kR vectors of
// channels in registers and multiplies it by broadcast scalars: the output channels for the forward
// pass and the weight gradient, the input channels for the input gradient (channels-last scratch,
// transposed back at the end), so no loop reduces across vector lanes or re-reads its own stores.
#include "../direct_conv.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

namespace pathsgd {
namespace {

using V = at::vec::Vectorized<double>;
constexpr int64_t kLanes = V::size();
constexpr int kR = 4;  // vectors of channels per block
constexpr int64_t kBlock = kR * kLanes;

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// One axis of a convolution: output o reads input o * s + k * d - p for tap k.
struct Axis {
  int64_t n, out, k, s, p, d;
  // Taps [first, end) of output o that read inside the input.
  int64_t tap_first(int64_t o) const { return std::max<int64_t>(0, ceil_div(p - o * s, d)); }
  int64_t tap_end(int64_t o) const { return std::min<int64_t>(k, floor_div(n - 1 + p - o * s, d) + 1); }
  // Outputs [first, end) whose tap t reads inside the input.
  int64_t out_first(int64_t t) const { return std::max<int64_t>(0, ceil_div(p - t * d, s)); }
  int64_t out_end(int64_t t) const { return std::min<int64_t>(out, floor_div(n - 1 + p - t * d, s) + 1); }
  int64_t in(int64_t o, int64_t t) const { return o * s + t * d - p; }
};

struct Geometry {
  int64_t C, CO, groups, cig, cog;
  Axis h, w;
  int64_t taps() const { return cig * h.k * w.k; }  // weights per output channel
  int64_t positions() const { return h.out * w.out; }

  Geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
           at::IntArrayRef dilation, int64_t g) {
    const bool one_d = x.dim() == 3;
    const auto axis = [&](int64_t n, int64_t k, size_t i) {
      const int64_t s = stride[i], p = padding[i], d = dilation[i];
      return Axis{n, (n + 2 * p - d * (k - 1) - 1) / s + 1, k, s, p, d};
    };
    C = x.size(1), CO = weight.size(0), groups = g, cig = C / g, cog = CO / g;
    h = one_d ? Axis{1, 1, 1, 1, 0, 1} : axis(x.size(2), weight.size(2), 0);
    w = axis(x.size(-1), weight.size(-1), one_d ? 0 : 1);
  }
  std::vector<int64_t> out_sizes(bool one_d) const {
    return one_d ? std::vector<int64_t>{1, CO, w.out} : std::vector<int64_t>{1, CO, h.out, w.out};
  }
};

// A block of up to kR vectors of channels, its vector count fixed at compile time (so the
// accumulators stay in registers); the last vector masked unless kFull.
template <int kVectors, bool kFull>
struct Lanes {
  static constexpr int vectors = kVectors;
  int64_t last;  // lanes of the last vector
  V load(const double* p, int r) const {
    return kFull || r < kVectors - 1 ? V::loadu(p + r * kLanes) : V::loadu(p + r * kLanes, last);
  }
  void store(const V& v, double* p, int r) const {
    if (kFull || r < kVectors - 1) v.store(p + r * kLanes); else v.store(p + r * kLanes, static_cast<int>(last));
  }
};

// f(Lanes<...>{...}) for a block of `width` (1 <= width <= kBlock) channels.
template <typename F>
void with_lanes(int64_t width, F&& f) {
  const int vectors = static_cast<int>((width + kLanes - 1) / kLanes);
  const int64_t last = width - (vectors - 1) * kLanes;
  const bool full = last == kLanes;
  switch (vectors) {
    case 1: return full ? f(Lanes<1, true>{last}) : f(Lanes<1, false>{last});
    case 2: return full ? f(Lanes<2, true>{last}) : f(Lanes<2, false>{last});
    case 3: return full ? f(Lanes<3, true>{last}) : f(Lanes<3, false>{last});
    default: return full ? f(Lanes<4, true>{last}) : f(Lanes<4, false>{last});
  }
}

// f(i, acc0) for the even steps of [begin, end) and f(i, acc1) for the odd ones: two accumulator
// sets, so twice the multiply-adds are in flight.
template <typename Acc, typename F>
inline void alternate(int64_t begin, int64_t end, Acc& acc0, Acc& acc1, F&& f) {
  int64_t i = begin;
  for (; i + 1 < end; i += 2) {
    f(i, acc0);
    f(i + 1, acc1);
  }
  if (i < end) f(i, acc0);
}

// out[j * rows + i] = in[i * cols + j]: (rows, cols) -> (cols, rows).
void transpose(const double* in, int64_t rows, int64_t cols, double* out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = in[i * cols + j];
}

}  // namespace

bool direct_conv_applies(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t nd) {
  const auto ok = [](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kDouble && t.is_contiguous() && !t.requires_grad();
  };
  if (!((nd == 1 || nd == 2) && x.dim() == nd + 2 && x.size(0) == 1 && weight.dim() == nd + 2 && ok(x) &&
        ok(weight) && (!bias.has_value() || ok(*bias)))) {
    return false;
  }
  // Past ~2.6e5 multiply-adds (measured: 32x32x3 on 40 positions ~1.1x faster than ATen, 16x16x3x3 on
  // 14x14 ~1.5x slower) ATen's threaded BLAS wins: the loops are for the per-call overhead regime.
  return weight.numel() * x.numel() / x.size(1) <= (int64_t{1} << 18);
}

at::Tensor direct_conv_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const Geometry g(x, weight, stride, padding, dilation, groups);
  const int64_t T = g.taps(), P = g.positions(), W = g.w.n, H = g.h.n;
  const double* X = x.const_data_ptr<double>();
  const double* K = weight.const_data_ptr<double>();
  const double* B = bias.has_value() ? bias->const_data_ptr<double>() : nullptr;
  // wt[tap][co]: each tap's weights of all output channels side by side
  std::vector<double> wt(T * g.CO), yt(P * g.CO);
  transpose(K, g.CO, T, wt.data());
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    for (int64_t c0 = 0; c0 < g.cog; c0 += kBlock) {
      const int64_t co0 = grp * g.cog + c0;
      with_lanes(std::min(kBlock, g.cog - c0), [&](auto blk) {
        constexpr int NV = decltype(blk)::vectors;
        for (int64_t oh = 0; oh < g.h.out; ++oh) {
          const int64_t kh0 = g.h.tap_first(oh), kh1 = g.h.tap_end(oh);
          for (int64_t ow = 0; ow < g.w.out; ++ow) {
            const int64_t kw0 = g.w.tap_first(ow), kw1 = g.w.tap_end(ow);
            // even and odd input channels (alternate)
            V acc0[NV], acc1[NV];
            for (int r = 0; r < NV; ++r) acc0[r] = acc1[r] = V(0.0);
            const auto taps = [&](int64_t cl, V(&a)[NV]) {
              const double* xc = X + (grp * g.cig + cl) * H * W;
              for (int64_t kh = kh0; kh < kh1; ++kh) {
                const double* xr = xc + g.h.in(oh, kh) * W;
                const double* wr = wt.data() + (cl * g.h.k + kh) * g.w.k * g.CO + co0;
                for (int64_t kw = kw0; kw < kw1; ++kw) {
                  const V xv(xr[g.w.in(ow, kw)]);
                  const double* wp = wr + kw * g.CO;
                  for (int r = 0; r < NV; ++r) a[r] = at::vec::fmadd(blk.load(wp, r), xv, a[r]);
                }
              }
            };
            alternate(0, g.cig, acc0, acc1, taps);
            double* yp = yt.data() + (oh * g.w.out + ow) * g.CO + co0;
            for (int r = 0; r < NV; ++r) {
              const V sum = acc0[r] + acc1[r];
              blk.store(B ? sum + blk.load(B + co0, r) : sum, yp, r);
            }
          }
        }
      });
    }
  }
  at::Tensor y = at::empty(g.out_sizes(x.dim() == 3), x.options());
  transpose(yt.data(), P, g.CO, y.mutable_data_ptr<double>());
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_conv_backward(
    const at::Tensor& gy_in, const at::Tensor& x, const at::Tensor& weight, bool has_bias, bool need_x,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Geometry g(x, weight, stride, padding, dilation, groups);
  const int64_t T = g.taps(), P = g.positions(), W = g.w.n, H = g.h.n;
  const at::Tensor gy = gy_in.contiguous();
  TORCH_CHECK(gy.numel() == g.CO * P, "pathsgd.abs_pow_vjp: a convolution's output gradient has ", gy.numel(),
              " elements, its output ", g.CO * P);
  const double* X = x.const_data_ptr<double>();
  const double* K = weight.const_data_ptr<double>();
  const double* GY = gy.const_data_ptr<double>();
  std::vector<double> gyt(P * g.CO);  // gyt[position][co]
  transpose(GY, g.CO, P, gyt.data());

  // Weight gradient: gw[co, tap] = sum over positions of gy[co, pos] * x[input of tap at pos].
  std::vector<double> gwt(T * g.CO);  // gwt[tap][co]
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    for (int64_t c0 = 0; c0 < g.cog; c0 += kBlock) {
      const int64_t co0 = grp * g.cog + c0;
      with_lanes(std::min(kBlock, g.cog - c0), [&](auto blk) {
        constexpr int NV = decltype(blk)::vectors;
        for (int64_t cl = 0; cl < g.cig; ++cl) {
          const double* xc = X + (grp * g.cig + cl) * H * W;
          for (int64_t kh = 0; kh < g.h.k; ++kh) {
            const int64_t oh0 = g.h.out_first(kh), oh1 = g.h.out_end(kh);
            for (int64_t kw = 0; kw < g.w.k; ++kw) {
              const int64_t ow0 = g.w.out_first(kw), ow1 = g.w.out_end(kw);
              V acc0[NV], acc1[NV];  // even and odd output columns
              for (int r = 0; r < NV; ++r) acc0[r] = acc1[r] = V(0.0);
              for (int64_t oh = oh0; oh < oh1; ++oh) {
                const double* xr = xc + g.h.in(oh, kh) * W;
                const double* gr = gyt.data() + oh * g.w.out * g.CO + co0;
                const auto column = [&](int64_t ow, V(&a)[NV]) {
                  const V xv(xr[g.w.in(ow, kw)]);
                  const double* gp = gr + ow * g.CO;
                  for (int r = 0; r < NV; ++r) a[r] = at::vec::fmadd(blk.load(gp, r), xv, a[r]);
                };
                alternate(ow0, ow1, acc0, acc1, column);
              }
              double* out = gwt.data() + ((cl * g.h.k + kh) * g.w.k + kw) * g.CO + co0;
              for (int r = 0; r < NV; ++r) blk.store(acc0[r] + acc1[r], out, r);
            }
          }
        }
      });
    }
  }
  at::Tensor gw = at::empty_like(weight);
  transpose(gwt.data(), T, g.CO, gw.mutable_data_ptr<double>());

  at::Tensor gb;
  if (has_bias) {
    gb = at::empty({g.CO}, x.options());
    double* GB = gb.mutable_data_ptr<double>();
    for (int64_t co = 0; co < g.CO; ++co) {
      double s = 0.0;
      for (int64_t i = 0; i < P; ++i) s += GY[co * P + i];
      GB[co] = s;
    }
  }

  at::Tensor gx;
  if (need_x) {
    // Input gradient: gx[ci, input of tap at pos] += w[co, ci, tap] * gy[co, pos], channels-last.
    std::vector<double> w2(g.CO * T);  // w2[co][kh][kw][cl]: the input channels of a tap side by side
    for (int64_t co = 0; co < g.CO; ++co)
      transpose(K + co * T, g.cig, g.h.k * g.w.k, w2.data() + co * T);
    std::vector<double> gxt(H * W * g.C, 0.0);  // gxt[input position][ci]
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      for (int64_t c0 = 0; c0 < g.cig; c0 += kBlock) {
        const int64_t ci0 = grp * g.cig + c0;
        with_lanes(std::min(kBlock, g.cig - c0), [&](auto blk) {
          constexpr int NV = decltype(blk)::vectors;
          for (int64_t oh = 0; oh < g.h.out; ++oh) {
            const int64_t kh0 = g.h.tap_first(oh), kh1 = g.h.tap_end(oh);
            for (int64_t ow = 0; ow < g.w.out; ++ow) {
              const int64_t kw0 = g.w.tap_first(ow), kw1 = g.w.tap_end(ow);
              const double* gp = GY + oh * g.w.out + ow;
              for (int64_t kh = kh0; kh < kh1; ++kh) {
                for (int64_t kw = kw0; kw < kw1; ++kw) {
                  V acc0[NV], acc1[NV];  // even and odd output channels
                  for (int r = 0; r < NV; ++r) acc0[r] = acc1[r] = V(0.0);
                  const double* wk = w2.data() + (kh * g.w.k + kw) * g.cig + c0;
                  const auto from = [&](int64_t j, V(&a)[NV]) {  // output channel j of the group
                    const int64_t co = grp * g.cog + j;
                    const V gv(gp[co * P]);
                    const double* wp = wk + co * T;
                    for (int r = 0; r < NV; ++r) a[r] = at::vec::fmadd(blk.load(wp, r), gv, a[r]);
                  };
                  alternate(0, g.cog, acc0, acc1, from);
                  double* out = gxt.data() + (g.h.in(oh, kh) * W + g.w.in(ow, kw)) * g.C + ci0;
                  for (int r = 0; r < NV; ++r) blk.store(blk.load(out, r) + (acc0[r] + acc1[r]), out, r);
                }
              }
            }
          }
        });
      }
    }
    gx = at::empty_like(x);
    transpose(gxt.data(), H * W, g.C, gx.mutable_data_ptr<double>());
  }
  return {gx, gw, gb};
}

namespace {

// A sum pool's geometry on (C, H, W) (H = 1 for a 1-D pool): torch's pooling output sizes
// (pooling_output_shape: a ceil_mode window must start inside the input or the left padding).
struct PoolGeometry {
  int64_t C, H, W, OH, OW, kh, kw, sh, sw, ph, pw;
  static int64_t out(int64_t n, int64_t k, int64_t s, int64_t p, bool ceil_mode) {
    int64_t o = (n + 2 * p - k + (ceil_mode ? s - 1 : 0)) / s + 1;
    if (ceil_mode && (o - 1) * s >= n + p) --o;
    return o;
  }
  PoolGeometry(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
               bool ceil_mode)
      : C(x.size(1)), H(x.dim() == 3 ? 1 : x.size(2)), W(x.size(-1)), OH(0), OW(0), kh(kernel[0]), kw(kernel[1]),
        sh(stride[0]), sw(stride[1]), ph(padding[0]), pw(padding[1]) {
    OH = out(H, kh, sh, ph, ceil_mode);
    OW = out(W, kw, sw, pw, ceil_mode);
  }
  // The input rows / columns [first, end) of output row oh / column ow's window.
  std::pair<int64_t, int64_t> rows(int64_t oh) const {
    const int64_t h0 = oh * sh - ph;
    return {std::max<int64_t>(h0, 0), std::min(h0 + kh, H)};
  }
  std::pair<int64_t, int64_t> cols(int64_t ow) const {
    const int64_t w0 = ow * sw - pw;
    return {std::max<int64_t>(w0, 0), std::min(w0 + kw, W)};
  }
  std::vector<int64_t> out_sizes(bool one_d) const {
    return one_d ? std::vector<int64_t>{1, C, OW} : std::vector<int64_t>{1, C, OH, OW};
  }
};

}  // namespace

bool direct_sum_pool_applies(const at::Tensor& x, int64_t nd) {
  return (nd == 1 || nd == 2) && x.dim() == nd + 2 && x.size(0) == 1 && x.device().is_cpu() &&
         x.scalar_type() == at::kDouble && x.is_contiguous() && !x.requires_grad();
}

at::Tensor direct_sum_pool(const at::Tensor& x, int64_t nd, at::IntArrayRef kernel, at::IntArrayRef stride,
                           at::IntArrayRef padding, bool ceil_mode) {
  const PoolGeometry g(x, kernel, stride, padding, ceil_mode);
  at::Tensor y = at::empty(g.out_sizes(nd == 1), x.options());
  const double* X = x.const_data_ptr<double>();
  double* Y = y.mutable_data_ptr<double>();
  for (int64_t c = 0; c < g.C; ++c) {
    const double* xc = X + c * g.H * g.W;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const auto [h0, h1] = g.rows(oh);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const auto [w0, w1] = g.cols(ow);
        double sum = 0.0;
        for (int64_t ih = h0; ih < h1; ++ih)
          for (int64_t iw = w0; iw < w1; ++iw) sum += xc[ih * g.W + iw];
        *Y++ = sum;
      }
    }
  }
  return y;
}

at::Tensor direct_sum_pool_backward(const at::Tensor& gy_in, const at::Tensor& x, at::IntArrayRef kernel,
                                    at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode) {
  const PoolGeometry g(x, kernel, stride, padding, ceil_mode);
  const at::Tensor gy = gy_in.contiguous();
  TORCH_CHECK(gy.numel() == g.C * g.OH * g.OW, "pathsgd.abs_pow_vjp: a pool's output gradient has ", gy.numel(),
              " elements, its output ", g.C * g.OH * g.OW);
  at::Tensor gx = at::zeros_like(x);
  const double* GY = gy.const_data_ptr<double>();
  double* GX = gx.mutable_data_ptr<double>();
  for (int64_t c = 0; c < g.C; ++c) {
    double* gc = GX + c * g.H * g.W;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const auto [h0, h1] = g.rows(oh);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const auto [w0, w1] = g.cols(ow);
        const double v = *GY++;
        for (int64_t ih = h0; ih < h1; ++ih)
          for (int64_t iw = w0; iw < w1; ++iw) gc[ih * g.W + iw] += v;
      }
    }
  }
  return gx;
}

}  // namespace pathsgd
