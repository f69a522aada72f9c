// CUDA multi-tensor kernels: the Path-SGD update with a materialized float64
// kappa (convolution weights, biases) and clamp_ (WGAN weight clipping).
// Same semantics as csrc/cpu/multi_tensor_kernels.cpp.
//
// Launch scheme (MultiTensorApply style, as in apex / torch's foreach kernels):
// tensors of one dtype are cut into chunks of kChunkSize elements; one block
// handles one chunk; the pointers, sizes and the block -> (tensor, chunk) map
// travel in a kernel argument (TensorListMeta, < 4 KB), so many small tensors
// cost one launch per kMaxTensors tensors / kMaxBlocks chunks. Element-wise
// only: there is no reduction, so results are trivially deterministic.
#include <array>
#include <cmath>
#include <limits>
#include <map>
#include <vector>

#include "cuda_common.cuh"

namespace pathsgd {
namespace cuda {
namespace {

constexpr int64_t kChunkSize = 65536;
constexpr int kBlockThreads = 512;
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 256;

template <int kDepth>
struct TensorListMeta {
  void* ptrs[kDepth][kMaxTensors];
  int64_t sizes[kMaxTensors];
  int32_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListMeta<4>) <= 4000, "kernel argument must stay below 4 KB");

// Calls launch(meta, num_blocks) for batches of `lists` (each entry: kDepth
// contiguous tensors of the same numel, nullptr-able slots as undefined tensors).
template <int kDepth, typename Launch>
void multi_tensor_apply(const std::vector<std::array<at::Tensor, kDepth>>& lists, Launch&& launch) {
  TensorListMeta<kDepth> meta;
  int ntensors = 0, nblocks = 0;
  for (const auto& entry : lists) {
    const int64_t n = entry[0].numel();
    if (n == 0) continue;
    int idx = ntensors++;
    for (int d = 0; d < kDepth; ++d) {
      meta.ptrs[d][idx] = entry[d].defined() ? entry[d].data_ptr() : nullptr;
    }
    meta.sizes[idx] = n;
    const int64_t chunks = ceil_div(n, kChunkSize);
    TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "pathsgd: tensor too large (", n, " elements)");
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[nblocks] = idx;
      meta.block_to_chunk[nblocks] = static_cast<int32_t>(c);
      ++nblocks;
      const bool last_chunk = c == chunks - 1;
      if (nblocks == kMaxBlocks || (ntensors == kMaxTensors && last_chunk)) {
        launch(meta, nblocks);
        nblocks = 0;
        if (last_chunk) {
          ntensors = 0;
        } else {
          // The tensor continues in the next launch as entry 0.
          for (int d = 0; d < kDepth; ++d) meta.ptrs[d][0] = meta.ptrs[d][idx];
          meta.sizes[0] = meta.sizes[idx];
          ntensors = 1;
          idx = 0;
        }
      }
    }
  }
  if (nblocks > 0) launch(meta, nblocks);
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0;
}

// ptrs: 0 param, 1 grad, 2 momentum buffer (or nullptr), 3 kappa (float64).
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    scaled_update_kernel(TensorListMeta<4> meta, SgdParams<at::opmath_type<scalar_t>> h, DeviceScalar lr, double e) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int VEC = vec_size<scalar_t>();
  const int tensor = meta.block_to_tensor[blockIdx.x];
  const int64_t n = meta.sizes[tensor];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t end = begin + kChunkSize < n ? begin + kChunkSize : n;
  scalar_t* __restrict__ W = static_cast<scalar_t*>(meta.ptrs[0][tensor]);
  const scalar_t* __restrict__ G = static_cast<const scalar_t*>(meta.ptrs[1][tensor]);
  scalar_t* __restrict__ B = static_cast<scalar_t*>(meta.ptrs[2][tensor]);
  const double* __restrict__ K = static_cast<const double*>(meta.ptrs[3][tensor]);
  const SgdParams<opmath_t> hh = with_lr(h, lr);
  const bool read_buf = B != nullptr && !hh.first_step;
  const bool aligned = aligned16(W) && aligned16(G) && aligned16(B) && aligned16(K);
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * VEC; i < end;
       i += static_cast<int64_t>(blockDim.x) * VEC) {
    opmath_t wv[VEC], gv[VEC], bv[VEC];
    double kv[VEC];
    // Element-wise: the vector and scalar paths compute the same values.
    const bool vec = aligned && i + VEC <= end;
    if (vec) {
      load_chunk<true, VEC>(W, i, end, wv);
      load_chunk<true, VEC>(G, i, end, gv);
      load_chunk<true, VEC>(K, i, end, kv);
      if (read_buf) load_chunk<true, VEC>(B, i, end, bv);
    } else {
      load_chunk<false, VEC>(W, i, end, wv);
      load_chunk<false, VEC>(G, i, end, gv);
      load_chunk<false, VEC>(K, i, end, kv);
      if (read_buf) load_chunk<false, VEC>(B, i, end, bv);
    }
    if (!read_buf) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) bv[k] = opmath_t(0);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      // kappa^(2/p) in float64: kappa may exceed the parameter's range.
      const double kp = e == 1.0 ? kv[k] : ::pow(kv[k], e);
      wv[k] = path_sgd_element(wv[k], gv[k], bv[k], static_cast<opmath_t>(kp), hh);
    }
    if (vec) {
      store_chunk<true, VEC>(W, i, end, wv);
      if (B != nullptr) store_chunk<true, VEC>(B, i, end, bv);
    } else {
      store_chunk<false, VEC>(W, i, end, wv);
      if (B != nullptr) store_chunk<false, VEC>(B, i, end, bv);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    clamp_kernel(TensorListMeta<1> meta, at::opmath_type<scalar_t> lo, at::opmath_type<scalar_t> hi) {
  using opmath_t = at::opmath_type<scalar_t>;
  using M = MathOps<opmath_t>;
  constexpr int VEC = vec_size<scalar_t>();
  const int tensor = meta.block_to_tensor[blockIdx.x];
  const int64_t n = meta.sizes[tensor];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t end = begin + kChunkSize < n ? begin + kChunkSize : n;
  scalar_t* __restrict__ X = static_cast<scalar_t*>(meta.ptrs[0][tensor]);
  const bool aligned = aligned16(X);
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * VEC; i < end;
       i += static_cast<int64_t>(blockDim.x) * VEC) {
    opmath_t v[VEC];
    const bool vec = aligned && i + VEC <= end;
    if (vec) {
      load_chunk<true, VEC>(X, i, end, v);
    } else {
      load_chunk<false, VEC>(X, i, end, v);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = M::min_keep_nan(M::max_keep_nan(v[k], lo), hi);
    if (vec) {
      store_chunk<true, VEC>(X, i, end, v);
    } else {
      store_chunk<false, VEC>(X, i, end, v);
    }
  }
}

}  // namespace

