// Recorder.add in one compiled pass: the batch is checked against the Store's host bookkeeping
// (provcollate/store/), its slots are claimed and its rows copied into host storage, with the
// GIL released. It takes only the batches that need none of the general path's work (growth,
// repeats, views, reductions, outputs or storage on a GPU) and hands every other one back
// untouched, for that path to do the work or raise the error: the messages live in one place.
//
// Python meets C++ through two named records:
//   Targets: where each output goes (the dense rows [cap, ...] per example; per token each
//            slot's first row `starts` [cap, 1] and, set before each pass, the last chunk with
//            its `cursor` (TokenRows.cursor: [first free row, rows handed out], which a pass
//            advances as it claims the rows it then writes) and global first row), and the slot
//            table's `count` [cap, 1] and `token_len` [cap, 1] (and, once the table has them, its
//            fingerprints `prints` and their marks `printed`, which a pass given its batch's
//            fingerprints writes with its claims). Made once per storage layout (FastPath.refresh).
//   Outcome: `recorded` (the batch is in), `rows` (the rows each per-token output took) and
//            `needs_rows` (> 0: a last chunk has no room for that many rows; nothing changed).
#include "record.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <pybind11/numpy.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cstring>
#include <optional>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels refuse it, which is harmless
#endif
#endif

#include "kernels/jagged.h"

namespace py = pybind11;

