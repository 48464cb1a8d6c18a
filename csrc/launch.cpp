#include "launch.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

namespace provcollate {

bool checked_mode() {
  static const bool on = [] {
    const char* v = std::getenv("PROVCOLLATE_CHECK");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

Emulation emulation() {
  const char* v = std::getenv("PROVCOLLATE_EMULATE_DEVICE");
  if (v == nullptr || std::string(v).empty() || std::string(v) == "0") return Emulation::off;
  if (std::string(v) == "int64") return Emulation::int64;
  TORCH_CHECK_VALUE(std::string(v) == "1", "PROVCOLLATE_EMULATE_DEVICE must be 0, 1 or int64, "
                    "got '", v, "'");
  return Emulation::device;
}

ElementGrid element_grid(int64_t elements, int64_t stride_slack) {
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  return ElementGrid{elements, elements > kInt32Max - stride_slack};
}

void check_size_arg(const char* op, const char* name, int64_t value) {
  TORCH_CHECK_VALUE(value >= 0, op, ": ", name, " must be >= 0, got ", value);
}

at::Tensor index_arg(const char* op, const char* name, const at::Tensor& t, int64_t numel,
                     const c10::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", name,
                   " must be an int32 or int64 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.numel() == numel, op, ": ", name, " must have ", numel,
                    " elements, got ", t.numel());
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device,
                    " like the data, got ", t.device());
  return t.to(at::kLong).contiguous();
}

namespace {
at::Tensor on_host_if_checked(const at::Tensor& t) {
  if (t.is_cpu()) return t;
  return checked_mode() ? t.cpu() : at::Tensor();
}
}  // namespace

void check_offsets(const char* op, const at::Tensor& offsets, int64_t total, int64_t max_len) {
  const at::Tensor host = on_host_if_checked(offsets);
  if (!host.defined()) return;
  const int64_t* o = host.data_ptr<int64_t>();
  const int64_t batch = host.numel() - 1;
  TORCH_CHECK_VALUE(o[0] == 0, op, ": offsets must start at 0, got offsets[0] = ", o[0]);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = o[b + 1] - o[b];
    TORCH_CHECK_VALUE(len >= 0, op, ": offsets must not decrease, got offsets[", b, "] = ", o[b],
                      " > offsets[", b + 1, "] = ", o[b + 1]);
    TORCH_CHECK_VALUE(len <= max_len, op, ": item ", b, " has length ", len,
                      " (offsets[", b + 1, "] - offsets[", b, "]), more than max_len = ", max_len);
  }
  TORCH_CHECK_VALUE(o[batch] == total, op, ": offsets must end at the number of rows, ", total,
                    ", got offsets[", batch, "] = ", o[batch]);
}

void check_scatter(const char* op, const at::Tensor& lengths, const at::Tensor& dst_offsets,
                   int64_t dst_rows, int64_t max_len) {
  const at::Tensor l_host = on_host_if_checked(lengths);
  if (!l_host.defined()) return;
  const at::Tensor d_host = on_host_if_checked(dst_offsets);
  const int64_t* l = l_host.data_ptr<int64_t>();
  const int64_t* d = d_host.data_ptr<int64_t>();
  for (int64_t b = 0; b < l_host.numel(); ++b) {
    TORCH_CHECK_VALUE(l[b] >= 0 && l[b] <= max_len, op, ": lengths[", b, "] must be in [0, ",
                      max_len, "] (padded.size(1)), got ", l[b]);
    TORCH_CHECK_VALUE(d[b] >= 0 && d[b] <= dst_rows - l[b], op, ": rows [", d[b], ", ",
                      d[b] + l[b], ") of item ", b, " (dst_offsets[", b, "] + lengths[", b,
                      "]) must lie inside dst's ", dst_rows, " rows");
  }
}

