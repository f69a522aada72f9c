// CUDA multi-tensor kernels: the Path-SGD update with a materialized float64
// kappa (convolution weights, biases) and clamp_ (WGAN weight clipping).
// Same semantics as csrc/cpu/multi_tensor_kernels.cpp.
//
// Launch scheme (apex's multi_tensor_apply with functors, as torch's foreach kernels):
// tensors of one dtype are cut into chunks of kChunkSize elements; one block
// handles one chunk; the pointers, sizes and the block -> (tensor, chunk) map
// travel in a kernel argument (TensorListMeta, < 4 KB), so many small tensors
// cost one launch per kMaxTensors tensors / kMaxBlocks chunks. The one launcher
// kernel decodes the chunk; each op is a functor over its chunk. Element-wise
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
  int32_t element_bytes[kDepth];  // of each list (its tensors share one dtype)
};
static_assert(sizeof(TensorListMeta<4>) <= 4000, "kernel argument must stay below 4 KB");

// One block's share of the lists, decoded once by multi_tensor_apply_kernel: the kDepth pointers
// at the chunk's first element (nullptr for an absent tensor) and the chunk's length.
template <int kDepth>
struct Chunk {
  void* ptrs[kDepth];
  int64_t n;

  template <typename T>
  __device__ __forceinline__ T* get(int d) const {
    return static_cast<T*>(ptrs[d]);
  }
};

// The one kernel of every multi-tensor op (apex's multi_tensor_apply): block -> (tensor, chunk),
// then the functor's element-wise body over that chunk.
template <int kDepth, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_apply_kernel(TensorListMeta<kDepth> meta, Functor functor, Args... args) {
  const int tensor = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t left = meta.sizes[tensor] - begin;
  Chunk<kDepth> chunk;
  chunk.n = left < kChunkSize ? left : kChunkSize;
#pragma unroll
  for (int d = 0; d < kDepth; ++d) {
    char* base = static_cast<char*>(meta.ptrs[d][tensor]);
    chunk.ptrs[d] = base == nullptr ? nullptr : base + begin * meta.element_bytes[d];
  }
  functor(chunk, args...);
}

// Launches multi_tensor_apply_kernel<Functor> over `lists` (each entry: kDepth contiguous tensors
// of the same numel; an undefined tensor is an absent slot), in batches of at most kMaxTensors
// tensors and kMaxBlocks chunks per launch.
template <int kDepth, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<std::array<at::Tensor, kDepth>>& lists, cudaStream_t stream,
                        Functor functor, Args... args) {
  TensorListMeta<kDepth> meta;
  for (int d = 0; d < kDepth; ++d) meta.element_bytes[d] = 0;
  for (const auto& entry : lists) {
    for (int d = 0; d < kDepth; ++d) {
      if (entry[d].defined()) meta.element_bytes[d] = static_cast<int32_t>(entry[d].element_size());
    }
  }
  const auto launch = [&](int nblocks) {
    multi_tensor_apply_kernel<kDepth><<<nblocks, kBlockThreads, 0, stream>>>(meta, functor, args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
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
        launch(nblocks);
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
  if (nblocks > 0) launch(nblocks);
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0;
}

// Chunk slots: 0 param, 1 grad, 2 momentum buffer (or nullptr), 3 kappa (float64).
template <typename scalar_t>
struct ScaledUpdateFunctor {
  using opmath_t = at::opmath_type<scalar_t>;

  __device__ __forceinline__ void operator()(const Chunk<4>& chunk, SgdParams<opmath_t> h, DeviceScalar lr,
                                             double e) const {
    constexpr int VEC = vec_size<scalar_t>();
    const int64_t n = chunk.n;
    scalar_t* __restrict__ W = chunk.get<scalar_t>(0);
    const scalar_t* __restrict__ G = chunk.get<scalar_t>(1);
    scalar_t* __restrict__ B = chunk.get<scalar_t>(2);
    const double* __restrict__ K = chunk.get<double>(3);
    const SgdParams<opmath_t> hh = with_lr(h, lr);
    const bool read_buf = B != nullptr && !hh.first_step;
    const bool aligned = aligned16(W) && aligned16(G) && aligned16(B) && aligned16(K);
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < n; i += static_cast<int64_t>(blockDim.x) * VEC) {
      opmath_t wv[VEC], gv[VEC], bv[VEC];
      double kv[VEC];
      // Element-wise: the vector and scalar paths compute the same values.
      const bool vec = aligned && i + VEC <= n;
      if (vec) {
        load_chunk<true, VEC>(W, i, n, wv);
        load_chunk<true, VEC>(G, i, n, gv);
        load_chunk<true, VEC>(K, i, n, kv);
        if (read_buf) load_chunk<true, VEC>(B, i, n, bv);
      } else {
        load_chunk<false, VEC>(W, i, n, wv);
        load_chunk<false, VEC>(G, i, n, gv);
        load_chunk<false, VEC>(K, i, n, kv);
        if (read_buf) load_chunk<false, VEC>(B, i, n, bv);
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
        store_chunk<true, VEC>(W, i, n, wv);
        if (B != nullptr) store_chunk<true, VEC>(B, i, n, bv);
      } else {
        store_chunk<false, VEC>(W, i, n, wv);
        if (B != nullptr) store_chunk<false, VEC>(B, i, n, bv);
      }
    }
  }
};

template <typename scalar_t>
struct ClampFunctor {
  using opmath_t = at::opmath_type<scalar_t>;

  __device__ __forceinline__ void operator()(const Chunk<1>& chunk, opmath_t lo, opmath_t hi) const {
    using M = MathOps<opmath_t>;
    constexpr int VEC = vec_size<scalar_t>();
    const int64_t n = chunk.n;
    scalar_t* __restrict__ X = chunk.get<scalar_t>(0);
    const bool aligned = aligned16(X);
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < n; i += static_cast<int64_t>(blockDim.x) * VEC) {
      opmath_t v[VEC];
      const bool vec = aligned && i + VEC <= n;
      if (vec) {
        load_chunk<true, VEC>(X, i, n, v);
      } else {
        load_chunk<false, VEC>(X, i, n, v);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = M::min_keep_nan(M::max_keep_nan(v[k], lo), hi);
      if (vec) {
        store_chunk<true, VEC>(X, i, n, v);
      } else {
        store_chunk<false, VEC>(X, i, n, v);
      }
    }
  }
};

}  // namespace

void scaled_sgd_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            at::TensorList kappas, double p, at::ArrayRef<double> sgd,
                            const std::optional<at::Tensor>& lr_tensor) {
  constexpr const char* op = "scaled_sgd_update_";
  const SgdArgs a = checks::sgd_args(sgd, op);
  const bool use_buffer = a.momentum != 0.0;
  checks::scaled_sgd_update_args(params, grads, momentum_buffers, kappas, p, a.momentum);
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
  const DeviceScalar lr_scalar = lr_arg(a.lr, lr_tensor, device, op, lr_holder);

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
      const auto h = make_sgd_params<opmath_t>(a, a.lr);
      multi_tensor_apply<4>(lists, stream, ScaledUpdateFunctor<scalar_t>{}, h, lr_scalar, e);
    });
  }
  for (auto& [param, copy] : write_back) param.copy_(copy);
}

namespace {

void clamp_cuda(at::TensorList tensors, double lo, double hi) {
  checks::clamp_args(tensors, lo, hi);
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
      multi_tensor_apply<1>(lists, stream, ClampFunctor<scalar_t>{}, l, u);
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
