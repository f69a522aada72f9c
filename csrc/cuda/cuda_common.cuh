// Helpers shared by the CUDA kernels: argument checks (the same as the CPU
// kernels', plus device checks), hyper-parameter packing, device scalars read
// inside kernels (no host synchronization) and aligned vector loads.
//
// Only c10/cuda headers are included: ATen/cuda/CUDAContext.h needs cuSPARSE
// headers (DESIGN.md section 3).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "../checks.h"
#include "../path_sgd_math.h"

namespace pathsgd {
namespace cuda {

// A float64 scalar that lives either on the device (read inside the kernel, so
// the host never waits for it) or, when the caller passed a CPU tensor, by value.
struct DeviceScalar {
  const double* ptr = nullptr;
  double value = 0.0;
  __device__ __forceinline__ double get() const { return ptr != nullptr ? *ptr : value; }
};

// The multi-tensor update with materialized kappa (csrc/cuda/multi_tensor_kernels.cu).
void scaled_sgd_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            at::TensorList kappas, double p, at::ArrayRef<double> sgd,
                            const std::optional<at::Tensor>& lr_tensor);

inline void check_cuda_tensor(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "pathsgd.", op, ": ", name, " must be on ", device,
              " like the parameters, got a tensor on ", t.device());
}

inline void check_log_scale(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  checks::log_scale(t, name);
  TORCH_CHECK(t.is_cpu() || t.device() == device, "pathsgd.", op, ": ", name, " must be on ", device,
              " (or a CPU scalar), got a tensor on ", t.device());
}

// Reads a 0-dim float64 log scale without synchronizing: device pointer for a
// CUDA tensor, value for a CPU tensor (reading host memory costs no sync).
inline DeviceScalar log_scale_arg(const at::Tensor& t) {
  DeviceScalar s;
  if (t.is_cuda()) {
    s.ptr = t.const_data_ptr<double>();
  } else {
    s.value = t.item<double>();
  }
  return s;
}

// lr as a float64 scalar: a CUDA lr_tensor is converted on the stream (no
// sync) and read in the kernel; a CPU one is read on the host. `holder` keeps
// the converted tensor alive until the kernels are enqueued.
inline DeviceScalar lr_arg(double lr, const std::optional<at::Tensor>& lr_tensor, const at::Device& device,
                           const char* op, at::Tensor& holder) {
  DeviceScalar s;
  s.value = lr;
  if (!lr_tensor.has_value()) return s;
  const at::Tensor& t = *lr_tensor;
  TORCH_CHECK(t.numel() == 1, "pathsgd.", op, ": lr_tensor must have exactly one element, got shape ", t.sizes());
  TORCH_CHECK(!t.is_complex(), "pathsgd.", op, ": lr_tensor must be real, got dtype ", t.scalar_type());
  if (t.is_cpu()) {
    s.value = t.item<double>();
    return s;
  }
  TORCH_CHECK(t.device() == device, "pathsgd.", op, ": lr_tensor must be on ", device,
              " (or on the CPU), got a tensor on ", t.device());
  holder = t.to(at::kDouble).contiguous();
  s.ptr = holder.const_data_ptr<double>();
  return s;
}

template <typename S>
__device__ __forceinline__ SgdParams<S> with_lr(SgdParams<S> h, const DeviceScalar& lr) {
  h.lr = static_cast<S>(lr.get());
  return h;
}

// Runs fn on a contiguous version of `t` and writes the result back when `t`
// itself is not contiguous (stream-ordered, like everything else here).
template <typename Fn>
void with_contiguous(const at::Tensor& t, Fn&& fn) {
  if (t.is_contiguous()) {
    fn(t);
  } else {
    at::Tensor c = t.contiguous();
    fn(c);
    t.copy_(c);
  }
}

// Elements per 16-byte vector of scalar_t.
template <typename scalar_t>
constexpr int vec_size() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

// Loads/stores the N elements [i, i + N) of p as 16-byte accesses when
// kAligned (the caller guarantees 16-byte alignment of p + i and i + N <= n),
// else element-wise with a bound (elements past n read as 0 and are not
// written). The arithmetic done on the values is the same either way, so
// results never depend on the alignment of the tensors.
template <bool kAligned, int N, typename T, typename O>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int64_t i, int64_t n, O (&out)[N]) {
  if constexpr (kAligned) {
    constexpr int P = (N * sizeof(T) < 16) ? N : static_cast<int>(16 / sizeof(T));
    static_assert(N % P == 0, "chunk must be a whole number of 16-byte pieces");
#pragma unroll
    for (int q = 0; q < N / P; ++q) {
      const AlignedVec<T, P> v = *reinterpret_cast<const AlignedVec<T, P>*>(p + i + q * P);
#pragma unroll
      for (int k = 0; k < P; ++k) out[q * P + k] = static_cast<O>(v.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = (i + k < n) ? static_cast<O>(p[i + k]) : O(0);
  }
}

template <bool kAligned, int N, typename T, typename O>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, int64_t i, int64_t n, const O (&in)[N]) {
  if constexpr (kAligned) {
    constexpr int P = (N * sizeof(T) < 16) ? N : static_cast<int>(16 / sizeof(T));
    static_assert(N % P == 0, "chunk must be a whole number of 16-byte pieces");
#pragma unroll
    for (int q = 0; q < N / P; ++q) {
      AlignedVec<T, P> v;
#pragma unroll
      for (int k = 0; k < P; ++k) v.v[k] = static_cast<T>(in[q * P + k]);
      *reinterpret_cast<AlignedVec<T, P>*>(p + i + q * P) = v;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (i + k < n) p[i + k] = static_cast<T>(in[k]);
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace pathsgd
