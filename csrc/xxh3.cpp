// XXH3-64, seed 0, default secret, as specified in xxHash's doc/xxhash_spec.md. Inputs of up to
// 240 bytes take the short and medium paths; longer ones run 64-byte stripes through 8 accumulators
// (a scramble after every 16 stripes), then the input's last 64 bytes as a final stripe.
#include "xxh3.h"

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PROVCOLLATE_XXH3_X86 1
#endif

namespace provcollate {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "XXH3 reads little-endian words as they lie in memory");

namespace {

constexpr uint64_t kP32_1 = 0x9E3779B1U;
constexpr uint64_t kP32_2 = 0x85EBCA77U;
constexpr uint64_t kP32_3 = 0xC2B2AE3DU;
constexpr uint64_t kP64_1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kP64_2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kP64_3 = 0x165667B19E3779F9ULL;
constexpr uint64_t kP64_4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t kP64_5 = 0x27D4EB2F165667C5ULL;
constexpr uint64_t kMx1 = 0x165667919E3779F9ULL;
constexpr uint64_t kMx2 = 0x9FB21C651E98DF25ULL;

constexpr size_t kStripe = 64;
constexpr size_t kStripesPerBlock = 16;  // (192 - 64) / 8
constexpr size_t kLastStripeOffset = 121;  // 192 - 64 - 7
constexpr size_t kMergeOffset = 11;
constexpr uint64_t kInitAcc[8] = {kP32_3, kP64_1, kP64_2, kP64_3, kP64_4, kP32_2, kP64_5, kP32_1};

alignas(64) constexpr unsigned char kSecret[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

inline uint64_t read64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

inline uint32_t read32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint64_t secret64(size_t offset) { return read64(kSecret + offset); }
inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

inline uint64_t fold128(uint64_t a, uint64_t b) {
  const unsigned __int128 m = static_cast<unsigned __int128>(a) * b;
  return static_cast<uint64_t>(m) ^ static_cast<uint64_t>(m >> 64);
}

inline uint64_t avalanche(uint64_t x) {
  x ^= x >> 37;
  x *= kMx1;
  return x ^ (x >> 32);
}

inline uint64_t avalanche_xxh64(uint64_t x) {
  x ^= x >> 33;
  x *= kP64_2;
  x ^= x >> 29;
  x *= kP64_3;
  return x ^ (x >> 32);
}

inline uint64_t mix16(const unsigned char* p, size_t secret_offset) {
  return fold128(read64(p) ^ secret64(secret_offset), read64(p + 8) ^ secret64(secret_offset + 8));
}

uint64_t short_digest(const unsigned char* p, size_t n) {
  if (n == 0) return avalanche_xxh64(secret64(56) ^ secret64(64));
  if (n <= 3) {
    const uint32_t combined = static_cast<uint32_t>(p[n - 1]) | (static_cast<uint32_t>(n) << 8) |
                              (static_cast<uint32_t>(p[0]) << 16) | (static_cast<uint32_t>(p[n >> 1]) << 24);
    return avalanche_xxh64(static_cast<uint64_t>(read32(kSecret) ^ read32(kSecret + 4)) ^ combined);
  }
  if (n <= 8) {
    const uint64_t combined = static_cast<uint64_t>(read32(p + n - 4)) | (static_cast<uint64_t>(read32(p)) << 32);
    uint64_t v = (secret64(8) ^ secret64(16)) ^ combined;
    v ^= rotl(v, 49) ^ rotl(v, 24);
    v *= kMx2;
    v ^= (v >> 35) + n;
    v *= kMx2;
    return v ^ (v >> 28);
  }
  if (n <= 16) {
    const uint64_t lo = (secret64(24) ^ secret64(32)) ^ read64(p);
    const uint64_t hi = (secret64(40) ^ secret64(48)) ^ read64(p + n - 8);
    return avalanche(n + __builtin_bswap64(lo) + hi + fold128(lo, hi));
  }
  uint64_t acc = n * kP64_1;
  if (n <= 128) {
    for (size_t i = (n - 1) / 32 + 1; i-- > 0;) {
      acc += mix16(p + 16 * i, 32 * i);
      acc += mix16(p + n - 16 * i - 16, 32 * i + 16);
    }
    return avalanche(acc);
  }
  for (size_t i = 0; i < 8; ++i) acc += mix16(p + 16 * i, 16 * i);
  acc = avalanche(acc);
  for (size_t i = 8; i < n / 16; ++i) acc += mix16(p + 16 * i, 16 * (i - 8) + 3);
  acc += mix16(p + n - 16, 119);
  return avalanche(acc);
}

// One stripe into the accumulators: acc[i ^ 1] += lane i; acc[i] += lo32(lane ^ key) * hi32(lane ^ key).
void accumulate_scalar(uint64_t* acc, const unsigned char* p, const unsigned char* key) {
  for (size_t i = 0; i < 8; ++i) {
    const uint64_t lane = read64(p + 8 * i);
    const uint64_t k = lane ^ read64(key + 8 * i);
    acc[i ^ 1] += lane;
    acc[i] += (k & 0xFFFFFFFFULL) * (k >> 32);
  }
}

void scramble_scalar(uint64_t* acc) {
  for (size_t i = 0; i < 8; ++i) {
    uint64_t a = acc[i];
    a ^= a >> 47;
    a ^= secret64(128 + 8 * i);
    acc[i] = a * kP32_1;
  }
}

// `stripes` stripes from p, the first of them number `in_block` of its block; returns the
// number in the block after them. Each instruction set has its own copy of the loop.
size_t stripes_scalar(uint64_t* acc, const unsigned char* p, size_t stripes, size_t in_block) {
  for (size_t s = 0; s < stripes; ++s, p += kStripe) {
    accumulate_scalar(acc, p, kSecret + 8 * in_block);
    if (++in_block == kStripesPerBlock) {
      scramble_scalar(acc);
      in_block = 0;
    }
  }
  return in_block;
}

#ifdef PROVCOLLATE_XXH3_X86
// The vector loops. AVX2 holds the accumulators in two registers; AVX-512 in one, and runs whole
// blocks with the block's 16 keys held in registers.
__attribute__((target("avx2"))) inline __m256i step256(__m256i acc, __m256i d, __m256i key) {
  const __m256i k = _mm256_xor_si256(d, key);
  const __m256i m = _mm256_mul_epu32(k, _mm256_srli_epi64(k, 32));
  // lane i's data goes to acc[i ^ 1]: swap the two 64-bit halves of each 128-bit lane
  return _mm256_add_epi64(acc, _mm256_add_epi64(m, _mm256_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2))));
}

