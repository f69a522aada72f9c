// The abs-pow network of a conv net (|w|^p weights, all-ones input, float64, batch 1) run as
// compiled programs, one op each way:
//   abs_pow_forward: the value of every node (input to output);
//   abs_pow_vjp:     the backward pass, the kappas of its |w|^p leaves (a tape of vector-Jacobian
//                    products, output to input).
//
// The programs are built once per model by pathsgd/eval_tape.py (TapeEvaluator); their twins are
// reference.abs_pow_forward / reference.abs_pow_vjp. A Python loop over the nodes costs more than
// the arithmetic of these tiny networks; here each rule is a direct ATen call. Only ATen ops are
// called, so one device-generic (CompositeExplicitAutograd) kernel serves CPU and CUDA tensors
// alike, except that batch-1 float64 1-D/2-D convolutions and sum pools of CPU tensors take direct
// loops (csrc/direct_conv.h: ATen's per-call cost is most of such a tiny convolution's time).
// Accumulation follows the program order: deterministic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "direct_conv.h"

#include <optional>
#include <vector>

namespace pathsgd {
namespace {

// Rule codes of both programs; keep in sync with pathsgd/reference.py (VJP_CONV, ...).
enum Rule : int64_t { kConv = 0, kLinear = 1, kAlias = 2, kReshape = 3, kAdd = 4, kScale = 5, kSumPool = 6 };

// Reads the instruction stream front to back.
struct Reader {
  at::IntArrayRef program;
  size_t pos = 0;
  int64_t next() {
    TORCH_CHECK(pos < program.size(), "pathsgd.abs_pow_vjp: truncated program at position ", pos);
    return program[pos++];
  }
  std::vector<int64_t> next_n(int64_t n) {
    std::vector<int64_t> out(n);
    for (auto& v : out) v = next();
    return out;
  }
};

std::vector<at::Tensor> abs_pow_vjp(at::TensorList values, at::TensorList leaves, at::TensorList seeds,
                                    at::IntArrayRef seed_slots, at::IntArrayRef program,
                                    at::ArrayRef<double> factors) {
  TORCH_CHECK(seeds.size() == seed_slots.size(), "pathsgd.abs_pow_vjp: ", seeds.size(), " seeds for ",
              seed_slots.size(), " seed slots");
  const int64_t slots = static_cast<int64_t>(values.size());
  const auto slot = [&](int64_t s) {
    TORCH_CHECK(s >= 0 && s < slots, "pathsgd.abs_pow_vjp: slot ", s, " out of range [0, ", slots, ")");
    return s;
  };
  const auto leaf = [&](int64_t l) {
    TORCH_CHECK(l >= -1 && l < static_cast<int64_t>(leaves.size()), "pathsgd.abs_pow_vjp: leaf ", l,
                " out of range");
    return l;
  };
  std::vector<at::Tensor> grads(slots);  // undefined: no gradient reached the slot yet
  const auto push = [&](int64_t s, const at::Tensor& g) {
    at::Tensor& acc = grads[slot(s)];
    acc = acc.defined() ? acc + g : g;
  };
  for (size_t i = 0; i < seeds.size(); ++i) push(seed_slots[i], seeds[i]);
  std::vector<at::Tensor> kappas(leaves.size());
  const auto add_kappa = [&](int64_t l, const at::Tensor& g) {
    if (l < 0) return;
    at::Tensor& acc = kappas[l];
    acc = acc.defined() ? acc + g : g;  // a module called twice (shared weights) sums its edges
  };

  Reader r{program};
  while (r.pos < program.size()) {
    const int64_t rule = r.next();
    const int64_t node = slot(r.next());
    const at::Tensor gy = grads[node];
    grads[node] = at::Tensor();
    // The instruction's operands are read even when no gradient reached the node.
    switch (rule) {
      case kConv: {
        const int64_t src = slot(r.next()), w = leaf(r.next()), b = leaf(r.next());
        const bool need_x = r.next() != 0;
        const int64_t nd = r.next();
        const auto stride = r.next_n(nd), padding = r.next_n(nd), dilation = r.next_n(nd);
        const int64_t groups = r.next();
        TORCH_CHECK(w >= 0, "pathsgd.abs_pow_vjp: a convolution needs a weight leaf");
        if (!gy.defined()) break;
        const at::Tensor& weight = leaves[w];
        const std::vector<int64_t> bias_sizes{weight.size(0)};
        auto [gx, gw, gb] =
            direct_conv_applies(values[src], weight, std::nullopt, nd)
                ? direct_conv_backward(gy, values[src], weight, b >= 0, need_x, stride, padding, dilation, groups)
                : at::convolution_backward(
                      gy, values[src], weight,
                      b >= 0 ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), stride, padding,
                      dilation, /*transposed=*/false, std::vector<int64_t>(nd, 0), groups, {need_x, true, b >= 0});
        add_kappa(w, gw);
        if (b >= 0) add_kappa(b, gb);
        if (need_x) push(src, gx);
        break;
      }
      case kLinear: {
        const int64_t src = slot(r.next()), w = leaf(r.next()), b = leaf(r.next());
        const bool need_x = r.next() != 0;
        TORCH_CHECK(w >= 0, "pathsgd.abs_pow_vjp: a linear layer needs a weight leaf");
        if (!gy.defined()) break;
        const at::Tensor& x = values[src];
        const at::Tensor g2 = gy.reshape({-1, gy.size(-1)});
        add_kappa(w, g2.t().mm(x.reshape({-1, x.size(-1)})));
        if (b >= 0) add_kappa(b, g2.sum(0));
        if (need_x) push(src, gy.matmul(leaves[w]));
        break;
      }
      case kAlias: {
        const int64_t src = r.next();
        if (gy.defined()) push(src, gy);
        break;
      }
      case kReshape: {
        const int64_t src = slot(r.next());
        if (gy.defined()) push(src, gy.reshape(values[src].sizes()));
        break;
      }
      case kAdd: {  // a residual addition: each branch gets gy, summed over its broadcast dims
        const auto srcs = r.next_n(r.next());
        if (!gy.defined()) break;
        for (int64_t src : srcs) push(src, gy.sum_to_size(values[slot(src)].sizes()));
        break;
      }
      case kScale: {
        const int64_t src = r.next(), f = r.next();
        TORCH_CHECK(f >= 0 && f < static_cast<int64_t>(factors.size()), "pathsgd.abs_pow_vjp: factor ", f,
                    " out of range");
        if (gy.defined()) push(src, gy * factors[f]);
        break;
      }
      case kSumPool: {  // a max pool of the model: a sum pool (edges of weight 1) in the abs-pow network
        const int64_t src = slot(r.next()), nd = r.next();
        const int64_t lifted = nd == 1 ? 2 : nd;  // 1-D pools run as 2-D ones (as in dag.sum_pool)
        const auto kernel = r.next_n(lifted), stride = r.next_n(lifted), padding = r.next_n(lifted);
        const bool ceil_mode = r.next() != 0;
        if (!gy.defined()) break;
        const at::Tensor& x = values[src];
        at::Tensor gx;
        if (direct_sum_pool_applies(x, nd)) {
          gx = direct_sum_pool_backward(gy, x, kernel, stride, padding, ceil_mode);
        } else if (nd == 1) {
          gx = at::avg_pool2d_backward(gy.unsqueeze(-2), x.unsqueeze(-2), kernel, stride, padding, ceil_mode,
                                       /*count_include_pad=*/true, /*divisor_override=*/1)
                   .squeeze(-2);
        } else if (nd == 2) {
          gx = at::avg_pool2d_backward(gy, x, kernel, stride, padding, ceil_mode, true, 1);
        } else {
          gx = at::avg_pool3d_backward(gy, x, kernel, stride, padding, ceil_mode, true, 1);
        }
        push(src, gx);
        break;
      }
      default:
        TORCH_CHECK(false, "pathsgd.abs_pow_vjp: unknown rule ", rule, " at position ", r.pos - 2);
    }
  }
  for (size_t l = 0; l < leaves.size(); ++l) {
    if (!kappas[l].defined()) kappas[l] = at::zeros_like(leaves[l]);  // a parameter no output depends on
  }
  return kappas;
}


// The window sums of a max pool of the model (a sum pool in the abs-pow network), as
// pooling.sum_pool: 1-D pools run as 2-D ones.
at::Tensor sum_pool(const at::Tensor& x, int64_t nd, at::IntArrayRef kernel, at::IntArrayRef stride,
                    at::IntArrayRef padding, bool ceil_mode) {
  if (direct_sum_pool_applies(x, nd)) return direct_sum_pool(x, nd, kernel, stride, padding, ceil_mode);
  if (nd == 1) {
    return at::avg_pool2d(x.unsqueeze(-2), kernel, stride, padding, ceil_mode, /*count_include_pad=*/true,
                          /*divisor_override=*/1)
        .squeeze(-2);
  }
  if (nd == 2) return at::avg_pool2d(x, kernel, stride, padding, ceil_mode, true, 1);
  return at::avg_pool3d(x, kernel, stride, padding, ceil_mode, true, 1);
}

std::vector<at::Tensor> abs_pow_forward(const at::Tensor& input, at::TensorList leaves, at::IntArrayRef program,
                                        at::ArrayRef<double> factors) {
  std::vector<at::Tensor> out;  // one value per instruction; operand -1 is the input
  const auto value = [&](int64_t i) -> const at::Tensor& {
    TORCH_CHECK(i >= -1 && i < static_cast<int64_t>(out.size()), "pathsgd.abs_pow_forward: operand ", i,
                " is not the input or an earlier instruction's value (", out.size(), " so far)");
    return i < 0 ? input : out[i];
  };
  const auto leaf = [&](int64_t l) -> std::optional<at::Tensor> {
    TORCH_CHECK(l >= -1 && l < static_cast<int64_t>(leaves.size()), "pathsgd.abs_pow_forward: leaf ", l,
                " out of range");
    return l < 0 ? std::nullopt : std::optional<at::Tensor>(leaves[l]);
  };
  Reader r{program};
  while (r.pos < program.size()) {
    const int64_t rule = r.next();
    const at::Tensor& x = value(r.next());
    switch (rule) {
      case kConv: {
        const auto w = leaf(r.next()), b = leaf(r.next());
        const int64_t nd = r.next();
        const auto stride = r.next_n(nd), padding = r.next_n(nd), dilation = r.next_n(nd);
        const int64_t groups = r.next();
        TORCH_CHECK(w.has_value(), "pathsgd.abs_pow_forward: a convolution needs a weight leaf");
        out.push_back(direct_conv_applies(x, *w, b, nd)
                          ? direct_conv_forward(x, *w, b, stride, padding, dilation, groups)
                          : at::convolution(x, *w, b, stride, padding, dilation, /*transposed=*/false,
                                            std::vector<int64_t>(nd, 0), groups));
        break;
      }
      case kLinear: {
        const auto w = leaf(r.next()), b = leaf(r.next());
        TORCH_CHECK(w.has_value(), "pathsgd.abs_pow_forward: a linear layer needs a weight leaf");
        out.push_back(at::linear(x, *w, b));
        break;
      }
      case kReshape: {  // a copy: an output never aliases another output or the input
        const auto shape = r.next_n(r.next());
        out.push_back(x.reshape(shape).clone());
        break;
      }
      case kAdd:
        out.push_back(x + value(r.next()));
        break;
      case kScale: {
        const int64_t f = r.next();
        TORCH_CHECK(f >= 0 && f < static_cast<int64_t>(factors.size()), "pathsgd.abs_pow_forward: factor ", f,
                    " out of range");
        out.push_back(x * factors[f]);
        break;
      }
      case kSumPool: {
        const int64_t nd = r.next();
        const int64_t lifted = nd == 1 ? 2 : nd;
        const auto kernel = r.next_n(lifted), stride = r.next_n(lifted), padding = r.next_n(lifted);
        out.push_back(sum_pool(x, nd, kernel, stride, padding, r.next() != 0));
        break;
      }
      default:
        TORCH_CHECK(false, "pathsgd.abs_pow_forward: unknown rule ", rule, " at position ", r.pos - 2);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsgd, CompositeExplicitAutograd, m) {
  m.impl("abs_pow_forward", &abs_pow_forward);
  m.impl("abs_pow_vjp", &abs_pow_vjp);
}

}  // namespace pathsgd