namespace provcollate {
namespace {

#if defined(__GNUC__) || defined(__clang__)
#define PC_INLINE inline __attribute__((always_inline))
#define PC_INLINE_LAMBDA __attribute__((always_inline))
#else
#define PC_INLINE inline
#define PC_INLINE_LAMBDA
#endif

constexpr int64_t kHandBack = -1;  // internal: the batch goes back to the general path
constexpr int64_t kReleaseBytes = int64_t{1} << 16;  // a pass over fewer source bytes keeps the GIL

struct Outcome {
  bool recorded = false;
  int64_t rows = 0;
  int64_t needs_rows = 0;
};

// One per-token output's last chunk, as FastPath sets it before a pass.
struct Chunk {
  py::object chunk;   // a tensor, or None before the first chunk
  py::object cursor;  // int64 numpy [2]: rows used in the chunk, rows handed out in all chunks
  int64_t* cursor_data = nullptr;
  int64_t base = 0;
};

struct Targets {
  std::vector<py::object> storage;  // per output: dense rows (tensor) or starts (numpy)
  py::object count;
  py::object token_len;
  std::vector<Chunk> chunks;  // per per-token output, in output order
  // Read from count and token_len once, when the Targets are made: the arrays are held above,
  // so their data stays put. Null if they are not what a pass can write (it then hands back).
  char* count_data = nullptr;
  int64_t count_itemsize = 0;
  int64_t* token_len_data = nullptr;
  int64_t cap = 0;
  // The storage of new Targets is likely fresh (a first record, growth, rows dropped after a
  // shard): their first pass may fault in many pages, so it releases the GIL whatever its size.
  mutable bool first_pass = true;
  // Rows recorded by add_plain through these Targets: the store adds them to its count when it
  // drops the Targets, so that the seed article's add needs no Python step of its own.
  int64_t records = 0;
  // The slot table's fingerprints [cap, 1] and whether each slot has one (set_prints), for a
  // pass given its batch's fingerprints: each slot claimed takes its record's; a slot that has
  // one already (its record in a shard) hands the batch back, for the claim to compare them.
  py::object prints;
  py::object printed;
  int64_t* prints_data = nullptr;
  bool* printed_data = nullptr;
};

// One output's source rows and where they go.
struct Output {
  at::Tensor src;  // contiguous, owns the bytes while the GIL is released
  // Owned too: without the GIL another thread may replace the Recorder's storage, and the copies
  // must still land in memory that is alive.
  at::Tensor dst_owner;
  py::object starts_owner;
  bool per_token = false;
  int64_t row = 0;      // bytes of one row (one position of one item)
  int64_t max_len = 0;  // T, per token
  char* dst = nullptr;
  int64_t dst_rows = 0;  // rows of the dense storage, or of the last chunk
  int64_t used = 0;      // per token: first free row of the last chunk
  int64_t* cursor = nullptr;  // per token: the chunk's cursor, advanced by the rows claimed
  int64_t base = 0;      // per token: global row of the chunk's row 0
  int64_t* starts = nullptr;
};

// The data of a numpy array the Recorder owns, if it is C-contiguous, writable and holds
// `size` integers (bools with `boolean`) of one of `itemsizes` bytes; else null.
char* host_array(const py::handle& h, int64_t size, std::initializer_list<int64_t> itemsizes, bool boolean = false) {
  if (!py::isinstance<py::array>(h)) return nullptr;
  py::array a = py::reinterpret_borrow<py::array>(h);
  const char kind = a.dtype().kind();
  bool itemsize_ok = false;
  for (const int64_t s : itemsizes) itemsize_ok |= a.itemsize() == s;
  const bool kind_ok = boolean ? kind == 'b' : (kind == 'i' || kind == 'u');
  if (!itemsize_ok || !kind_ok || a.size() != size || !a.writeable() ||
      !(a.flags() & py::array::c_style)) {
    return nullptr;
  }
  return static_cast<char*>(a.mutable_data());
}

// A 1-D int64 host tensor of B elements, contiguous; undefined if it is not one.
at::Tensor host_index(const at::Tensor& t, int64_t B) {
  if (t.layout() != at::kStrided || !t.is_cpu() || t.scalar_type() != at::kLong || t.dim() != 1 ||
      t.size(0) != B) {
    return at::Tensor();
  }
  return t.contiguous();
}

// Storage on the host with the source's dtype and row shape (trailing sizes from `dims` on).
bool fits(const at::Tensor& dst, const at::Tensor& src, int64_t dims) {
  return dst.layout() == at::kStrided && dst.is_cpu() && dst.is_contiguous() &&
         dst.scalar_type() == src.scalar_type() && dst.dim() == src.dim() - dims + 1 &&
         dst.sizes().slice(1) == src.sizes().slice(dims);
}

std::optional<Output> parse_output(const py::handle& source, const py::handle& storage, const Chunk* chunk,
                                   int64_t B, int64_t cap) {
  if (!THPVariable_Check(source.ptr())) return std::nullopt;
  const at::Tensor& raw = THPVariable_Unpack(source.ptr());
  if (raw.layout() != at::kStrided || !raw.is_cpu() || raw.is_conj() || raw.is_neg() ||
      raw.dim() < 1 || raw.size(0) != B) {
    return std::nullopt;
  }
  Output o;
  o.per_token = chunk != nullptr;
  const int64_t dims = o.per_token ? 2 : 1;
  if (raw.dim() < dims) return std::nullopt;
  o.src = raw.contiguous();
  o.row = static_cast<int64_t>(raw.element_size()) * c10::multiply_integers(raw.sizes().slice(dims));
  if (!o.per_token) {
    if (!THPVariable_Check(storage.ptr())) return std::nullopt;
    const at::Tensor& dense = THPVariable_Unpack(storage.ptr());
    if (!fits(dense, raw, dims) || dense.size(0) != cap) return std::nullopt;
    o.dst = static_cast<char*>(dense.data_ptr());
    o.dst_owner = dense;
    o.dst_rows = cap;
    return o;
  }
  o.max_len = raw.size(1);
  if (!chunk->chunk.is_none()) {
    if (!THPVariable_Check(chunk->chunk.ptr())) return std::nullopt;
    const at::Tensor& rows = THPVariable_Unpack(chunk->chunk.ptr());
    if (!fits(rows, raw, dims)) return std::nullopt;
    o.dst = static_cast<char*>(rows.data_ptr());
    o.dst_owner = rows;
    o.dst_rows = rows.size(0);
  }
  if (chunk->cursor_data == nullptr) return std::nullopt;
  o.cursor = chunk->cursor_data;
  o.used = o.cursor[0];
  o.base = chunk->base;
  o.starts_owner = py::reinterpret_borrow<py::object>(storage);
  o.starts = reinterpret_cast<int64_t*>(host_array(o.starts_owner, cap, {8}));
  if (o.starts == nullptr || o.used < 0 || o.used > o.dst_rows) return std::nullopt;
  return o;
}

// Chunks are filled front to back, into pages never touched before: populating a batch's rows
// with one call costs about two thirds of taking their page faults one by one. Where the
// kernel refuses, the copies fault the pages in as usual.
void populate(char* begin, int64_t bytes) {
#if defined(__linux__)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  if (bytes <= 0) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(begin) / page * page;
  madvise(reinterpret_cast<void*>(first), reinterpret_cast<uintptr_t>(begin) + bytes - first, MADV_POPULATE_WRITE);
#else
  (void)begin;
  (void)bytes;
#endif
}

// One per-example output's copies: row b of the batch to row index[b] of the dense storage.
// The destinations are random: each row is touched (both cache lines a row may straddle: 40
// bytes do in 3 of 5 slots) a few rows before its copy, which keeps a steady number of misses
// in flight; touching them all at once instead stalls on the misses queued first. Rows of whole
// 8-byte words up to 128 bytes are copied inline rather than by a libc call per row.
//
// The touches must be inlined where they are used (PC_INLINE): GCC finds a function whose only
// effect is a prefetch free of side effects and deletes its calls, and GCC 12 did so to the
// lambda that called touch() before it was inlined: no row was ever prefetched (objdump showed
// the count's prefetch alone in record_batch).
struct DenseCopy {
  char* dst;
  const char* src;
  int64_t row;
  int64_t words;  // > 0: rows of that many whole words, copied inline