__attribute__((target("avx2"))) inline __m256i load256(const unsigned char* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

__attribute__((target("avx2"))) inline __m256i scramble256(__m256i a, const unsigned char* secret) {
  const __m256i prime = _mm256_set1_epi32(static_cast<int>(kP32_1));
  const __m256i x = _mm256_xor_si256(_mm256_xor_si256(a, _mm256_srli_epi64(a, 47)), load256(secret));
  return _mm256_add_epi64(_mm256_mul_epu32(x, prime),
                          _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(x, 32), prime), 32));
}

__attribute__((target("avx2"))) size_t stripes_avx2(uint64_t* acc, const unsigned char* p, size_t stripes,
                                                     size_t in_block) {
  __m256i a0 = load256(reinterpret_cast<const unsigned char*>(acc));
  __m256i a1 = load256(reinterpret_cast<const unsigned char*>(acc + 4));
  for (; stripes > 0; --stripes, p += kStripe) {
    const unsigned char* key = kSecret + 8 * in_block;
    a0 = step256(a0, load256(p), load256(key));
    a1 = step256(a1, load256(p + 32), load256(key + 32));
    if (++in_block == kStripesPerBlock) {
      a0 = scramble256(a0, kSecret + 128);
      a1 = scramble256(a1, kSecret + 160);
      in_block = 0;
    }
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc), a0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 4), a1);
  return in_block;
}

