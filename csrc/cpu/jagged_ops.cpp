// CPU launchers. Each item is one Span (kernels/jagged.h): its real rows move with one memcpy,
// its padding is one fill, and items are spread over threads with at::parallel_for.
// With PROVCOLLATE_EMULATE_DEVICE set, the same ops run the CUDA element bodies instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#if defined(__linux__)
#include <unistd.h>
#endif

#include "kernels/jagged.h"
#include "launch.h"
#include "stream.h"

namespace provcollate {

namespace {

// Bytes of the last-level cache one core sees: sysfs names the cache instance of cpu0. glibc's
// sysconf(_SC_LEVEL3_CACHE_SIZE) can report the whole socket's L3 instead (256 MiB on an EPYC
// virtual machine whose cores share one 32 MiB instance), so it is only the fallback.
int64_t last_level_cache_bytes() {
  int64_t best = 0;
  int best_level = 0;
#if defined(__linux__)
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int level = 0;
    std::string size;
    if (!(level_file >> level) || !(size_file >> size) || level <= best_level) continue;
    char* end = nullptr;
    int64_t bytes = std::strtoll(size.c_str(), &end, 10);
    if (end != nullptr && (*end == 'K' || *end == 'k')) bytes <<= 10;
    if (end != nullptr && (*end == 'M' || *end == 'm')) bytes <<= 20;
    best = bytes;
    best_level = level;
  }
#if defined(_SC_LEVEL3_CACHE_SIZE)
  if (best == 0) best = std::max<long>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
#endif
  return best;
}

}  // namespace

int64_t stream_threshold() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("PROVCOLLATE_STREAM_BYTES");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      TORCH_CHECK_VALUE(end != env && *end == '\0' && v >= 0,
                        "PROVCOLLATE_STREAM_BYTES must be a byte count >= 0, got '", env, "'");
      return static_cast<int64_t>(v);
    }
    return std::max<int64_t>(last_level_cache_bytes(), int64_t{8} << 20);
  }();
  return bytes;
}

namespace {

// Items per task: enough bytes that a task outweighs the cost of handing it to a thread.
int64_t grain(int64_t bytes_per_item) {
  constexpr int64_t kTaskBytes = 1 << 18;
  return std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, bytes_per_item));
}

// Runs body(i) for every element i < n with the index type a CUDA launch would use.
template <typename F>
void emulate_elements(int64_t n, const F& body) {
  const bool int64_index = emulation() == Emulation::int64 || element_grid(n, 0).int64_index;
  dispatch_index(int64_index, [&](auto zero) {
    using index_t = decltype(zero);
    for (index_t i = 0; i < static_cast<index_t>(n); ++i) body(i);
  });
}

at::Tensor pad_cpu(const at::Tensor& values, const at::Tensor& offsets, int64_t max_len,
                   const at::Scalar& pad_value, bool left) {
  const PadArgs a = pad_args(values, offsets, max_len);
  at::Tensor out = at::empty(a.out_shape, values.options());
  const int64_t row = row_bytes(a.values, 1);
  const char* src = static_cast<const char*>(a.values.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  // Built (and the pad value checked) even for an empty output: the same inputs are refused alike.
  const FillPattern fill(pad_value, values.scalar_type(), copy_unit(row, {src, dst}));
  if (out.numel() == 0) return out;
  const int64_t* off = a.offsets.const_data_ptr<int64_t>();
  if (emulation() != Emulation::off) {
    dispatch_word(fill.unit, [&](auto zero) {
      using word_t = decltype(zero);
      word_t word;
      std::memcpy(&word, fill.bytes.data(), sizeof(word_t));
      const int64_t words = row / fill.unit;
      emulate_elements(a.batch * max_len * words, [&](auto i) {
        using index_t = decltype(i);
        kernels::pad_element<word_t, index_t>(
            i, reinterpret_cast<const word_t*>(src), off, reinterpret_cast<word_t*>(dst),
            static_cast<index_t>(max_len), static_cast<index_t>(words), a.total, left, word);
      });
    });
    return out;
  }
  const int64_t item_bytes = max_len * row;
  const bool stream = use_streaming(a.batch * item_bytes);
  at::parallel_for(0, a.batch, grain(item_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const kernels::Span s = kernels::item_span(off, b, a.total, max_len, left);
      char* item = dst + b * item_bytes;
      fill_span(item, s.padded * row, fill, stream);
      copy_span(item + s.padded * row, src + s.jagged * row, s.len * row, stream);
      fill_span(item + (s.padded + s.len) * row, (max_len - s.padded - s.len) * row, fill, stream);
    }
    end_stream(stream);
  });
  return out;
}

