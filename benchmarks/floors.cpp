// Lower bounds for bench_collate.py's token cases: the least work any collate of those batches
// must do, with every check, every plan and the Batch object left out. Built on demand by
// `bench_collate.py --floors` (torch.utils.cpp_extension.load); not part of the package.
//
//   read_ints(samples, keys)      reads every Python int of the list fields named by keys (type
//                                 check and value, summed): no output is written at all.
//   collate_tensors(samples, keys, label_key, index_key)
//                                 pads the int64 tensor fields named by keys to [B, T], stacks the
//                                 label and index ints, and builds lengths and the [B, T] bool mask:
//                                 one allocation per output, memcpy and memset, nothing else.
//   write_once(nbytes)            allocates nbytes and writes each byte once on every thread, reading
//                                 nothing: what producing a batch of that size costs at the least,
//                                 before any of its input is read. Streaming stores past 32 MiB (the
//                                 L3 of the machine measured), memset below (bench_collate only uses
//                                 it past the L3, where writing memory is what bounds a collate).
//   scatter_rows(dst, indices, src)
//                                 the plain-index add's least work (bench_record.py --floors): for
//                                 each index [B] in turn, claim each slot in a byte per row of dst
//                                 (checked and set, touched 16 slots ahead) and copy row b of src to
//                                 row index[b] of dst as it is claimed (touched 12 rows ahead), as
//                                 csrc/record.cpp does, with no call from Python, no argument check
//                                 and no books.
//                                 Returns the microseconds each batch took.
//   claim_pass(n, indices, outputs)
//                                 case 1's least work as one whole pass (bench_record.py --floors):
//                                 fresh storage [n, ...] and a claim byte per slot (allocated here,
//                                 with the huge-page advice the Recorder gives its rows), then for
//                                 each batch k the claims and copies of scatter_rows from outputs[k].
//                                 Returns the storage; timed from Python as a whole, as the
//                                 Recorder's pass is.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <torch/csrc/autograd/python_variable.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

namespace {

PyObject* field(PyObject* sample, const py::str& key) {
  PyObject* v = PyDict_GetItemWithError(sample, key.ptr());
  if (v == nullptr) throw py::key_error(std::string(key));
  return v;
}

int64_t read_ints(const py::list& samples, const std::vector<py::str>& keys) {
  int64_t sum = 0;
  for (const py::handle s : samples) {
    for (const py::str& key : keys) {
      PyObject* list = field(s.ptr(), key);
      if (!PyList_Check(list)) throw py::type_error("read_ints: fields must be lists of ints");
      PyObject** el = PySequence_Fast_ITEMS(list);
      for (Py_ssize_t i = 0, n = PyList_GET_SIZE(list); i < n; ++i) {
        PyObject* o = el[i];
        // A small exact int holds its value in one digit (CPython 3.11's layout).
        sum += (PyLong_CheckExact(o) && Py_SIZE(o) == 1) ? reinterpret_cast<PyLongObject*>(o)->ob_digit[0] : -1;
      }
    }
  }
  return sum;
}

py::tuple collate_tensors(const py::list& samples, const std::vector<py::str>& keys, const py::str& label_key,
                          const py::str& index_key) {
  const int64_t B = static_cast<int64_t>(samples.size());
  const size_t F = keys.size();
  std::vector<const int64_t*> src(B * F);
  std::vector<int64_t> len(B), label(B), index(B);
  int64_t T = 0;
  for (int64_t b = 0; b < B; ++b) {
    PyObject* s = PyList_GET_ITEM(samples.ptr(), b);
    for (size_t f = 0; f < F; ++f) {
      const at::Tensor& t = THPVariable_Unpack(field(s, keys[f]));
      src[b * F + f] = t.const_data_ptr<int64_t>();
      len[b] = t.size(0);
    }
    label[b] = PyLong_AsLongLong(field(s, label_key));
    index[b] = PyLong_AsLongLong(field(s, index_key));
    T = std::max(T, len[b]);
  }
  const auto longs = at::TensorOptions().dtype(at::kLong);
  py::list out;
  for (size_t f = 0; f < F; ++f) {
    at::Tensor padded = at::empty({B, T}, longs);
    int64_t* o = padded.mutable_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(o + b * T, src[b * F + f], len[b] * sizeof(int64_t));
      std::memset(o + b * T + len[b], 0, (T - len[b]) * sizeof(int64_t));
    }
    out.append(padded);
  }
  for (const std::vector<int64_t>* v : {&label, &index, &len}) {
    at::Tensor t = at::empty({B}, longs);
    std::memcpy(t.mutable_data_ptr<int64_t>(), v->data(), B * sizeof(int64_t));
    out.append(t);
  }
  at::Tensor mask = at::empty({B, T}, at::TensorOptions().dtype(at::kBool));
  bool* m = mask.mutable_data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    std::memset(m + b * T, 1, len[b]);
    std::memset(m + b * T + len[b], 0, T - len[b]);
  }
  out.append(mask);
  return py::tuple(out);
}

at::Tensor write_once(int64_t nbytes) {
  at::Tensor out = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte));
  char* base = static_cast<char*>(out.data_ptr());
  const int64_t lines = nbytes / 64;
