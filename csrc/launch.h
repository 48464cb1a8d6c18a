// Host-side pieces every launcher needs: argument checks, the row geometry of an op, and the
// bytes of the pad value. Validation lives here so that CPU and CUDA launchers reject exactly
// the same inputs with exactly the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/core/Scalar.h>

#include "kernels/jagged.h"

#include <array>
#include <cstdint>
#include <vector>

namespace provcollate {

// PROVCOLLATE_CHECK=1: validate offsets that live on a GPU too (costs a device-to-host copy).
bool checked_mode();

// A 1-D int32/int64 tensor of `numel` elements on `device`, as contiguous int64.
at::Tensor index_arg(const char* op, const char* name, const at::Tensor& t, int64_t numel,
                     const c10::Device& device);

// offsets must start at 0, never decrease, hold no item longer than max_len and end at total.
// Checked when the offsets are on the CPU, or in checked mode.
void check_offsets(const char* op, const at::Tensor& offsets, int64_t total, int64_t max_len);

// lengths in [0, max_len], dst_offsets >= 0 and dst_offsets + lengths <= dst_rows.
void check_scatter(const char* op, const at::Tensor& lengths, const at::Tensor& dst_offsets,
                   int64_t dst_rows, int64_t max_len);

void check_size_arg(const char* op, const char* name, int64_t value);

// Each op's arguments, checked and made contiguous (index tensors as int64), with the sizes
// its launchers need. Built once per call by the op's first line, on any backend.
struct PadArgs {
  at::Tensor values, offsets;
  int64_t batch, total, max_len;
  std::vector<int64_t> out_shape;
};
PadArgs pad_args(const at::Tensor& values, const at::Tensor& offsets, int64_t max_len);

struct UnpadArgs {
  at::Tensor padded, offsets;
  int64_t batch, max_len, total;
  std::vector<int64_t> out_shape;
};
UnpadArgs unpad_args(const at::Tensor& padded, const at::Tensor& offsets, int64_t total);

struct ScatterArgs {
  at::Tensor padded, lengths, dst_offsets;
  int64_t batch, max_len, dst_rows;
};
ScatterArgs unpad_scatter_args(const at::Tensor& dst, const at::Tensor& padded,
                               const at::Tensor& lengths, const at::Tensor& dst_offsets);

// Bytes of one row: one position with all its trailing dims.
int64_t row_bytes(const at::Tensor& t, int64_t leading_dims);

// Largest power of two <= 16 dividing row_bytes and the address of every pointer: the widest
// word a launcher may move rows in.
int64_t copy_unit(int64_t row_bytes, std::initializer_list<const void*> ptrs);

// Calls f(word_t{}) with the unsigned word of `unit` bytes (1, 2, 4, 8 or 16).
template <typename F>
void dispatch_word(int64_t unit, const F& f) {
  switch (unit) {
    case 1: return f(uint8_t{});
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    case 8: return f(uint64_t{});
    case 16: return f(kernels::Word16{});
    default: TORCH_INTERNAL_ASSERT(false, "provcollate: no word of ", unit, " bytes");
  }
}

// Elements a launch of the element bodies covers, and whether their index needs 64 bits
// (32-bit division is several times cheaper on a GPU, so it is used whenever it is safe).
struct ElementGrid {
  int64_t elements;
  bool int64_index;
};
ElementGrid element_grid(int64_t elements, int64_t stride_slack);

template <typename F>
void dispatch_index(bool int64_index, const F& f) {
  if (int64_index) return f(int64_t{});
  return f(int32_t{});
}

// PROVCOLLATE_EMULATE_DEVICE=1 runs the CPU ops through the CUDA element bodies instead of the
// CPU copy loops, choosing words and index widths as a CUDA launch would; =int64 forces 64-bit
// indices. For tests: it lets a machine without a GPU run the GPU's index arithmetic.
enum class Emulation { off, device, int64 };
Emulation emulation();

// A value as one element of dtype, converted as at::full (fill_) converts it: a c10::Error when
// it overflows the dtype, a silent wrap where fill_ wraps (-100 into uint8 is 156). `value` is
// the converted element read back, to compare with what was asked for.
struct Element {
  std::array<uint8_t, 16> bytes{};
  int64_t size = 0;
  c10::Scalar value;
};
Element to_element(const c10::Scalar& value, c10::ScalarType dtype);

// Whether `e` (value converted to dtype) still stands for value: for floating dtypes, false where a
// finite value overflowed to inf; for integers and bool, false where the conversion wrapped or
// truncated it; always for complex.
bool represents(const c10::Scalar& value, c10::ScalarType dtype, const Element& e);

// The pad value converted to the tensor's dtype and repeated to fill `unit` bytes.
struct FillPattern {
  std::array<uint8_t, 16> bytes{};
  int64_t unit = 1;
  bool zero = true;
  FillPattern(const c10::Scalar& value, c10::ScalarType dtype, int64_t unit);
  // Writes the pattern over `bytes` bytes (a whole number of units) at dst, aligned to `unit`.
  void fill(char* dst, int64_t bytes) const;
};

}  // namespace provcollate
