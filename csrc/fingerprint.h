// Fingerprints: the 64-bit hash of one example's data that the Collator computes in its fused
// pass (batch.fingerprint) and provcollate.fingerprint() computes for one example. The algorithm
// is documented in provcollate/fingerprints.py (its Python twin) and docs/fingerprints.md: XXH3-64
// (seed 0) over a tagged, little-endian encoding, containers hashed over their children's digests.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "xxh3.h"

namespace provcollate {

// b"T" + u8(len(name)) + name + u8(ndim) + i64 sizes: what precedes a tensor's bytes. The GIL
// must be held (a dtype's name may come from Python).
std::string tensor_header(at::ScalarType dtype, at::IntArrayRef sizes);
void append_tensor_header(std::string& out, at::ScalarType dtype, at::IntArrayRef sizes);

// The digest of `header` followed by `n` bytes at `data`; needs no GIL.
uint64_t bytes_digest(const std::string& header, const void* data, size_t n);
uint64_t bytes_digest(const char* header, size_t header_size, const void* data, size_t n);

// The tensor's elements as one contiguous host tensor of its own dtype (conj/neg resolved); a
// tensor on a device is copied to the host (a sync). Needs no GIL.
at::Tensor host_elements(const at::Tensor& t);

// Containers over their children's digests: b"L"/b"U" + u64(n) + digests; b"M" + u64(n) +
// (key digest, value digest) pairs sorted.
uint64_t sequence_digest(char tag, const uint64_t* children, size_t n);
uint64_t sequence_digest(char tag, const std::vector<uint64_t>& children);
uint64_t mapping_digest(std::pair<uint64_t, uint64_t>* pairs, size_t n);  // sorts them in place
uint64_t mapping_digest(std::vector<std::pair<uint64_t, uint64_t>> pairs);

// The digest of any Python value (GIL held): the algorithm of provcollate/fingerprints.py.
uint64_t object_digest(PyObject* o, int depth = 0);

// Adds `fingerprint(data) -> int` (signed int64) to the module.
void bind_fingerprint(pybind11::module_& m);

}  // namespace provcollate