int64_t row_bytes(const at::Tensor& t, int64_t leading_dims) {
  int64_t n = static_cast<int64_t>(t.element_size());
  for (int64_t d = leading_dims; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

int64_t copy_unit(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  int64_t unit = 16;
  while (unit > 1 && row_bytes % unit != 0) unit /= 2;
  for (const void* p : ptrs) {
    while (unit > 1 && reinterpret_cast<uintptr_t>(p) % unit != 0) unit /= 2;
  }
  return unit;
}

// As fill_ converts: float16 and bfloat16 round (1e10 becomes inf), every other dtype checks
// overflow (1e40 into float32 or 300 into int8 is an error); -100 into uint8 wraps to 156.
template <typename T>
T element_of(const c10::Scalar& value) {
  if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) {
    return static_cast<T>(value.toDouble());
  } else {
    return value.to<T>();
  }
}

Element to_element(const c10::Scalar& value, c10::ScalarType dtype) {
  Element e;
  switch (dtype) {
    // The dtypes batches hold: a cast.
    case at::kBool: case at::kByte: case at::kChar: case at::kShort: case at::kInt: case at::kLong:
    case at::kHalf: case at::kBFloat16: case at::kFloat: case at::kDouble:
    case at::kComplexFloat: case at::kComplexDouble:
      AT_DISPATCH_ALL_TYPES_AND_COMPLEX_AND3(at::kBool, at::kHalf, at::kBFloat16, dtype, "to_element", [&] {
        const scalar_t x = element_of<scalar_t>(value);
        e.size = sizeof(scalar_t);
        std::memcpy(e.bytes.data(), &x, sizeof(scalar_t));
        e.value = c10::Scalar(x);
      });
      return e;
    default: {  // anything else through a 0-d tensor, which knows every dtype
      const at::Tensor one = at::full({}, value, at::TensorOptions().dtype(dtype));
      e.size = static_cast<int64_t>(one.element_size());
      TORCH_INTERNAL_ASSERT(e.size <= 16);
      std::memcpy(e.bytes.data(), one.const_data_ptr(), e.size);
      e.value = one.item();
      return e;
    }
  }
}

bool represents(const c10::Scalar& value, c10::ScalarType dtype, const Element& e) {
  const c10::Scalar& back = e.value;
  if (c10::isComplexType(dtype) || value.isComplex()) return true;
  if (!c10::isIntegralType(dtype, /*includeBool=*/true)) {
    // 1e5 in float16 would pad with inf: only a value that is itself infinite may become one.
    return !std::isfinite(value.toDouble()) || std::isfinite(back.toDouble());
  }
  try {
    return value.isFloatingPoint() ? static_cast<double>(back.toLong()) == value.toDouble()
                                   : !value.isComplex() && back.toLong() == value.toLong();
  } catch (const std::exception&) {  // -3 into uint64 reads back as 2**64 - 3, past int64 (runtime_error)
    return false;
  }
}

FillPattern::FillPattern(const c10::Scalar& value, c10::ScalarType dtype, int64_t unit_)
    : unit(unit_) {
  const Element one = to_element(value, dtype);
  // A silent wrap (-100 as uint8 is 156) would put a valid-looking token id in the padding.
  if (!represents(value, dtype, one)) {
    // Printing a Scalar reads it as int64, which 2**64 - 3 (from uint64) is not.
    const c10::Scalar& back = one.value;
    const std::string became = back.isIntegral(false) && dtype == at::kUInt64
                                   ? std::to_string(back.to<uint64_t>())
                                   : c10::str(back);
    TORCH_CHECK_VALUE(false, "pad: pad_value ", value, " cannot be represented in ", dtype,
                      " (it would become ", became, ")");
  }
  const int64_t elem = one.size;
  TORCH_INTERNAL_ASSERT(unit % elem == 0 && unit <= 16);
  for (int64_t i = 0; i < unit; i += elem) std::memcpy(bytes.data() + i, one.bytes.data(), elem);
  zero = true;
  for (int64_t i = 0; i < unit; ++i) zero = zero && bytes[i] == 0;
}

void FillPattern::fill(char* dst, int64_t n) const {
  if (n <= 0) return;
  if (zero) {
    std::memset(dst, 0, n);
    return;
  }
  dispatch_word(unit, [&](auto zero_word) {
    using word_t = decltype(zero_word);
    word_t word;
    std::memcpy(&word, bytes.data(), sizeof(word_t));
    std::fill_n(reinterpret_cast<word_t*>(dst), n / static_cast<int64_t>(sizeof(word_t)), word);
  });
}

PadArgs pad_args(const at::Tensor& values, const at::Tensor& offsets, int64_t max_len) {
  check_size_arg("pad", "max_len", max_len);
  TORCH_CHECK_VALUE(values.dim() >= 1, "pad: values must have a leading length dimension "
                    "[total, ...], got a 0-d tensor");
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1, "pad: offsets must be 1-D with "
                    "B+1 >= 1 elements, got shape ", offsets.sizes());
  PadArgs a;
  a.batch = offsets.numel() - 1;
  a.total = values.size(0);
  a.max_len = max_len;
  a.offsets = index_arg("pad", "offsets", offsets, a.batch + 1, values.device());
  check_offsets("pad", a.offsets, a.total, max_len);
  a.values = values.contiguous();
  // numpy and torch.frombuffer allow data below its element's alignment (complex128 at an 8-byte
  // address); the pad pattern is written in whole elements, so such values are copied first,
  // as bytes (torch's own typed kernels may not handle them).
  if (reinterpret_cast<uintptr_t>(a.values.const_data_ptr()) % a.values.element_size() != 0) {
    a.values = a.values.view(at::kByte).clone().view(values.scalar_type());
  }
  a.out_shape = {a.batch, max_len};
  for (int64_t d = 1; d < values.dim(); ++d) a.out_shape.push_back(values.size(d));
  return a;
}