  DenseCopy(char* d, const char* s, int64_t r) : dst(d), src(s), row(r), words(r % 8 == 0 && r <= 128 ? r / 8 : 0) {}

  PC_INLINE void touch(int64_t slot) const {
    __builtin_prefetch(dst + slot * row, 1);
    __builtin_prefetch(dst + slot * row + row - 1, 1);
  }

  void copy(int64_t b, int64_t slot) const {
    char* d = dst + slot * row;
    const char* s = src + b * row;
    if (words > 0) {
      for (int64_t w = 0; w < words; ++w) {
        uint64_t v;
        std::memcpy(&v, s + 8 * w, 8);
        std::memcpy(d + 8 * w, &v, 8);
      }
    } else {
      std::memcpy(d, s, row);
    }
  }
};

// The dense outputs a pass copies as it claims: one (held by value) or any number.
struct OneDense {
  DenseCopy d;
  PC_INLINE void touch(int64_t slot) const { d.touch(slot); }
  PC_INLINE bool taken(int64_t) const { return false; }
  PC_INLINE void copy(int64_t b, int64_t slot) const { d.copy(b, slot); }
};
struct ManyDense {
  const DenseCopy* begin;
  const DenseCopy* end;
  PC_INLINE void touch(int64_t slot) const {
    for (const DenseCopy* d = begin; d != end; ++d) d->touch(slot);
  }
  PC_INLINE bool taken(int64_t) const { return false; }
  PC_INLINE void copy(int64_t b, int64_t slot) const {
    for (const DenseCopy* d = begin; d != end; ++d) d->copy(b, slot);
  }
};

// The batch's input fingerprints, booked with the claims: a slot that has a print already (its
// record went to a shard) stops the pass, for the general path to compare the two.
struct Prints {
  const int64_t* fp;  // [B]
  int64_t* prints;    // the slot table's, [cap]
  bool* printed;
};
template <typename Rows>
struct PrintedRows {
  Rows rows;
  Prints p;
  PC_INLINE void touch(int64_t slot) const {
    rows.touch(slot);
    __builtin_prefetch(p.prints + slot, 1);
    __builtin_prefetch(p.printed + slot, 1);
  }
  PC_INLINE bool taken(int64_t slot) const { return p.printed[slot]; }
  PC_INLINE void copy(int64_t b, int64_t slot) const {
    rows.copy(b, slot);
    p.prints[slot] = p.fp[b];
    p.printed[slot] = true;
  }
};

// Claims the slots index[0..B) in turn, copying each one's dense rows as it is claimed: the
// misses of the counts and of the rows they land in overlap. Stops at the first slot outside
// the storage or recorded already (before, or earlier in this batch) and returns its position
// (B if every slot was claimed); the claims made by then are the caller's to undo.
template <typename count_t, typename Rows>
int64_t claim_rows(const int64_t* index, int64_t B, int64_t cap, count_t* count, const Rows rows) {
  // Slots are random: their counts and rows are cache misses, touched a few slots ahead.
  constexpr int64_t kCountAhead = 16, kRowAhead = 12;
  const auto touch = [&](int64_t b) PC_INLINE_LAMBDA {
    if (b < B) {
      const int64_t slot = index[b];
      if (slot >= 0 && slot < cap) rows.touch(slot);
    }
  };
  for (int64_t b = 0; b < kRowAhead; ++b) touch(b);
  for (int64_t b = 0; b < B; ++b) {
    if (b + kCountAhead < B) {
      const int64_t ahead = index[b + kCountAhead];
      if (ahead >= 0 && ahead < cap) __builtin_prefetch(count + ahead, 1);
    }
    touch(b + kRowAhead);
    const int64_t slot = index[b];
    if (slot < 0 || slot >= cap || count[slot] != 0 || rows.taken(slot)) return b;
    count[slot] = 1;
    rows.copy(b, slot);
  }
  return B;
}

// claim_rows, booking the batch's fingerprints with the claims when there are any.
template <typename count_t, typename Rows>
int64_t claim_with_prints(const int64_t* index, int64_t B, int64_t cap, count_t* count, const Rows rows,
                          const Prints* prints) {
  if (prints == nullptr) return claim_rows(index, B, cap, count, rows);
  return claim_rows(index, B, cap, count, PrintedRows<Rows>{rows, *prints});
}

// Checks, claims and copies, without Python objects (the caller may have released the GIL).
template <typename count_t>
int64_t record(const int64_t* index, const int64_t* views, const int64_t* lengths, bool left,
               int64_t B, int64_t cap, count_t* count, int64_t* token_len,
               c10::SmallVectorImpl<Output>& outputs, const Prints* prints) {
  bool any_token = false;
  for (const Output& o : outputs) any_token |= o.per_token;
  if (views != nullptr) {
    for (int64_t b = 0; b < B; ++b) {
      if (views[b] != 0) return kHandBack;
    }
  }
  // dst_offsets[b]: where item b's rows start among the batch's rows, in batch order.
  std::vector<int64_t> dst_offsets;
  int64_t total = 0;
  if (lengths != nullptr) {
    int64_t longest = 0;
    dst_offsets.resize(B);
    for (int64_t b = 0; b < B; ++b) {
      if (lengths[b] < 0) return kHandBack;
      dst_offsets[b] = total;
      total += lengths[b];
      longest = std::max(longest, lengths[b]);
    }
    for (const Output& o : outputs) {
      if (o.per_token && longest > o.max_len) return kHandBack;
    }
  } else if (any_token) {
    return kHandBack;
  }
  // Claim every slot, copying each slot's per-example rows as it is claimed: the misses of the
  // counts and of the rows they land in overlap. A slot outside the storage, recorded before or
  // twice in this batch undoes the claims made; the rows copied by then sit in slots no count
  // marks, which nothing reads (a result or a shard takes recorded slots only).
  const auto release = [&](int64_t upto) {  // the slots claimed had neither a count nor a print
    for (int64_t b = 0; b < upto; ++b) count[index[b]] = 0;
    if (prints != nullptr) {
      for (int64_t b = 0; b < upto; ++b) prints->printed[index[b]] = false;
    }
  };
  c10::SmallVector<DenseCopy, 2> dense;
  for (const Output& o : outputs) {
    if (!o.per_token && o.row > 0) dense.emplace_back(o.dst, static_cast<const char*>(o.src.const_data_ptr()), o.row);
  }
  // The seed article's one output is held by value: a row store through a char* may alias
  // anything in memory but a local whose address is never taken, so its pointers and sizes
  // need not be reloaded after each row.
  const int64_t claimed = dense.size() == 1
                              ? claim_with_prints(index, B, cap, count, OneDense{dense[0]}, prints)
                              : claim_with_prints(index, B, cap, count, ManyDense{dense.begin(), dense.end()}, prints);
  if (claimed < B) {
    release(claimed);
    return kHandBack;
  }
  for (const Output& o : outputs) {
    if (o.per_token && o.used + total > o.dst_rows) {
      release(B);
      return -2 - total;
    }
  }
  if (lengths != nullptr) {
    for (int64_t b = 0; b < B; ++b) token_len[index[b]] = lengths[b];
  }
  // Claim each per-token output's rows before writing them.
  for (Output& o : outputs) {
    if (!o.per_token) continue;
    o.cursor[0] += total;
    o.cursor[1] += total;
  }
  for (Output& o : outputs) {
    if (!o.per_token) continue;  // copied with the claims
    const char* src = static_cast<const char*>(o.src.const_data_ptr());
    const int64_t first = o.base + o.used;
    for (int64_t b = 0; b < B; ++b) o.starts[index[b]] = first + dst_offsets[b];
    if (o.row == 0 || total == 0) continue;
    // The same Span arithmetic as unpad_scatter_, into rows used..used + total of the chunk.
    const int64_t item_bytes = o.max_len * o.row;
    char* dst = o.dst + o.used * o.row;
    populate(dst, total * o.row);
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, item_bytes));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const kernels::Span s =
            kernels::scatter_span(lengths, dst_offsets.data(), b, total, o.max_len, left);
        std::memcpy(dst + s.jagged * o.row, src + b * item_bytes + s.padded * o.row, s.len * o.row);
      }
    });
  }
  return total;
}