void scaled_sgd_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            at::TensorList kappas, double p, double lr, double momentum, double dampening,
                            double weight_decay, bool nesterov, bool maximize, bool first_step, double eps,
                            std::optional<double> clamp_min, std::optional<double> clamp_max,
                            const std::optional<at::Tensor>& lr_tensor) {
  constexpr const char* op = "scaled_sgd_update_";
  const bool use_buffer = momentum != 0.0;
  checks::scaled_sgd_update_args(params, grads, momentum_buffers, kappas, p, momentum);
  if (params.empty()) return;
  TORCH_CHECK(params[0].is_cuda(), "pathsgd.scaled_sgd_update_: params must be CUDA tensors, got ",
              params[0].device());
  const at::Device device = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {  // the device checks (the rest: checks::scaled_sgd_update_args)
    TORCH_CHECK(params[i].device() == device, "pathsgd.scaled_sgd_update_: param ", i, " is on ",
                params[i].device(), ", expected ", device, " like param 0");
    TORCH_CHECK(grads[i].device() == device, "pathsgd.scaled_sgd_update_: grad ", i, " is on ", grads[i].device(),
                ", expected ", device);
    TORCH_CHECK(kappas[i].device() == device, "pathsgd.scaled_sgd_update_: kappa ", i, " is on ",
                kappas[i].device(), ", expected ", device);
    if (use_buffer) {
      TORCH_CHECK(momentum_buffers[i].device() == device, "pathsgd.scaled_sgd_update_: momentum buffer ", i,
                  " is on ", momentum_buffers[i].device(), ", expected ", device);
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  at::Tensor lr_holder;
  const DeviceScalar lr_scalar = lr_arg(lr, lr_tensor, device, op, lr_holder);

  // Contiguous views (copies for non-contiguous params, written back at the end), grouped by dtype.
  std::map<at::ScalarType, std::vector<std::array<at::Tensor, 4>>> groups;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor w = params[i];
    if (!w.is_contiguous()) {
      w = params[i].contiguous();
      write_back.emplace_back(params[i], w);
    }
    groups[w.scalar_type()].push_back(
        {w, grads[i].contiguous(), use_buffer ? momentum_buffers[i] : at::Tensor(), kappas[i].contiguous()});
  }
  const double e = 2.0 / p;
  for (const auto& group : groups) {
    const auto& lists = group.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "scaled_sgd_update_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto h = make_sgd_params<opmath_t>(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                                               eps, clamp_min, clamp_max);
      multi_tensor_apply<4>(lists, [&](const TensorListMeta<4>& meta, int nblocks) {
        scaled_update_kernel<scalar_t><<<nblocks, kBlockThreads, 0, stream>>>(meta, h, lr_scalar, e);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  for (auto& [param, copy] : write_back) param.copy_(copy);
}

namespace {

void clamp_cuda(at::TensorList tensors, double lo, double hi) {
  TORCH_CHECK(lo <= hi, "pathsgd.clamp_: lo must be <= hi, got lo=", lo, ", hi=", hi);
  if (tensors.empty()) return;
  TORCH_CHECK(tensors[0].is_cuda(), "pathsgd.clamp_: tensors must be CUDA tensors, got ", tensors[0].device());
  const at::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == device, "pathsgd.clamp_: tensor ", i, " is on ", tensors[i].device(),
                ", expected ", device, " like tensor 0");
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  std::map<at::ScalarType, std::vector<std::array<at::Tensor, 1>>> groups;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  for (const at::Tensor& t : tensors) {
    at::Tensor c = t;
    if (!t.is_contiguous()) {
      c = t.contiguous();
      write_back.emplace_back(t, c);
    }
    groups[c.scalar_type()].push_back({c});
  }
  for (const auto& group : groups) {
    const auto& lists = group.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "clamp_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const opmath_t l = static_cast<opmath_t>(lo), u = static_cast<opmath_t>(hi);
      multi_tensor_apply<1>(lists, [&](const TensorListMeta<1>& meta, int nblocks) {
        clamp_kernel<scalar_t><<<nblocks, kBlockThreads, 0, stream>>>(meta, l, u);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  for (auto& [t, copy] : write_back) t.copy_(copy);
}

}  // namespace

TORCH_LIBRARY_IMPL(pathsgd, CUDA, m) {
  m.impl("scaled_sgd_update_", &scaled_sgd_update_cuda);
  m.impl("clamp_", &clamp_cuda);
}

}  // namespace cuda
}  // namespace pathsgd
