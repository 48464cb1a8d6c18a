// Copies and fills for CPU launchers, with non-temporal stores for outputs larger than the
// last-level cache. Such stores skip reading each destination line before overwriting it (a
// third of a copy's memory traffic) and leave the cache to the source. Measured on a 2-core
// EPYC with a 32 MiB L3 (benchmarks/results/bench_ops.md): for a 100 MiB output they fill at
// 43 GB/s against memset's 33 and copy at 17 against memcpy's 12; for outputs that fit in the
// cache they are 2x slower, because whoever writes next would have hit the cache.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../launch.h"

namespace provcollate {

// Outputs of at least this many bytes are written with non-temporal stores: the last-level
// cache size (at least 8 MiB), or PROVCOLLATE_STREAM_BYTES when set (0 streams everything).
int64_t stream_threshold();

inline bool use_streaming(int64_t output_bytes) {
#if defined(__SSE2__)
  return output_bytes >= stream_threshold();
#else
  (void)output_bytes;
  return false;
#endif
}

// Spans shorter than this keep ordinary stores even in a streamed output.
constexpr int64_t kStreamSpanBytes = int64_t{16} << 10;

// Bytes from dst up to its next 64-byte line, at most n.
inline int64_t to_line(const char* dst, int64_t n) {
  return std::min<int64_t>(n, (64 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % 64)) % 64);
}

inline void copy_span(char* dst, const char* src, int64_t n, bool stream) {
#if defined(__SSE2__)
  if (stream && n >= kStreamSpanBytes) {
    const int64_t head = to_line(dst, n);
    std::memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    for (; n >= 64; n -= 64, dst += 64, src += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), d);
    }
  }
#endif
  std::memcpy(dst, src, n);
}

// The pattern repeats every fill.unit bytes from any address aligned to it (copy_unit checked
// the output's alignment), so 16 bytes of it fit every 16-aligned address.
inline void fill_span(char* dst, int64_t n, const FillPattern& fill, bool stream) {
#if defined(__SSE2__)
  if (stream && n >= kStreamSpanBytes) {
    const int64_t head = to_line(dst, n);
    fill.fill(dst, head);
    dst += head, n -= head;
    alignas(16) uint8_t line[16];
    for (int64_t i = 0; i < 16; i += fill.unit) std::memcpy(line + i, fill.bytes.data(), fill.unit);
    const __m128i v = _mm_load_si128(reinterpret_cast<const __m128i*>(line));
    for (; n >= 64; n -= 64, dst += 64) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst), v);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), v);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), v);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), v);
    }
  }
#endif
  fill.fill(dst, n);
}

// Non-temporal stores are weakly ordered: make a task's writes visible before it returns.
inline void end_stream(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

}  // namespace provcollate