// The index as int64 host data: a 1-D int64 CPU tensor, or a 1-D C-contiguous int64 numpy array
// (what users with their own collate pass: no torch.from_numpy per batch). `owner` keeps it alive.
const int64_t* index_data(const py::object& arg, int64_t& B, py::object& owner, at::Tensor& tensor) {
  if (THPVariable_Check(arg.ptr())) {
    const at::Tensor& t = THPVariable_Unpack(arg.ptr());
    if (t.dim() != 1) return nullptr;
    B = t.size(0);
    tensor = host_index(t, B);
    return tensor.defined() ? tensor.const_data_ptr<int64_t>() : nullptr;
  }
  // array_t::check_: an ndarray whose dtype is equivalent to native int64 (byte order included), C-contiguous.
  if (!py::array_t<int64_t, py::array::c_style>::check_(arg)) return nullptr;
  const py::array a = py::reinterpret_borrow<py::array>(arg);
  if (a.ndim() != 1) return nullptr;
  B = a.shape(0);
  owner = arg;
  return static_cast<const int64_t*>(a.data());
}

// An optional [B] array beside the index (views, lengths): None, or as index_data takes it.
bool optional_data(const py::object& arg, int64_t B, const int64_t*& data, py::object& owner, at::Tensor& tensor) {
  data = nullptr;
  if (arg.is_none()) return true;
  int64_t n = -1;
  data = index_data(arg, n, owner, tensor);
  return data != nullptr && n == B;
}