__attribute__((target("avx512f"))) inline __m512i step512(__m512i acc, __m512i d, __m512i key) {
  const __m512i k = _mm512_xor_si512(d, key);
  const __m512i m = _mm512_mul_epu32(k, _mm512_srli_epi64(k, 32));
  return _mm512_add_epi64(acc, _mm512_add_epi64(m, _mm512_shuffle_epi32(d, _MM_PERM_BADC)));
}

__attribute__((target("avx512f"))) inline __m512i scramble512(__m512i a) {
  const __m512i prime = _mm512_set1_epi64(static_cast<long long>(kP32_1));
  const __m512i x = _mm512_xor_si512(_mm512_xor_si512(a, _mm512_srli_epi64(a, 47)), _mm512_loadu_si512(kSecret + 128));
  return _mm512_add_epi64(_mm512_mul_epu32(x, prime), _mm512_slli_epi64(_mm512_mul_epu32(_mm512_srli_epi64(x, 32), prime), 32));
}

__attribute__((target("avx512f"))) size_t stripes_avx512(uint64_t* acc, const unsigned char* p, size_t stripes,
                                                          size_t in_block) {
  __m512i a = _mm512_loadu_si512(acc);
  for (; stripes > 0 && (in_block != 0 || stripes < kStripesPerBlock); --stripes, p += kStripe) {
    a = step512(a, _mm512_loadu_si512(p), _mm512_loadu_si512(kSecret + 8 * in_block));
    if (++in_block == kStripesPerBlock) {
      a = scramble512(a);
      in_block = 0;
    }
  }
  if (stripes >= kStripesPerBlock) {
    __m512i keys[kStripesPerBlock];
    for (size_t j = 0; j < kStripesPerBlock; ++j) keys[j] = _mm512_loadu_si512(kSecret + 8 * j);
    for (; stripes >= kStripesPerBlock; stripes -= kStripesPerBlock) {
#pragma GCC unroll 16
      for (size_t j = 0; j < kStripesPerBlock; ++j, p += kStripe) a = step512(a, _mm512_loadu_si512(p), keys[j]);
      a = scramble512(a);
    }
  }
  for (; stripes > 0; --stripes, p += kStripe, ++in_block) {
    a = step512(a, _mm512_loadu_si512(p), _mm512_loadu_si512(kSecret + 8 * in_block));
  }
  _mm512_storeu_si512(acc, a);
  return in_block;
}
#endif

using StripesFn = size_t (*)(uint64_t*, const unsigned char*, size_t, size_t);

struct Isa {
  StripesFn fn;
  const char* name;
};

// The widest the CPU has; PROVCOLLATE_XXH3_ISA=scalar|avx2|avx512 asks for a narrower one (the
// tests run every path the machine has and compare them).
Isa choose() {
  const char* asked = std::getenv("PROVCOLLATE_XXH3_ISA");
  const std::string want = asked == nullptr ? "" : asked;
#ifdef PROVCOLLATE_XXH3_X86
  __builtin_cpu_init();
  if ((want.empty() || want == "avx512") && __builtin_cpu_supports("avx512f")) return {stripes_avx512, "avx512"};
  if ((want.empty() || want == "avx512" || want == "avx2") && __builtin_cpu_supports("avx2")) {
    return {stripes_avx2, "avx2"};
  }
#endif
  return {stripes_scalar, "scalar"};
}

const Isa& isa() {
  static const Isa chosen = choose();
  return chosen;
}

// The input's last 64 bytes as the final stripe, then the accumulators merged into the digest.
uint64_t finish(uint64_t* acc, const unsigned char* last_stripe, uint64_t total) {
  accumulate_scalar(acc, last_stripe, kSecret + kLastStripeOffset);
  uint64_t result = total * kP64_1;
  for (size_t i = 0; i < 4; ++i) {
    result += fold128(acc[2 * i] ^ secret64(kMergeOffset + 16 * i), acc[2 * i + 1] ^ secret64(kMergeOffset + 16 * i + 8));
  }
  return avalanche(result);
}

}  // namespace

