// CUDA launchers: grid-stride loops over the element bodies of kernels/jagged.h. Sizes come
// from the host, offsets stay on the device, and the bodies clamp every index, so a launch
// never reads back from the GPU and never leaves the tensors whatever the offsets hold.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>

#include "kernels/jagged.h"
#include "launch.h"

namespace provcollate {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the device a few times over; the grid-stride loop covers the rest.
int64_t blocks_for(int64_t elements) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (elements + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t{sms} * 16));
}

template <typename word_t, typename index_t>
__global__ void pad_kernel(const word_t* __restrict__ values, const int64_t* __restrict__ offsets,
                           word_t* __restrict__ out, index_t n, index_t max_len, index_t words,
                           int64_t total, bool left, word_t fill) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    kernels::pad_element<word_t, index_t>(i, values, offsets, out, max_len, words, total, left, fill);
}

template <typename word_t, typename index_t>
__global__ void unpad_kernel(const word_t* __restrict__ padded, const int64_t* __restrict__ offsets,
                             word_t* __restrict__ out, index_t n, index_t max_len, index_t words,
                             int64_t total, bool left) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    kernels::unpad_element<word_t, index_t>(i, padded, offsets, out, max_len, words, total, left);
}

template <typename word_t, typename index_t>
__global__ void unpad_scatter_kernel(const word_t* __restrict__ padded,
                                     const int64_t* __restrict__ lengths,
                                     const int64_t* __restrict__ dst_offsets,
                                     word_t* __restrict__ dst, index_t n, index_t max_len,
                                     index_t words, int64_t dst_rows, bool left) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    kernels::unpad_scatter_element<word_t, index_t>(i, padded, lengths, dst_offsets, dst, max_len,
                                                    words, dst_rows, left);
}

// Calls launch(word_t{}, index_t{}, blocks, stream) for a launch over the padded side's words.
template <typename F>
void launch_over_padded(int64_t batch, int64_t max_len, int64_t row, int64_t unit, const F& launch) {
  const int64_t n = batch * max_len * (row / unit);
  if (n == 0) return;
  const int64_t blocks = blocks_for(n);
  const ElementGrid grid = element_grid(n, blocks * kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_word(unit, [&](auto word) {
    dispatch_index(grid.int64_index, [&](auto index) { launch(word, index, blocks, stream, n); });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor pad_cuda(const at::Tensor& values, const at::Tensor& offsets, int64_t max_len,
                    const at::Scalar& pad_value, bool left) {
  const c10::cuda::CUDAGuard guard(values.device());
  const PadArgs a = pad_args(values, offsets, max_len);
  at::Tensor out = at::empty(a.out_shape, values.options());
  const int64_t row = row_bytes(a.values, 1);
  const void* src = a.values.const_data_ptr();
  void* dst = out.data_ptr();
  // Built (and the pad value checked) even for an empty output: the same inputs are refused alike.
  const FillPattern fill(pad_value, values.scalar_type(), copy_unit(row, {src, dst}));
  if (out.numel() == 0) return out;
  launch_over_padded(a.batch, max_len, row, fill.unit, [&](auto word, auto index, int64_t blocks,
                                                            cudaStream_t stream, int64_t n) {
    using word_t = decltype(word);
    using index_t = decltype(index);
    word_t fill_word;
    std::memcpy(&fill_word, fill.bytes.data(), sizeof(word_t));
    pad_kernel<word_t, index_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const word_t*>(src), a.offsets.const_data_ptr<int64_t>(),
        static_cast<word_t*>(dst), static_cast<index_t>(n), static_cast<index_t>(max_len),
        static_cast<index_t>(row / fill.unit), a.total, left, fill_word);
  });
  return out;
}

at::Tensor unpad_cuda(const at::Tensor& padded, const at::Tensor& offsets, int64_t total,
                      bool left) {
  const c10::cuda::CUDAGuard guard(padded.device());
  const UnpadArgs a = unpad_args(padded, offsets, total);
  at::Tensor out = at::empty(a.out_shape, padded.options());
  const int64_t row = row_bytes(a.padded, 2);
  if (out.numel() == 0) return out;
  const void* src = a.padded.const_data_ptr();
  void* dst = out.data_ptr();
  const int64_t unit = copy_unit(row, {src, dst});
  launch_over_padded(a.batch, a.max_len, row, unit, [&](auto word, auto index, int64_t blocks,
                                                        cudaStream_t stream, int64_t n) {
    using word_t = decltype(word);
    using index_t = decltype(index);
    unpad_kernel<word_t, index_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const word_t*>(src), a.offsets.const_data_ptr<int64_t>(),
        static_cast<word_t*>(dst), static_cast<index_t>(n), static_cast<index_t>(a.max_len),
        static_cast<index_t>(row / unit), total, left);
  });
  return out;
}

void unpad_scatter_cuda(const at::Tensor& dst, const at::Tensor& padded,
                        const at::Tensor& lengths, const at::Tensor& dst_offsets, bool left) {
  const c10::cuda::CUDAGuard guard(padded.device());
  const ScatterArgs a = unpad_scatter_args(dst, padded, lengths, dst_offsets);
  const int64_t row = row_bytes(a.padded, 2);
  if (a.batch == 0 || row == 0 || a.max_len == 0) return;
  at::Tensor out = dst.is_contiguous() ? dst : dst.contiguous();
  const void* src = a.padded.const_data_ptr();
  void* base = out.data_ptr();
  const int64_t unit = copy_unit(row, {src, base});
  launch_over_padded(a.batch, a.max_len, row, unit, [&](auto word, auto index, int64_t blocks,
                                                        cudaStream_t stream, int64_t n) {
    using word_t = decltype(word);
    using index_t = decltype(index);
    unpad_scatter_kernel<word_t, index_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const word_t*>(src), a.lengths.const_data_ptr<int64_t>(),
        a.dst_offsets.const_data_ptr<int64_t>(), static_cast<word_t*>(base),
        static_cast<index_t>(n), static_cast<index_t>(a.max_len),
        static_cast<index_t>(row / unit), a.dst_rows, left);
  });
  if (!out.is_same(dst)) dst.copy_(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(provcollate, CUDA, m) {
  m.impl("pad", &pad_cuda);
  m.impl("unpad", &unpad_cuda);
  m.impl("unpad_scatter_", &unpad_scatter_cuda);
}

}  // namespace provcollate