// record_rows and record_plain: `n` sources, in the Targets' output order.
Outcome record_batch(const py::object& index_arg, const py::object& views_arg, const py::object& lengths_arg, bool left,
                     const py::handle* sources, size_t n, const Targets& targets, int64_t* batch_size = nullptr,
                     const py::object& prints_arg = py::none()) {
  Outcome handed_back;
  if (n != targets.storage.size() || n == 0) return handed_back;
  int64_t B = 0;
  py::object index_owner, views_owner, lengths_owner;
  at::Tensor index, views_tensor, lengths_tensor;
  const int64_t* idx = index_data(index_arg, B, index_owner, index);
  if (idx == nullptr) return handed_back;
  const int64_t* view = nullptr;
  const int64_t* lens = nullptr;
  const int64_t* fp = nullptr;
  py::object prints_owner;
  at::Tensor prints_tensor;
  if (!optional_data(views_arg, B, view, views_owner, views_tensor) ||
      !optional_data(lengths_arg, B, lens, lengths_owner, lengths_tensor) ||
      !optional_data(prints_arg, B, fp, prints_owner, prints_tensor)) {
    return handed_back;
  }
  if (fp != nullptr && targets.prints_data == nullptr) return handed_back;  // (a pass takes view 0 only)
  // Owned here, with their data, for the pass without the GIL.
  const py::object prints_hold = fp != nullptr ? targets.prints : py::none();
  const py::object printed_hold = fp != nullptr ? targets.printed : py::none();
  std::optional<Prints> prints;
  if (fp != nullptr) prints = Prints{fp, targets.prints_data, targets.printed_data};
  // The Targets (and the arrays they hold) stay alive while the GIL is released: the caller's
  // arguments hold them, whatever another thread does to the Store meanwhile.
  const int64_t cap = targets.cap;
  char* count = targets.count_data;
  int64_t* token_len = targets.token_len_data;
  if (count == nullptr || token_len == nullptr) return handed_back;
  c10::SmallVector<Output, 2> outputs;  // the seed article's one output takes no allocation
  size_t next_chunk = 0;
  for (size_t k = 0; k < n; ++k) {
    const bool per_token = !THPVariable_Check(targets.storage[k].ptr());
    if (per_token && next_chunk >= targets.chunks.size()) return handed_back;
    const Chunk* chunk = per_token ? &targets.chunks[next_chunk++] : nullptr;
    std::optional<Output> o = parse_output(sources[k], targets.storage[k], chunk, B, cap);
    if (!o) return handed_back;
    outputs.push_back(std::move(*o));
  }
  const bool wide = targets.count_itemsize == 4;
  // The GIL is released for a pass that copies enough for other threads to gain from it, and
  // for the first pass into new storage (its page faults can take milliseconds). A small one
  // (the seed article's 256 rows of 40 bytes: a few microseconds) keeps it: released, it goes
  // to any other Python thread that waits for it, and the add then waits up to the
  // interpreter's switch interval (5 ms) to take it back.
  int64_t bytes = 0;
  for (const Output& o : outputs) bytes += o.src.numel() * static_cast<int64_t>(o.src.element_size());
  int64_t rows;
  {
    const bool release = bytes >= kReleaseBytes || targets.first_pass;
    targets.first_pass = false;
    std::optional<py::gil_scoped_release> nogil;
    if (release) nogil.emplace();
    const Prints* p = prints ? &*prints : nullptr;
    rows = wide ? record(idx, view, lens, left, B, cap, reinterpret_cast<int32_t*>(count), token_len, outputs, p)
                : record(idx, view, lens, left, B, cap, reinterpret_cast<uint8_t*>(count), token_len, outputs, p);
  }
  if (batch_size != nullptr) *batch_size = B;
  Outcome outcome;
  if (rows >= 0) {
    outcome.recorded = true;
    outcome.rows = rows;
  } else if (rows < kHandBack) {
    outcome.needs_rows = -2 - rows;
  }
  return outcome;
}