Xxh3::Xxh3() { std::memcpy(acc_, kInitAcc, sizeof(acc_)); }

void Xxh3::consume(const unsigned char* p, size_t stripes) {
  stripes_in_block_ = isa().fn(acc_, p, stripes, stripes_in_block_);
}

// Stripes are consumed only while at least one byte follows them (the input's last stripe is
// hashed differently), so buf_ always keeps 1..256 bytes once anything was consumed.
void Xxh3::update(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  total_ += n;
  if (buffered_ + n <= kBuffer) {
    std::memcpy(buf_ + buffered_, p, n);
    buffered_ += n;
    return;
  }
  if (buffered_ > 0) {  // complete the buffer's last stripe (bytes follow it), then consume its stripes
    const size_t fill = (kStripe - buffered_ % kStripe) % kStripe;
    std::memcpy(buf_ + buffered_, p, fill);
    consume(buf_, (buffered_ + fill) / kStripe);
    std::memcpy(last_, buf_ + buffered_ + fill - kStripe, kStripe);
    p += fill;
    n -= fill;
    buffered_ = 0;
  }
  const size_t stripes = (n - 1) / kStripe;
  if (stripes > 0) {
    consume(p, stripes);
    std::memcpy(last_, p + (stripes - 1) * kStripe, kStripe);
    p += stripes * kStripe;
    n -= stripes * kStripe;
  }
  std::memcpy(buf_, p, n);
  buffered_ = n;
}

uint64_t Xxh3::digest() const {
  if (total_ <= 240) return short_digest(buf_, buffered_);
  alignas(64) uint64_t acc[8];
  std::memcpy(acc, acc_, sizeof(acc));
  const size_t stripes = (buffered_ - 1) / kStripe;
  isa().fn(acc, buf_, stripes, stripes_in_block_);  // the last stripe is never followed by a scramble
  unsigned char tail[kStripe];
  const unsigned char* last = tail;
  if (buffered_ >= kStripe) {
    last = buf_ + (buffered_ - kStripe);
  } else {  // the last stripe begins in the bytes consumed before buf_
    const size_t before = kStripe - buffered_;
    std::memcpy(tail, last_ + buffered_, before);
    std::memcpy(tail + before, buf_, buffered_);
  }
  return finish(acc, last, total_);
}

uint64_t xxh3_64(const void* data, size_t n) { return xxh3_64_prefixed(nullptr, 0, data, n); }

uint64_t xxh3_64_prefixed(const void* head, size_t head_size, const void* data, size_t n) {
  const auto* h = static_cast<const unsigned char*>(head);
  const auto* d = static_cast<const unsigned char*>(data);
  const size_t total = head_size + n;
  if (total <= 240) {
    unsigned char joined[240];
    if (head_size > 0) std::memcpy(joined, h, head_size);
    if (n > 0) std::memcpy(joined + head_size, d, n);
    return short_digest(joined, total);
  }
  if (head_size >= kStripe) {
    Xxh3 state;
    state.update(head, head_size);
    state.update(data, n);
    return state.digest();
  }
  // The first stripe joins the head to the data's first bytes; every later one, the input's last
  // included, lies in the data (total > 240 and head_size < 64: n > 176).
  alignas(64) uint64_t acc[8];
  std::memcpy(acc, kInitAcc, sizeof(acc));
  unsigned char first[kStripe];
  if (head_size > 0) std::memcpy(first, h, head_size);
  std::memcpy(first + head_size, d, kStripe - head_size);
  const size_t stripes = (total - 1) / kStripe;  // >= 3: each followed by at least one byte
  const StripesFn fn = isa().fn;
  const size_t in_block = fn(acc, first, 1, 0);
  fn(acc, d + (kStripe - head_size), stripes - 1, in_block);
  return finish(acc, d + n - kStripe, total);
}

const char* xxh3_isa() { return isa().name; }

}  // namespace provcollate