at::Tensor unpad_cpu(const at::Tensor& padded, const at::Tensor& offsets, int64_t total,
                     bool left) {
  const UnpadArgs a = unpad_args(padded, offsets, total);
  at::Tensor out = at::empty(a.out_shape, padded.options());
  const int64_t row = row_bytes(a.padded, 2);
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(a.padded.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* off = a.offsets.const_data_ptr<int64_t>();
  if (emulation() != Emulation::off) {
    const int64_t unit = copy_unit(row, {src, dst});
    dispatch_word(unit, [&](auto zero) {
      using word_t = decltype(zero);
      const int64_t words = row / unit;
      emulate_elements(a.batch * a.max_len * words, [&](auto i) {
        using index_t = decltype(i);
        kernels::unpad_element<word_t, index_t>(
            i, reinterpret_cast<const word_t*>(src), off, reinterpret_cast<word_t*>(dst),
            static_cast<index_t>(a.max_len), static_cast<index_t>(words), total, left);
      });
    });
    return out;
  }
  const int64_t item_bytes = a.max_len * row;
  // Threads split the output rows evenly, not the items: items differ in length, and a thread
  // given the long ones would finish last. Offsets on the CPU were validated: they are sorted.
  const bool stream = use_streaming(total * row);
  at::parallel_for(0, total, grain(row), [&](int64_t r0, int64_t r1) {
    int64_t b = std::upper_bound(off, off + a.batch + 1, r0) - off - 1;
    for (; b < a.batch && off[b] < r1; ++b) {
      const kernels::Span s = kernels::item_span(off, b, total, a.max_len, left);
      const int64_t lo = std::max(s.jagged, r0), hi = std::min(s.jagged + s.len, r1);
      if (hi <= lo) continue;
      copy_span(dst + lo * row, src + b * item_bytes + (s.padded + lo - s.jagged) * row,
                (hi - lo) * row, stream);
    }
    end_stream(stream);
  });
  return out;
}

void unpad_scatter_cpu(const at::Tensor& dst, const at::Tensor& padded, const at::Tensor& lengths,
                       const at::Tensor& dst_offsets, bool left) {
  const ScatterArgs a = unpad_scatter_args(dst, padded, lengths, dst_offsets);
  const int64_t row = row_bytes(a.padded, 2);
  if (a.batch == 0 || row == 0 || a.max_len == 0) return;
  // Rows are written into a contiguous buffer; a non-contiguous dst gets it copied back.
  at::Tensor out = dst.is_contiguous() ? dst : dst.contiguous();
  const char* src = static_cast<const char*>(a.padded.const_data_ptr());
  char* base = static_cast<char*>(out.data_ptr());
  const int64_t* len = a.lengths.const_data_ptr<int64_t>();
  const int64_t* dst_off = a.dst_offsets.const_data_ptr<int64_t>();
  if (emulation() != Emulation::off) {
    const int64_t unit = copy_unit(row, {src, base});
    dispatch_word(unit, [&](auto zero) {
      using word_t = decltype(zero);
      const int64_t words = row / unit;
      emulate_elements(a.batch * a.max_len * words, [&](auto i) {
        using index_t = decltype(i);
        kernels::unpad_scatter_element<word_t, index_t>(
            i, reinterpret_cast<const word_t*>(src), len, dst_off, reinterpret_cast<word_t*>(base),
            static_cast<index_t>(a.max_len), static_cast<index_t>(words), a.dst_rows, left);
      });
    });
  } else {
    const int64_t item_bytes = a.max_len * row;
    const bool stream = use_streaming(a.dst_rows * row);
    at::parallel_for(0, a.batch, grain(item_bytes / 2), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const kernels::Span s =
            kernels::scatter_span(len, dst_off, b, a.dst_rows, a.max_len, left);
        copy_span(base + s.jagged * row, src + b * item_bytes + s.padded * row, s.len * row, stream);
      }
      end_stream(stream);
    });
  }
  if (!out.is_same(dst)) dst.copy_(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(provcollate, CPU, m) {
  m.impl("pad", &pad_cpu);
  m.impl("unpad", &unpad_cpu);
  m.impl("unpad_scatter_", &unpad_scatter_cpu);
}

}  // namespace provcollate
