// The small tensors of one op call (gammas, log scales, kappa factors, partial sums) carved from a
// caller's workspace: a byte tensor kept by the optimizer's step plan across steps, so that a
// step allocates nothing once the workspace has its size (and a CUDA step can be captured in a
// graph). Without a workspace, or past its end, they are fresh allocations; at the end of the call
// a workspace too small for it grows to what the call took, so the next call with the same shapes
// finds everything in it. The tensors are views of the workspace: nothing an op returns may be one.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pathsgd {

class Workspace {
 public:
  Workspace() = default;
  explicit Workspace(const std::optional<at::Tensor>& buffer) {
    if (buffer.has_value() && buffer->defined()) buffer_ = *buffer;
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // An uninitialized tensor of `sizes` with `options` (contiguous, 64-byte aligned in the workspace).
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    if (!buffer_.defined() || options.device() != buffer_.device()) return at::empty(sizes, options);
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
    const int64_t offset = used_;
    used_ += (bytes + kAlign - 1) / kAlign * kAlign;
    if (used_ > buffer_.numel()) return at::empty(sizes, options);
    return buffer_.narrow(0, offset, bytes).view(options.dtype().toScalarType()).view(sizes);
  }

  // Grows the workspace to what this call took (the tensors handed out keep their storage).
  void finish() {
    if (buffer_.defined() && used_ > buffer_.numel()) buffer_.resize_({used_});
  }

 private:
  static constexpr int64_t kAlign = 64;
  at::Tensor buffer_;  // uint8, on the op's device
  int64_t used_ = 0;
};

}  // namespace pathsgd