#if defined(__SSE2__)
  const bool stream = nbytes >= (int64_t{32} << 20);
#else
  const bool stream = false;  // no streaming stores on this architecture
#endif
  at::parallel_for(0, lines, 4096, [&](int64_t begin, int64_t end) {
    if (!stream) {
      std::memset(base + begin * 64, 0, (end - begin) * 64);
      return;
    }
#if defined(__SSE2__)
    const __m128i zero = _mm_setzero_si128();
    for (int64_t i = begin; i < end; ++i) {
      char* p = base + i * 64;  // at::empty aligns to 64 bytes
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), zero);
      _mm_stream_si128(reinterpret_cast<__m128i*>(p + 16), zero);
      _mm_stream_si128(reinterpret_cast<__m128i*>(p + 32), zero);
      _mm_stream_si128(reinterpret_cast<__m128i*>(p + 48), zero);
    }
    _mm_sfence();
#endif
  });
  std::memset(base + lines * 64, 0, nbytes - lines * 64);
  return out;
}

// One batch's claims and copies: row b of `in` to row index[b] of `out` as slot index[b] is
// claimed in `claimed`, touching counts 16 and rows 12 ahead, as csrc/record.cpp does.
void claim_batch(char* out, int64_t row, int64_t n, uint8_t* claimed, const int64_t* index, int64_t B, const char* in) {
  // always_inline, as record.cpp's: GCC deletes calls of a function whose only effect is a prefetch.
  const auto touch = [&](int64_t b) __attribute__((always_inline)) {
    if (b < B) {
      __builtin_prefetch(out + index[b] * row, 1);
      __builtin_prefetch(out + index[b] * row + row - 1, 1);
    }
  };
  for (int64_t b = 0; b < 12; ++b) touch(b);
  const bool words = row % 8 == 0 && row <= 128;  // copied inline, as record.cpp copies them
  for (int64_t b = 0; b < B; ++b) {
    if (b + 16 < B) __builtin_prefetch(claimed + index[b + 16], 1);
    touch(b + 12);
    TORCH_CHECK(index[b] >= 0 && index[b] < n && !claimed[index[b]], "floors: each slot once");
    claimed[index[b]] = 1;
    char* d = out + index[b] * row;
    const char* s = in + b * row;
    if (words) {
      for (int64_t w = 0; w < row / 8; ++w) {
        uint64_t v;
        std::memcpy(&v, s + 8 * w, 8);
        std::memcpy(d + 8 * w, &v, 8);
      }
    } else {
      std::memcpy(d, s, row);
    }
  }
}

}  // namespace

torch::Tensor scatter_rows(torch::Tensor dst, const std::vector<torch::Tensor>& indices, torch::Tensor src) {
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous() && dst.dtype() == src.dtype(), "scatter_rows: contiguous, one dtype");
  const int64_t N = dst.size(0), B = src.size(0), row = src.numel() / std::max<int64_t>(B, 1) * src.element_size();
  char* out = static_cast<char*>(dst.data_ptr());
  const char* in = static_cast<const char*>(src.data_ptr());
  std::vector<uint8_t> claimed(N, 0);
  auto took = torch::empty({static_cast<int64_t>(indices.size())}, torch::kFloat64);
  double* us = took.data_ptr<double>();
  for (size_t k = 0; k < indices.size(); ++k) {
    TORCH_CHECK(indices[k].dtype() == torch::kInt64 && indices[k].numel() == B, "scatter_rows: int64 indices of B items");
    const auto start = std::chrono::steady_clock::now();
    claim_batch(out, row, N, claimed.data(), indices[k].data_ptr<int64_t>(), B, in);
    us[k] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
  }
  return took;
}

torch::Tensor claim_pass(int64_t n, const std::vector<torch::Tensor>& indices, const std::vector<torch::Tensor>& outputs) {
  TORCH_CHECK(indices.size() == outputs.size() && !outputs.empty(), "claim_pass: one output per index");
  std::vector<int64_t> shape(outputs[0].sizes().begin(), outputs[0].sizes().end());
  shape[0] = n;
  at::Tensor dst = at::empty(shape, outputs[0].options());
  const int64_t row = dst.numel() / std::max<int64_t>(n, 1) * dst.element_size();
  char* out = static_cast<char*>(dst.data_ptr());
#if defined(__linux__)
  // The Recorder's rows get this advice (provcollate.store.memory.huge_pages): the same here.
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(out) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(out) + n * row) & ~(kHuge - 1);
  if (end > begin + kHuge) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  std::vector<uint8_t> claimed(n, 0);
  for (size_t k = 0; k < indices.size(); ++k) {
    const int64_t B = outputs[k].size(0);
    TORCH_CHECK(indices[k].dtype() == torch::kInt64 && indices[k].numel() == B && outputs[k].is_contiguous(),
                "claim_pass: int64 indices of B items, contiguous outputs");
    claim_batch(out, row, n, claimed.data(), indices[k].data_ptr<int64_t>(), B, static_cast<const char*>(outputs[k].data_ptr()));
  }
  return dst;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("read_ints", &read_ints);
  m.def("collate_tensors", &collate_tensors);
  m.def("write_once", &write_once);
  m.def("scatter_rows", &scatter_rows);
  m.def("claim_pass", &claim_pass);
}