Outcome record_rows(const py::object& index_arg, const py::object& views_arg, const py::object& lengths_arg, bool left,
                    const py::list& sources, const Targets& targets, const py::object& prints) {
  std::vector<py::handle> handles(sources.begin(), sources.end());
  return record_batch(index_arg, views_arg, lengths_arg, left, handles.data(), handles.size(), targets, nullptr, prints);
}

// The seed article's add: a plain index and one per-example output, nothing else to parse.
// Returns the batch size, or -1: handed back, nothing changed.
int64_t record_plain(const py::object& index_arg, const py::handle& output, const py::object& prints, Targets& targets) {
  int64_t B = -1;
  if (!record_batch(index_arg, py::none(), py::none(), false, &output, 1, targets, &B, prints).recorded) return -1;
  targets.records += B;
  return B;
}

// Targets.add_plain as a plain CPython function (METH_FASTCALL) bound to a capsule of its
// Targets: pybind11's dispatcher costs about 0.3 us a call, a fifth of the whole add.
constexpr const char* kTargetsCapsule = "provcollate.RecordTargets";

PyObject* add_plain_call(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 && nargs != 3) {
    PyErr_Format(PyExc_TypeError, "add_plain(index, output[, fingerprint]) takes 2 or 3 arguments, got %zd", nargs);
    return nullptr;
  }
  auto* targets = static_cast<Targets*>(PyCapsule_GetPointer(capsule, kTargetsCapsule));
  if (targets == nullptr) return nullptr;
  try {
    const py::object prints = nargs == 3 ? py::reinterpret_borrow<py::object>(args[2]) : py::none();
    return PyLong_FromLongLong(
        record_plain(py::reinterpret_borrow<py::object>(args[0]), py::handle(args[1]), prints, *targets));
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef add_plain_def = {"add_plain", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(add_plain_call)),
                             METH_FASTCALL,
                             "add_plain(index, output[, fingerprint]): record_rows(index, None, None, False, [output]) "
                             "into these Targets without building its arguments and outcome (the plain-index add of "
                             "one per-example output, with each item's input fingerprint when given: int64 [B], "
                             "booked in the Targets' prints), counting the rows it records in `records`: the batch "
                             "size, or -1 (handed back, nothing changed)."};

}  // namespace