UnpadArgs unpad_args(const at::Tensor& padded, const at::Tensor& offsets, int64_t total) {
  check_size_arg("unpad", "total", total);
  TORCH_CHECK_VALUE(padded.dim() >= 2, "unpad: padded must be [B, max_len, ...], got shape ",
                    padded.sizes());
  UnpadArgs a;
  a.batch = padded.size(0);
  a.max_len = padded.size(1);
  a.total = total;
  a.offsets = index_arg("unpad", "offsets", offsets, a.batch + 1, padded.device());
  check_offsets("unpad", a.offsets, total, a.max_len);
  a.padded = padded.contiguous();
  a.out_shape = {total};
  for (int64_t d = 2; d < padded.dim(); ++d) a.out_shape.push_back(padded.size(d));
  return a;
}

namespace {
// The bytes a strided tensor can reach, [first, last): torch has no negative strides.
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {first, first + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size()))};
}

// Conservative, as it must be for a write: spans that meet refuse the call even where the
// elements interleave without touching.
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  const auto [a0, a1] = byte_span(a);
  const auto [b0, b1] = byte_span(b);
  return a0 < b1 && b0 < a1;
}

void check_no_overlap(const char* op, const at::Tensor& dst, std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(dst) != at::MemOverlap::Yes, op,
                    ": dst has elements that share memory (an expanded tensor?); pass dst.clone()");
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK_VALUE(!may_overlap(dst, *t), op, ": dst and ", name, " share memory, so writing dst would "
                      "change what is read from ", name, "; pass ", name, ".clone()");
  }
}
}  // namespace

ScatterArgs unpad_scatter_args(const at::Tensor& dst, const at::Tensor& padded,
                               const at::Tensor& lengths, const at::Tensor& dst_offsets) {
  const char* op = "unpad_scatter_";
  TORCH_CHECK_VALUE(padded.dim() >= 2, op, ": padded must be [B, max_len, ...], got shape ",
                    padded.sizes());
  TORCH_CHECK_VALUE(dst.dim() == padded.dim() - 1, op, ": dst must be [rows, ",
                    "*padded.shape[2:]] with ", padded.dim() - 1, " dims, got shape ",
                    dst.sizes());
  TORCH_CHECK_VALUE(dst.sizes().slice(1) == padded.sizes().slice(2), op,
                    ": trailing dims of dst ", dst.sizes().slice(1),
                    " must equal those of padded ", padded.sizes().slice(2));
  TORCH_CHECK_TYPE(dst.scalar_type() == padded.scalar_type(), op, ": dst and padded must have "
                   "one dtype, got ", dst.scalar_type(), " and ", padded.scalar_type());
  TORCH_CHECK_VALUE(dst.device() == padded.device(), op, ": dst and padded must be on one "
                    "device, got ", dst.device(), " and ", padded.device());
  check_no_overlap(op, dst, {{"padded", &padded}, {"lengths", &lengths}, {"dst_offsets", &dst_offsets}});
  ScatterArgs a;
  a.batch = padded.size(0);
  a.max_len = padded.size(1);
  a.dst_rows = dst.size(0);
  a.lengths = index_arg(op, "lengths", lengths, a.batch, padded.device());
  a.dst_offsets = index_arg(op, "dst_offsets", dst_offsets, a.batch, padded.device());
  check_scatter(op, a.lengths, a.dst_offsets, a.dst_rows, a.max_len);
  a.padded = padded.contiguous();
  return a;
}

}  // namespace provcollate
