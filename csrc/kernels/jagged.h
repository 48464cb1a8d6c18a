// The index arithmetic of provcollate's ops, shared by the CPU and CUDA launchers.
//
// Every op moves whole rows (one row = all trailing dims of one position) between a jagged
// tensor [total, ...] and a padded one [B, max_len, ...]. The only thing that differs between
// items, ops and backends is *which* rows: that is computed here, once, as a Span. The CPU
// launchers copy a Span with one memcpy; the CUDA launchers map each element to its Span.
// Spans are clamped so that no offsets, however corrupt, can address memory outside the
// tensors: device offsets are never read back to the host to be validated.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PROVCOLLATE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PROVCOLLATE_HOST_DEVICE inline
#endif

namespace provcollate {
namespace kernels {

// Rows [jagged, jagged + len) of the jagged side pair with rows [padded, padded + len) of one
// padded item; the item's other padded rows are padding.
struct Span {
  int64_t jagged;
  int64_t padded;
  int64_t len;
};

PROVCOLLATE_HOST_DEVICE int64_t clamp(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Item b of a jagged batch described by offsets [B+1] (cu_seqlens), in a padded row of max_len.
PROVCOLLATE_HOST_DEVICE Span item_span(const int64_t* offsets, int64_t b, int64_t total,
                                       int64_t max_len, bool left) {
  const int64_t start = clamp(offsets[b], 0, total);
  const int64_t end = clamp(offsets[b + 1], start, total);
  const int64_t len = end - start < max_len ? end - start : max_len;
  return Span{start, left ? max_len - len : 0, len};
}

// Item b of unpad_scatter_: lengths[b] rows of padded item b land at dst rows from dst_offsets[b].
// An item whose destination lies outside [0, dst_rows) is cut to the part that fits.
PROVCOLLATE_HOST_DEVICE Span scatter_span(const int64_t* lengths, const int64_t* dst_offsets,
                                          int64_t b, int64_t dst_rows, int64_t max_len,
                                          bool left) {
  const int64_t len = clamp(lengths[b], 0, max_len);
  const int64_t dst = clamp(dst_offsets[b], 0, dst_rows);
  const int64_t fits = dst_offsets[b] < 0 ? 0 : clamp(len, 0, dst_rows - dst);
  // Left padding: the item's rows end at max_len, whatever part of them fits in dst.
  return Span{dst, left ? max_len - len : 0, fits};
}

// The jagged row that padded row t of an item holds, or -1 where row t is padding.
PROVCOLLATE_HOST_DEVICE int64_t jagged_row(const Span& s, int64_t t) {
  const int64_t k = t - s.padded;
  return (k >= 0 && k < s.len) ? s.jagged + k : -1;
}

// A 16-byte word for the widest copies (alignas makes CUDA move it in one 128-bit access).
struct alignas(16) Word16 {
  uint64_t lo, hi;
};

// What element i does, where an element is one word of one row of the padded tensor
// [batch, max_len, words]: thread i of a CUDA grid, or iteration i of the CPU emulation.
template <typename word_t, typename index_t>
PROVCOLLATE_HOST_DEVICE void pad_element(index_t i, const word_t* values, const int64_t* offsets,
                                         word_t* out, index_t max_len, index_t words,
                                         int64_t total, bool left, word_t fill) {
  const index_t w = i % words;
  const index_t row = i / words;
  const Span s = item_span(offsets, row / max_len, total, max_len, left);
  const int64_t src = jagged_row(s, row % max_len);
  out[i] = src >= 0 ? values[src * words + w] : fill;
}

template <typename word_t, typename index_t>
PROVCOLLATE_HOST_DEVICE void unpad_element(index_t i, const word_t* padded, const int64_t* offsets,
                                           word_t* out, index_t max_len, index_t words,
                                           int64_t total, bool left) {
  const index_t w = i % words;
  const index_t row = i / words;
  const Span s = item_span(offsets, row / max_len, total, max_len, left);
  const int64_t dst = jagged_row(s, row % max_len);
  if (dst >= 0) out[dst * words + w] = padded[i];
}

template <typename word_t, typename index_t>
PROVCOLLATE_HOST_DEVICE void unpad_scatter_element(index_t i, const word_t* padded,
                                                   const int64_t* lengths,
                                                   const int64_t* dst_offsets, word_t* dst,
                                                   index_t max_len, index_t words,
                                                   int64_t dst_rows, bool left) {
  const index_t w = i % words;
  const index_t row = i / words;
  const Span s = scatter_span(lengths, dst_offsets, row / max_len, dst_rows, max_len, left);
  const int64_t d = jagged_row(s, row % max_len);
  if (d >= 0) dst[d * words + w] = padded[i];
}

}  // namespace kernels
}  // namespace provcollate
