// Direct CPU loops for the convolutions and sum pools of the abs-pow network
// (csrc/abs_pow_programs.cpp): batch 1, float64, 1-D or 2-D. Such a convolution is ~10^5
// multiply-adds, which ATen's convolution (and its backward) wraps in 20-70 us of dispatch, im2col
// buffers and thread hand-offs per call; these loops run it on the calling thread. Fixed loop order: deterministic.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace pathsgd {

// True when the direct loops take this convolution: CPU float64 tensors, batch 1, nd in {1, 2},
// contiguous input and weight (and bias), at most 2^18 weights x input positions (above that ATen is faster).
bool direct_conv_applies(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t nd);

// at::convolution(x, weight, bias, stride, padding, dilation, transposed=false, output_padding=0, groups).
at::Tensor direct_conv_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups);

// at::convolution_backward(gy, x, weight, ...) with output_mask {need_x, true, has_bias}: (grad of x or
// undefined, grad of weight, grad of bias or undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_conv_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight, bool has_bias, bool need_x,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// True when the direct loops take this sum pool: a CPU float64 contiguous batch-1 input, nd in {1, 2}.
bool direct_sum_pool_applies(const at::Tensor& x, int64_t nd);

// The window sums of a max pool of the model (at::avg_pool2d with count_include_pad and divisor 1:
// zero padding), kernel / stride / padding lifted to 2-D for nd = 1 (pathsgd/pooling.py), and their
// backward (at::avg_pool2d_backward's): the same additions in the same order.
at::Tensor direct_sum_pool(const at::Tensor& x, int64_t nd, at::IntArrayRef kernel, at::IntArrayRef stride,
                           at::IntArrayRef padding, bool ceil_mode);
at::Tensor direct_sum_pool_backward(const at::Tensor& gy, const at::Tensor& x, at::IntArrayRef kernel,
                                    at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode);

}  // namespace pathsgd
