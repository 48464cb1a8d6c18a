// XXH3-64 (Yann Collet's xxHash, 64-bit XXH3, seed 0, default secret), the hash every fingerprint
// is made of. Its long-input loop runs 8 lanes of 32x32->64 multiplies, vectorized with AVX-512 or
// AVX2 when the CPU has them (chosen once at run time); every path gives the same digest.
#pragma once

#include <cstddef>
#include <cstdint>

namespace provcollate {

// XXH3-64 fed in pieces: the digest equals that of the pieces joined, whatever their sizes.
class Xxh3 {
 public:
  Xxh3();
  void update(const void* data, size_t n);
  uint64_t digest() const;

 private:
  static constexpr size_t kBuffer = 256;  // four stripes; inputs up to 240 bytes stay here whole
  void consume(const unsigned char* p, size_t stripes);

  alignas(64) uint64_t acc_[8];
  uint64_t total_ = 0;
  size_t stripes_in_block_ = 0;
  size_t buffered_ = 0;
  unsigned char buf_[kBuffer];
  unsigned char last_[64];  // the 64 bytes consumed just before buf_ (once any are)
};

uint64_t xxh3_64(const void* data, size_t n);

// XXH3-64 of `head` followed by `data`, in one call (a short head: a tensor's, a tag).
uint64_t xxh3_64_prefixed(const void* head, size_t head_size, const void* data, size_t n);

// The instruction set the long-input loop uses here: "avx512", "avx2" or "scalar".
const char* xxh3_isa();

}  // namespace provcollate