void bind_record(py::module_& m) {
  py::class_<Outcome>(m, "RecordOutcome", "What record_rows did: recorded, rows (per-token rows taken), needs_rows.")
      .def_readonly("recorded", &Outcome::recorded)
      .def_readonly("rows", &Outcome::rows)
      .def_readonly("needs_rows", &Outcome::needs_rows)
      .def("__repr__", [](const Outcome& o) {
        return "RecordOutcome(recorded=" + std::string(o.recorded ? "True" : "False") + ", rows=" + std::to_string(o.rows) +
               ", needs_rows=" + std::to_string(o.needs_rows) + ")";
      });
  py::class_<Targets>(m, "RecordTargets", "Where record_rows writes: storage per output, count, token_len, last chunks.")
      .def(py::init([](const py::list& storage, py::object count, py::object token_len) {
             Targets t;
             for (const py::handle h : storage) t.storage.push_back(py::reinterpret_borrow<py::object>(h));
             t.count = std::move(count);
             t.token_len = std::move(token_len);
             if (py::isinstance<py::array>(t.count)) {
               const py::array counts = py::reinterpret_borrow<py::array>(t.count);
               if (counts.ndim() == 2 && counts.shape(1) == 1) {  // one view only
                 t.cap = counts.shape(0);
                 t.count_data = host_array(counts, t.cap, {1, 4});
                 t.count_itemsize = counts.itemsize();
                 t.token_len_data = reinterpret_cast<int64_t*>(host_array(t.token_len, t.cap, {8}));
               }
             }
             return t;
           }),
           py::arg("storage"), py::arg("count"), py::arg("token_len"))
      .def_readonly("records", &Targets::records)
      .def_property_readonly("add_plain", [](py::object self) {
             // A capsule that keeps these Targets alive for as long as the function is held.
             auto* targets = &self.cast<Targets&>();
             PyObject* capsule = PyCapsule_New(targets, kTargetsCapsule, [](PyObject* c) {
               Py_XDECREF(static_cast<PyObject*>(PyCapsule_GetContext(c)));
             });
             if (capsule == nullptr) throw py::error_already_set();
             Py_INCREF(self.ptr());
             PyCapsule_SetContext(capsule, self.ptr());
             PyObject* fn = PyCFunction_New(&add_plain_def, capsule);
             Py_DECREF(capsule);
             if (fn == nullptr) throw py::error_already_set();
             return py::reinterpret_steal<py::object>(fn);
           },
           "add_plain(index, output): the plain-index add of one per-example output into these Targets (see its "
           "own docstring); a function of its own, called without pybind11's dispatcher.")
      .def("set_prints", [](Targets& t, py::object prints, py::object printed) {
             int64_t* p = reinterpret_cast<int64_t*>(host_array(prints, t.cap, {8}));
             bool* q = reinterpret_cast<bool*>(host_array(printed, t.cap, {1}, true));
             if (t.count_data == nullptr || p == nullptr || q == nullptr) {
               throw py::value_error("RecordTargets.set_prints: int64 and bool arrays of the count's shape");
             }
             t.prints = std::move(prints);
             t.printed = std::move(printed);
             t.prints_data = p;
             t.printed_data = q;
           },
           py::arg("prints"), py::arg("printed"),
           "The slot table's fingerprints and their marks, which add_plain books a batch's fingerprints in.")
      .def("set_chunks", [](Targets& t, const py::list& chunks) {
             std::vector<Chunk> next;
             for (const py::handle h : chunks) {
               const py::tuple c = py::reinterpret_borrow<py::tuple>(h);
               if (c.size() != 3) throw py::value_error("RecordTargets.set_chunks: (chunk or None, cursor, base) per per-token output");
               Chunk chunk{py::reinterpret_borrow<py::object>(c[0]), py::reinterpret_borrow<py::object>(c[1]), nullptr,
                           c[2].cast<int64_t>()};
               chunk.cursor_data = reinterpret_cast<int64_t*>(host_array(chunk.cursor, 2, {8}));
               next.push_back(std::move(chunk));
             }
             t.chunks = std::move(next);
           },
           py::arg("chunks"));
  m.def("record_rows", &record_rows, py::arg("index"), py::arg("views"), py::arg("lengths"), py::arg("left"),
        py::arg("sources"), py::arg("targets"), py::arg("prints") = py::none(),
        "Recorder.add's fast path (provcollate.store.FastPath): checks, claims and copies one batch "
        "into host storage (with `prints`, each item's input fingerprint, booked in the Targets' prints); the "
        "RecordOutcome says whether it did, or how many rows a chunk lacks.");
}

}  // namespace provcollate
