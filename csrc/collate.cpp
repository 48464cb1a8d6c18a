// The Collator's fused pass: walk a batch of Python samples along the plan that
// provcollate/collate.py built from sample 0, check every sample against it, and write each
// field into one output tensor. Tensors and numpy arrays are copied with the GIL released;
// lists of Python numbers are read in place, without a tensor per item.
//
// The plan is plain Python tuples (codes shared with collate.py):
//   walk node  (MAP, path, expected, size, keys, children) | (SEQ, path, expected, is_list, size,
//              positions, children) | (LEAF, leaf_id) | (INDEX, what) | (VIEW,)
//   leaf       (path, kind, expected, object_type, pad_value, sequence): collate.py's _Leaf, a NamedTuple
// Error messages match collate.py's pure-Python path word for word.
#include "collate.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard: torch 2.11 does not bring it in through ATen.h
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/csrc/utils/tensor_numpy.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/stream.h"
#include "fingerprint.h"
#include "pyvalues.h"
#include "launch.h"

namespace py = pybind11;

namespace provcollate {
namespace {

enum NodeKind : int { kMap = 0, kSeq = 1, kLeaf = 2, kIndex = 3, kView = 4 };
enum LeafKind : int { kTensor = 0, kArray = 1, kNumber = 2, kList = 3, kObject = 4 };

struct Node {
  int kind = kLeaf;
  std::string path;      // field path inside the data, "" at the top
  std::string expected;  // what sample 0 holds here, for messages
  bool is_list = false;
  Py_ssize_t size = 0;
  std::vector<py::object> keys;  // kMap
  std::vector<Py_ssize_t> positions;  // kSeq
  std::vector<Node> children;
  int64_t leaf = -1;
  std::string what;  // kIndex: where the index sits, for messages
  std::vector<uint64_t> key_digests;  // kMap, with fingerprints: the digest of each key
};

Node parse_node(const py::handle& h) {
  const py::tuple t = py::reinterpret_borrow<py::tuple>(h);
  Node n;
  n.kind = t[0].cast<int>();
  switch (n.kind) {
    case kMap:
      n.path = t[1].cast<std::string>();
      n.expected = t[2].cast<std::string>();
      n.size = t[3].cast<Py_ssize_t>();
      for (const py::handle k : t[4]) n.keys.push_back(py::reinterpret_borrow<py::object>(k));
      for (const py::handle c : t[5]) n.children.push_back(parse_node(c));
      break;
    case kSeq:
      n.path = t[1].cast<std::string>();
      n.expected = t[2].cast<std::string>();
      n.is_list = t[3].cast<bool>();
      n.size = t[4].cast<Py_ssize_t>();
      for (const py::handle p : t[5]) n.positions.push_back(p.cast<Py_ssize_t>());
      for (const py::handle c : t[6]) n.children.push_back(parse_node(c));
      break;
    case kLeaf:
      n.leaf = t[1].cast<int64_t>();
      break;
    case kIndex:
      n.what = t[1].cast<std::string>();
      break;
    case kView:
      break;
    default:
      throw py::value_error("collate: unknown plan node kind " + std::to_string(n.kind));
  }
  return n;
}

struct Leaf {
  std::string path;
  int kind;
  std::string expected;
  py::object object_type;
  c10::Scalar pad_value;
  bool sequence;  // padded or packed, with lengths; else stacked (Collator(stack=...))
};

struct Options {
  int64_t batch;
  bool left;
  int64_t multiple;
  bool packed;
  bool pin;
  at::ScalarType float_dtype;
  bool fingerprint;
};

// ---------------------------------------------------------------------------------------------
// Messages

std::string subject(const std::string& path, int64_t b) {
  if (path.empty()) return "sample " + std::to_string(b);
  return "field '" + path + "' of sample " + std::to_string(b);
}

std::string child_path(const std::string& path, const py::handle& key) {
  const std::string k = py::str(key);
  return path.empty() ? k : path + "." + k;
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += std::to_string(s[i]) + (s.size() == 1 ? "," : (i + 1 < s.size() ? ", " : ""));
  return out + ")";
}

std::string where_str(const std::vector<Py_ssize_t>& at) {
  std::string out;
  for (const Py_ssize_t i : at) out += "[" + std::to_string(i) + "]";
  return out;
}

[[noreturn]] void type_error(const std::string& msg) { throw py::type_error("Collator: " + msg); }
[[noreturn]] void value_error(const std::string& msg) { throw py::value_error("Collator: " + msg); }

[[noreturn]] void mismatch(const std::string& path, int64_t b, PyObject* o, const std::string& expected) {
  type_error(subject(path, b) + " has type " + type_name(o) + ", expected " + expected + " like sample 0");
}

[[noreturn]] void int_overflow(const std::string& what, PyObject* o) {
  value_error(what + " " + std::string(py::str(o)) + ", which does not fit in int64");
}

at::ScalarType num_dtype(Num k, at::ScalarType float_dtype) {
  return k == Num::Bool ? at::kBool : (k == Num::Int ? at::kLong : float_dtype);
}

// ---------------------------------------------------------------------------------------------
// Walking the samples

// Every value is held by an owned reference: Python code run during the walk (a Mapping's
// __getitem__, an ABC check) or another thread while the copies run without the GIL may replace
// a field of a sample, and what was read must outlive that.
struct Walk {
  std::vector<std::vector<py::object>> items;  // [leaf][sample], owned
  std::vector<int64_t> index, view;

  void node(const Node& n, PyObject* obj, int64_t b);
  int64_t identity(const Node& n, PyObject* obj, int64_t b);
};

int64_t Walk::identity(const Node& n, PyObject* obj, int64_t b) {
  int64_t v = 0;
  if (PyLong_CheckExact(obj) && compact_int(obj, &v)) return v;
  const auto what = [&] {
    return "the " + std::string(n.kind == kIndex ? "index" : "view") + " of sample " + std::to_string(b) +
           (n.what.empty() ? "" : " (" + n.what + ")");
  };
  if (PyBool_Check(obj) || !(PyLong_Check(obj) || PyIndex_Check(obj))) {
    type_error(what() + " has type " + type_name(obj) + ", expected an int");
  }
  try {
    if (!int_value(obj, &v)) int_overflow(what() + " is", obj);
  } catch (py::error_already_set&) {
    type_error(what() + " has type " + type_name(obj) + ", expected an int");
  }
  return v;
}

void Walk::node(const Node& n, PyObject* obj, int64_t b) {
  switch (n.kind) {
    case kLeaf:
      items[n.leaf][b] = py::reinterpret_borrow<py::object>(obj);
      return;
    case kIndex:
      index[b] = identity(n, obj, b);
      return;
    case kView:
      view[b] = identity(n, obj, b);
      return;
    case kSeq: {
      const bool ok = n.is_list ? PyList_Check(obj) : PyTuple_Check(obj);
      if (!ok) mismatch(n.path, b, obj, "a " + n.expected);
      const Py_ssize_t size = PySequence_Fast_GET_SIZE(obj);
      if (size != n.size) {
        value_error(subject(n.path, b) + " has " + std::to_string(size) + " elements, expected " +
                    std::to_string(n.size) + " like sample 0");
      }
      for (size_t i = 0; i < n.children.size(); ++i) {
        // Read afresh for each child: walking the one before may have run Python code that
        // resized the container.
        if (PySequence_Fast_GET_SIZE(obj) != n.size) {
          value_error(subject(n.path, b) + " changed size while it was collated");
        }
        const py::object child = py::reinterpret_borrow<py::object>(PySequence_Fast_ITEMS(obj)[n.positions[i]]);
        node(n.children[i], child.ptr(), b);
      }
      return;
    }
    case kMap: {
      const bool is_dict = PyDict_Check(obj);
      if (!is_dict && !isinstance(obj, mapping_abc())) mismatch(n.path, b, obj, "a " + n.expected);
      for (size_t i = 0; i < n.children.size(); ++i) {
        py::object v;
        if (is_dict) {
          v = py::reinterpret_borrow<py::object>(PyDict_GetItemWithError(obj, n.keys[i].ptr()));
          if (!v && PyErr_Occurred()) throw py::error_already_set();
        } else {
          v = py::reinterpret_steal<py::object>(PyObject_GetItem(obj, n.keys[i].ptr()));
          if (!v) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError)) throw py::error_already_set();
            PyErr_Clear();
          }
        }
        if (!v) {
          value_error("field '" + child_path(n.path, n.keys[i]) + "' is missing from sample " +
                      std::to_string(b) + " (sample 0 has it)");
        }
        node(n.children[i], v.ptr(), b);
      }
      const Py_ssize_t size = is_dict ? PyDict_GET_SIZE(obj) : PyObject_Size(obj);
      if (size < 0) throw py::error_already_set();
      if (size != n.size) {
        // Every key of sample 0 is here, so some key of this sample is not in sample 0.
        const py::set known(py::cast(n.keys));
        for (const py::handle k : py::reinterpret_borrow<py::iterable>(obj)) {
          if (!known.contains(k)) {
            value_error("field '" + child_path(n.path, k) + "' of sample " + std::to_string(b) +
                        " is not in sample 0");
          }
        }
      }
      return;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Output layout of one field: padded [B, T, ...], packed [N, ...] or stacked [B, ...].

struct Layout {
  bool sequence = false;   // a padded (or packed) field, with lengths
  bool length_dim = true;  // items have a leading dim (0-d items stack to [B])
  bool packed = false;
  bool left = false;
  int64_t batch = 0;
  int64_t max_len = 1;  // T; for stacked fields the common length
  std::vector<int64_t> lengths;
  std::vector<int64_t> offsets;  // packed: [B+1] start row of each item

  int64_t total_rows() const { return packed ? offsets.back() : batch * max_len; }
  int64_t start(int64_t b) const { return left ? max_len - lengths[b] : 0; }
  // First output row of item b.
  int64_t first_row(int64_t b) const { return packed ? offsets[b] : b * max_len + start(b); }
  bool has_padding() const { return sequence && !packed; }

  std::vector<int64_t> shape(at::IntArrayRef trailing) const {
    std::vector<int64_t> s;
    if (packed) {
      s.push_back(offsets.back());
    } else {
      s.push_back(batch);
      if (length_dim) s.push_back(max_len);
    }
    s.insert(s.end(), trailing.begin(), trailing.end());
    return s;
  }
};

// Whether a field is a sequence is the plan's (types, ranks, arguments), never the lengths':
// a batch whose items happen to have one length is laid out like any other.
Layout make_layout(std::vector<int64_t> lengths, bool length_dim, bool sequence, const Leaf& leaf,
                   const Options& opt) {
  Layout l;
  l.batch = opt.batch;
  l.length_dim = length_dim;
  l.lengths = std::move(lengths);
  const auto [lo, hi] = std::minmax_element(l.lengths.begin(), l.lengths.end());
  l.sequence = length_dim && sequence;
  l.max_len = *hi;
  if (length_dim && !l.sequence && *lo != *hi) {
    const int64_t b = std::find_if(l.lengths.begin(), l.lengths.end(), [&](int64_t n) { return n != l.lengths[0]; }) -
                      l.lengths.begin();
    value_error(subject(leaf.path, b) + " has length " + std::to_string(l.lengths[b]) + ", but sample 0 has length " +
                std::to_string(l.lengths[0]) + ": fields named by stack= are stacked, so their items must have one shape");
  }
  if (l.sequence) {
    l.left = opt.left;
    // Collator bounds the multiple (2**20), so this cannot overflow.
    if (opt.multiple > 1) l.max_len = (l.max_len + opt.multiple - 1) / opt.multiple * opt.multiple;
    l.packed = opt.packed;
    if (l.packed) {
      l.offsets.assign(l.batch + 1, 0);
      for (int64_t b = 0; b < l.batch; ++b) l.offsets[b + 1] = l.offsets[b] + l.lengths[b];
    }
  }
  return l;
}

at::Tensor empty_out(at::IntArrayRef shape, at::ScalarType dtype, const Options& opt) {
  return at::empty(shape, at::TensorOptions().dtype(dtype).pinned_memory(opt.pin));
}

// The pad value must survive the trip into the field's dtype (-100 must not become 156 in
// uint8), by Python's == (0 pads a bool field); the pattern is built from the converted value.
FillPattern pad_pattern(const Leaf& leaf, at::ScalarType dtype, int64_t unit) {
  c10::Scalar cast;
  bool ok = true;
  try {
    const Element e = to_element(leaf.pad_value, dtype);
    cast = e.value;
    ok = represents(leaf.pad_value, dtype, e);
  } catch (const std::exception&) {  // c10::Error, or std::runtime_error on overflow
    ok = false;
  }
  if (!ok) {
    value_error("pad value " + std::string(py::str(py::cast(leaf.pad_value))) + " of field '" + leaf.path +
                "' does not fit its dtype " + std::string(py::str(py::cast(dtype))));
  }
  return FillPattern(cast, dtype, unit);
}

// The padding rows of item b around its real rows.
void fill_item_padding(char* base, int64_t row, const Layout& l, int64_t b, const FillPattern& fill,
                       bool stream = false) {
  char* item = base + b * l.max_len * row;
  const int64_t before = l.start(b);
  fill_span(item, before * row, fill, stream);
  fill_span(item + (before + l.lengths[b]) * row, (l.max_len - before - l.lengths[b]) * row, fill, stream);
}

struct LeafOut {
  py::object value;
  Layout layout;
  std::vector<uint64_t> digests;  // each item's, with fingerprints (else empty)
};

// Each item's digest read from the Python values (numbers, objects, lists of floats).
std::vector<uint64_t> object_digests(const std::vector<py::object>& objs, const Options& opt) {
  std::vector<uint64_t> d;
  if (!opt.fingerprint) return d;
  d.reserve(objs.size());
  for (const py::object& o : objs) d.push_back(object_digest(o.ptr()));
  return d;
}

// ---------------------------------------------------------------------------------------------
// Tensors and numpy arrays

at::Tensor array_tensor(const Leaf& leaf, PyObject* obj, int64_t b) {
  const NumpyTypes& np = numpy_types();
  if (!np.ok || (!isinstance(obj, np.generic) && !isinstance(obj, np.ndarray))) {
    mismatch(leaf.path, b, obj, leaf.expected);
  }
  try {
    py::object arr = isinstance(obj, np.ndarray) ? py::reinterpret_borrow<py::object>(obj) : np.asarray(py::handle(obj));
    try {
      return torch::utils::tensor_from_numpy(arr.ptr(), /*warn_if_not_writeable=*/false);
    } catch (const c10::Error&) {
      // Negative strides and the like: a C-ordered copy, as torch.as_tensor would make.
      arr = np.array(arr);
    }
    return torch::utils::tensor_from_numpy(arr.ptr(), /*warn_if_not_writeable=*/false);
  } catch (const c10::Error& e) {
    type_error(subject(leaf.path, b) + " cannot be read as a tensor: " + e.what_without_backtrace());
  }
}

LeafOut tensor_leaf(const Leaf& leaf, const std::vector<py::object>& objs, const Options& opt) {
  const int64_t B = opt.batch;
  // Owned references: the copies run without the GIL, when another thread could drop the samples.
  std::vector<at::Tensor> items;
  items.reserve(B);
  for (int64_t b = 0; b < B; ++b) {
    PyObject* obj = objs[b].ptr();
    if (leaf.kind == kTensor) {
      if (!THPVariable_Check(obj)) mismatch(leaf.path, b, obj, leaf.expected);
      items.push_back(THPVariable_Unpack(obj));
    } else {
      items.push_back(array_tensor(leaf, obj, b));
    }
  }
  const at::Tensor& t0 = items[0];
  const at::IntArrayRef shape0 = t0.sizes();
  const bool length_dim = t0.dim() > 0;
  const at::IntArrayRef trailing = length_dim ? shape0.slice(1) : shape0;
  at::ScalarType dtype = t0.scalar_type();
  std::vector<int64_t> lengths(B);
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor& x = items[b];
    if (x.layout() != at::kStrided || x.is_meta()) {
      type_error(subject(leaf.path, b) + " is a tensor with layout " + std::string(py::str(py::cast(x.layout()))) +
                 " on " + x.device().str() + "; only strided tensors with data can be collated");
    }
    const at::IntArrayRef s = x.sizes();
    if (s.size() != shape0.size() || (length_dim && s.slice(1) != trailing)) {
      value_error(subject(leaf.path, b) + " has shape " + shape_str(s) + ", but sample 0 has " + shape_str(shape0) +
                  ": all dims after the first must agree");
    }
    if (x.device() != t0.device()) {
      value_error(subject(leaf.path, b) + " is on " + x.device().str() + ", but sample 0 is on " + t0.device().str());
    }
    try {
      dtype = at::promoteTypes(dtype, x.scalar_type());
    } catch (const c10::Error&) {
      type_error(subject(leaf.path, b) + " has dtype " + std::string(py::str(py::cast(x.scalar_type()))) +
                 ", which torch cannot promote with " + std::string(py::str(py::cast(dtype))) +
                 " (the dtype of the samples before it): give every sample one dtype");
    }
    lengths[b] = length_dim ? s[0] : 1;
  }
  Layout l = make_layout(std::move(lengths), length_dim, leaf.sequence, leaf, opt);
  const bool host = t0.is_cpu();
  at::Tensor out = host ? empty_out(l.shape(trailing), dtype, opt)
                        : at::empty(l.shape(trailing), at::TensorOptions().dtype(dtype).device(t0.device()));
  // All rows of the output, [rows, trailing...]: item b owns rows [first_row(b), first_row(b) + L).
  std::vector<int64_t> rows_shape{l.total_rows()};
  rows_shape.insert(rows_shape.end(), trailing.begin(), trailing.end());
  const at::Tensor rows = out.view(rows_shape);
  const int64_t row = static_cast<int64_t>(c10::elementSize(dtype)) * c10::multiply_integers(trailing);
  char* base = static_cast<char*>(out.data_ptr());
  std::vector<const char*> src(B, nullptr);  // items that can be copied as bytes
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor& x = items[b];
    if (host && x.is_cpu() && x.scalar_type() == dtype && x.is_contiguous() && !x.is_conj() && !x.is_neg()) {
      src[b] = static_cast<const char*>(x.const_data_ptr());
    }
  }
  std::optional<FillPattern> fill;
  if (l.has_padding()) fill.emplace(pad_pattern(leaf, dtype, copy_unit(row, {base})));
  if (fill && !host) out.fill_(leaf.pad_value);
  // Fingerprints hash each item's own elements (its dtype, not the batch's), read right after
  // they are copied; items whose bytes cannot be read as they lie are made contiguous on the host.
  std::string headers;  // item b's is headers[header_at[b], header_at[b + 1])
  std::vector<size_t> header_at;
  std::vector<uint64_t> digests;
  if (opt.fingerprint) {
    header_at.reserve(B + 1);
    for (int64_t b = 0; b < B; ++b) {
      header_at.push_back(headers.size());
      append_tensor_header(headers, items[b].scalar_type(), items[b].sizes());
    }
    header_at.push_back(headers.size());
    digests.assign(B, 0);
  }
  {
    py::gil_scoped_release nogil;
    const int64_t item_bytes = std::max<int64_t>(1, l.max_len * row);
    constexpr int64_t kTaskBytes = 1 << 18;  // enough work per task to be worth a thread
    constexpr int64_t kHashPiece = 16 << 10;  // copied, then hashed from L1
    const bool stream = host && use_streaming(l.total_rows() * row);
    at::parallel_for(0, B, std::max<int64_t>(1, kTaskBytes / item_bytes), [&](int64_t begin, int64_t end) {
      const at::NoGradGuard no_grad;  // a batch never carries autograd history
      for (int64_t b = begin; b < end; ++b) {
        if (fill && host) fill_item_padding(base, row, l, b, *fill, stream);
        if (src[b] != nullptr && !digests.empty()) {
          // each piece hashed right after its copy, while it is still in L1
          char* dst = base + l.first_row(b) * row;
          const int64_t n = l.lengths[b] * row;
          const char* header = headers.data() + header_at[b];
          const size_t header_size = header_at[b + 1] - header_at[b];
          if (n <= kHashPiece) {
            copy_span(dst, src[b], n, stream);
            digests[b] = xxh3_64_prefixed(header, header_size, src[b], n);
            continue;
          }
          Xxh3 h;
          h.update(header, header_size);
          for (int64_t at = 0; at < n; at += kHashPiece) {
            const int64_t piece = std::min(kHashPiece, n - at);
            copy_span(dst + at, src[b] + at, piece, stream);
            h.update(src[b] + at, piece);
          }
          digests[b] = h.digest();
        } else if (src[b] != nullptr) {
          copy_span(base + l.first_row(b) * row, src[b], l.lengths[b] * row, stream);
        } else {
          rows.narrow(0, l.first_row(b), l.lengths[b]).copy_(items[b]);
          if (!digests.empty()) {
            const at::Tensor own = host_elements(items[b]);
            digests[b] = bytes_digest(headers.data() + header_at[b], header_at[b + 1] - header_at[b],
                                      own.const_data_ptr(), own.numel() * own.element_size());
          }
        }
      }
      end_stream(stream);
    });
  }
  return {py::cast(out), std::move(l), std::move(digests)};
}

// ---------------------------------------------------------------------------------------------
// Numbers

LeafOut number_leaf(const Leaf& leaf, const std::vector<py::object>& objs, const Options& opt) {
  const int64_t B = opt.batch;
  Num kind = Num::Bool;
  for (int64_t b = 0; b < B; ++b) {
    const Num k = num_kind(objs[b].ptr());
    if (k == Num::Bad) mismatch(leaf.path, b, objs[b].ptr(), leaf.expected);
    kind = std::max(kind, k);
  }
  const at::ScalarType dtype = num_dtype(kind, at::kDouble);
  Layout l = make_layout(std::vector<int64_t>(B, 1), /*length_dim=*/false, false, leaf, opt);
  at::Tensor out = empty_out({B}, dtype, opt);
  for (int64_t b = 0; b < B; ++b) {
    PyObject* o = objs[b].ptr();
    switch (kind) {
      case Num::Bool:
        out.mutable_data_ptr<bool>()[b] = bool_value(o);
        break;
      case Num::Int: {
        int64_t v = 0;
        if (num_kind(o) == Num::Bool) {
          v = bool_value(o);
        } else if (!int_value(o, &v)) {
          int_overflow(subject(leaf.path, b) + " is", o);
        }
        out.mutable_data_ptr<int64_t>()[b] = v;
        break;
      }
      default:
        try {
          out.mutable_data_ptr<double>()[b] = num_kind(o) == Num::Bool ? bool_value(o) : float_value(o);
        } catch (py::error_already_set& e) {
          if (!e.matches(PyExc_OverflowError)) throw;
          value_error(subject(leaf.path, b) + " is an int too large for float64, the dtype of this "
                      "field because some sample holds a float there");
        }
    }
  }
  return {py::cast(out), std::move(l), object_digests(objs, opt)};
}

// ---------------------------------------------------------------------------------------------
// Lists of numbers, nested to any depth: [L, d1, d2, ...]

template <typename T>
struct ListWriter {
  const Leaf& leaf;
  const std::vector<int64_t>& trailing;  // sizes of the nested dims, from the field's first item
  Num kind;                              // what T holds
  int64_t sample = 0;
  Num wider = Num::Bool;  // set above `kind` when an element needs a wider dtype
  std::vector<Py_ssize_t> at;

  [[noreturn]] void ragged(Py_ssize_t i, const std::string& found, const std::string& expected) {
    at.push_back(i);
    value_error(subject(leaf.path, sample) + " is a ragged nested list: element " + where_str(at) + " is " + found +
                ", expected " + expected);
  }

  std::string list_of(int64_t n) { return "a list of " + std::to_string(n) + " elements"; }

  // Ints reach floating dtypes through double, as torch.tensor converts them.
  static void store(T* dst, int64_t v) {
    if constexpr (std::is_integral_v<T>) {
      *dst = static_cast<T>(v);
    } else {
      *dst = static_cast<T>(static_cast<double>(v));
    }
  }

  // Any element but a small int; false when it needs a wider dtype.
  C10_NOINLINE bool number(PyObject* o, T* dst, Py_ssize_t i) {
    int64_t v = 0;
    const Num k = num_kind(o);
    if (k == Num::Bad) {
      if (PyList_Check(o)) ragged(i, "a list", "a number");
      at.push_back(i);
      type_error(subject(leaf.path, sample) + " holds a " + type_name(o) + " at " + where_str(at) +
                 "; lists must hold only numbers (bool, int, float)");
    }
    if (k > kind) {
      wider = k;
      return false;
    }
    if (k == Num::Bool) {
      *dst = static_cast<T>(bool_value(o));
    } else if (k == Num::Int) {
      if (!int_value(o, &v)) {
        at.push_back(i);
        int_overflow(subject(leaf.path, sample) + " holds at " + where_str(at), o);
      }
      store(dst, v);
    } else {
      *dst = static_cast<T>(float_value(o));
    }
    return true;
  }

  // Writes the numbers of `list`, found at nesting depth `depth`; false when a wider dtype is needed.
  bool write(PyObject* list, size_t depth, T*& dst) {
    const Py_ssize_t n = PyList_GET_SIZE(list);
    PyObject** el = PySequence_Fast_ITEMS(list);
    if (depth == trailing.size()) {
      // The hot loop (token ids): locals only, so that they live in registers.
      const bool ints = kind != Num::Bool;
      T* out = dst;
      for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* o = el[i];
        int64_t v;
        if (ints && PyLong_CheckExact(o) && compact_int(o, &v)) {
          store(out + i, v);
        } else if (!number(o, out + i, i)) {
          return false;
        }
      }
      dst = out + n;
      return true;
    }
    const int64_t want = trailing[depth];
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* sub = el[i];
      if (!PyList_Check(sub)) ragged(i, "a " + type_name(sub), list_of(want));
      if (PyList_GET_SIZE(sub) != want) ragged(i, list_of(PyList_GET_SIZE(sub)), list_of(want));
      at.push_back(i);
      if (!write(sub, depth + 1, dst)) return false;
      at.pop_back();
    }
    return true;
  }
};

// Writes every item into `out`; returns the wider kind needed, or `kind` when done.
template <typename T>
Num write_lists(const Leaf& leaf, const std::vector<py::object>& objs, const std::vector<int64_t>& trailing,
                const Layout& l, Num kind, at::Tensor& out) {
  const int64_t inner = c10::multiply_integers(trailing);
  T* base = out.mutable_data_ptr<T>();
  ListWriter<T> w{leaf, trailing, kind, /*sample=*/0, /*wider=*/kind, /*at=*/{}};
  for (int64_t b = 0; b < l.batch; ++b) {
    T* dst = base + l.first_row(b) * inner;
    w.sample = b;
    w.at.clear();
    if (!w.write(objs[b].ptr(), 0, dst)) return w.wider;
  }
  // The pad value is checked against the final dtype, once every element is known to fit it.
  if (l.has_padding()) {
    const int64_t row = inner * static_cast<int64_t>(sizeof(T));
    const FillPattern fill = pad_pattern(leaf, out.scalar_type(), copy_unit(row, {base}));
    for (int64_t b = 0; b < l.batch; ++b) fill_item_padding(reinterpret_cast<char*>(base), row, l, b, fill);
  }
  return kind;
}

// Each item's digest: the int64 tensor its numbers make, hashed from the rows just written when
// the field is int64 (bools widened to it first); a float field's items are read again, since
// one of them may hold only ints and each item is hashed as its own numbers make it.
std::vector<uint64_t> list_digests(const std::vector<py::object>& objs, const std::vector<int64_t>& trailing,
                                   const Layout& l, Num kind, const at::Tensor& out, const Options& opt) {
  if (!opt.fingerprint) return {};
  if (kind == Num::Float) return object_digests(objs, opt);
  const int64_t inner = c10::multiply_integers(trailing);
  std::vector<uint64_t> d(l.batch);
  std::vector<int64_t> widened;
  std::vector<int64_t> shape{0};
  std::string header;
  for (int64_t b = 0; b < l.batch; ++b) {
    shape.resize(1);
    shape[0] = l.lengths[b];
    if (l.lengths[b] > 0) shape.insert(shape.end(), trailing.begin(), trailing.end());
    header.clear();
    append_tensor_header(header, at::kLong, shape);
    const int64_t n = l.lengths[b] * inner;
    if (kind == Num::Int) {
      d[b] = bytes_digest(header, out.const_data_ptr<int64_t>() + l.first_row(b) * inner, n * sizeof(int64_t));
    } else {
      const bool* from = out.const_data_ptr<bool>() + l.first_row(b) * inner;
      widened.assign(from, from + n);
      d[b] = bytes_digest(header, widened.data(), n * sizeof(int64_t));
    }
  }
  return d;
}

LeafOut list_leaf(const Leaf& leaf, const std::vector<py::object>& objs, const Options& opt) {
  const int64_t B = opt.batch;
  std::vector<int64_t> lengths(B);
  int64_t first = -1;
  for (int64_t b = 0; b < B; ++b) {
    if (!PyList_Check(objs[b].ptr())) mismatch(leaf.path, b, objs[b].ptr(), leaf.expected);
    lengths[b] = PyList_GET_SIZE(objs[b].ptr());
    if (first < 0 && lengths[b] > 0) first = b;
  }
  // Nested dims and a first guess of the dtype, from the first element of the first non-empty item.
  std::vector<int64_t> trailing;
  Num kind = Num::Float;  // no element at all: torch.tensor([]) is of the default float dtype
  if (first >= 0) {
    PyObject* el = PyList_GET_ITEM(objs[first].ptr(), 0);
    while (PyList_Check(el) && PyList_GET_SIZE(el) > 0) {
      trailing.push_back(PyList_GET_SIZE(el));
      el = PyList_GET_ITEM(el, 0);
    }
    if (PyList_Check(el)) {
      trailing.push_back(0);
    } else {
      kind = std::min(num_kind(el), Num::Float);
    }
  }
  Layout l = make_layout(std::move(lengths), /*length_dim=*/true, leaf.sequence, leaf, opt);
  const std::vector<int64_t> shape = l.shape(trailing);
  while (true) {
    at::Tensor out = empty_out(shape, num_dtype(kind, opt.float_dtype), opt);
    Num need = kind;
    if (kind == Num::Bool) {
      need = write_lists<bool>(leaf, objs, trailing, l, kind, out);
    } else if (kind == Num::Int) {
      need = write_lists<int64_t>(leaf, objs, trailing, l, kind, out);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "collate_list", [&] {
        need = write_lists<scalar_t>(leaf, objs, trailing, l, kind, out);
      });
    }
    if (need == kind) {
      std::vector<uint64_t> digests = list_digests(objs, trailing, l, kind, out, opt);
      return {py::cast(out), std::move(l), std::move(digests)};
    }
    kind = need;
  }
}

// ---------------------------------------------------------------------------------------------
// Other objects stay a list

LeafOut object_leaf(const Leaf& leaf, const std::vector<py::object>& objs, const Options& opt) {
  const int64_t B = opt.batch;
  PyObject* type = leaf.object_type.ptr();
  const bool any = type == reinterpret_cast<PyObject*>(Py_TYPE(Py_None));
  py::list out(B);
  for (int64_t b = 0; b < B; ++b) {
    PyObject* o = objs[b].ptr();
    if (!any && o != Py_None && reinterpret_cast<PyObject*>(Py_TYPE(o)) != type) {
      mismatch(leaf.path, b, o, leaf.expected);
    }
    out[b] = py::reinterpret_borrow<py::object>(o);
  }
  return {std::move(out), make_layout(std::vector<int64_t>(B, 1), false, false, leaf, opt), object_digests(objs, opt)};
}

// ---------------------------------------------------------------------------------------------

at::Tensor long_tensor(const std::vector<int64_t>& v, const Options& opt) {
  at::Tensor t = empty_out({static_cast<int64_t>(v.size())}, at::kLong, opt);
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<int64_t>());
  return t;
}

at::Tensor mask_of(const Layout& l, const Options& opt) {
  at::Tensor mask = empty_out({l.batch, l.max_len}, at::kBool, opt);
  bool* m = mask.mutable_data_ptr<bool>();
  for (int64_t b = 0; b < l.batch; ++b) {
    bool* row = m + b * l.max_len;
    std::fill_n(row, l.max_len, false);
    std::fill_n(row + l.start(b), l.lengths[b], true);
  }
  return mask;
}

// A pad value (collate.py checked it is a bool, an int64 or a float).
c10::Scalar scalar_of(const py::handle& v) {
  if (PyBool_Check(v.ptr())) return c10::Scalar(v.ptr() == Py_True);
  if (PyLong_Check(v.ptr())) return c10::Scalar(v.cast<int64_t>());
  return c10::Scalar(v.cast<double>());
}

// The digests of each map node's keys, once per batch: every sample has sample 0's keys.
void digest_keys(Node& n) {
  if (n.kind == kMap) {
    for (const py::object& k : n.keys) n.key_digests.push_back(object_digest(k.ptr()));
  }
  for (Node& c : n.children) digest_keys(c);
}

// The digest of sample b's data under node n, from its leaves' digests; the index and view
// nodes are not data (a raw sample's index is left out of its container). `scratch` holds the
// children's digests of every level, reused from sample to sample.
struct Scratch {
  std::vector<uint64_t> digests;
  std::vector<std::pair<uint64_t, uint64_t>> pairs;
};

uint64_t combine(const Node& n, int64_t b, const std::vector<LeafOut>& outs, Scratch& s) {
  if (n.kind == kLeaf) return outs[n.leaf].digests[b];
  if (n.kind == kMap) {
    const size_t base = s.pairs.size();
    for (size_t i = 0; i < n.children.size(); ++i) {
      if (n.children[i].kind == kIndex) continue;
      const uint64_t value = combine(n.children[i], b, outs, s);
      s.pairs.emplace_back(n.key_digests[i], value);
    }
    const uint64_t d = mapping_digest(s.pairs.data() + base, s.pairs.size() - base);
    s.pairs.resize(base);
    return d;
  }
  const size_t base = s.digests.size();
  for (const Node& c : n.children) {  // kSeq
    if (c.kind != kIndex && c.kind != kView) {
      const uint64_t value = combine(c, b, outs, s);
      s.digests.push_back(value);
    }
  }
  const uint64_t d = sequence_digest(n.is_list ? 'L' : 'U', s.digests.data() + base, s.digests.size() - base);
  s.digests.resize(base);
  return d;
}

py::tuple collate(const py::list& samples, const py::tuple& walk_plan, const py::tuple& leaf_plan, bool left,
                  int64_t multiple, bool packed, bool pin, at::ScalarType float_dtype, int64_t primary,
                  bool fingerprint, int64_t data_child) {
  const Options opt{static_cast<int64_t>(samples.size()), left, multiple, packed, pin, float_dtype, fingerprint};
  if (opt.batch == 0) throw py::value_error("Collator: samples must be a non-empty list, got an empty one");
  Node root = parse_node(walk_plan);
  if (data_child >= static_cast<int64_t>(root.children.size())) {
    throw py::value_error("collate: data_child " + std::to_string(data_child) + " is not a child of the plan's root");
  }
  std::vector<Leaf> leaves;
  for (const py::handle h : leaf_plan) {
    const py::tuple t = py::reinterpret_borrow<py::tuple>(h);
    leaves.push_back({t[0].cast<std::string>(), t[1].cast<int>(), t[2].cast<std::string>(),
                      py::reinterpret_borrow<py::object>(t[3]), scalar_of(t[4]), t[5].cast<bool>()});
  }
  Walk w;
  w.items.assign(leaves.size(), std::vector<py::object>(opt.batch));
  w.index.assign(opt.batch, 0);
  w.view.assign(opt.batch, 0);
  for (int64_t b = 0; b < opt.batch; ++b) {
    const py::object sample = samples[b];
    w.node(root, sample.ptr(), b);
  }

  std::vector<LeafOut> outs;
  outs.reserve(leaves.size());
  for (size_t i = 0; i < leaves.size(); ++i) {
    const Leaf& leaf = leaves[i];
    switch (leaf.kind) {
      case kTensor:
      case kArray: outs.push_back(tensor_leaf(leaf, w.items[i], opt)); break;
      case kNumber: outs.push_back(number_leaf(leaf, w.items[i], opt)); break;
      case kList: outs.push_back(list_leaf(leaf, w.items[i], opt)); break;
      default: outs.push_back(object_leaf(leaf, w.items[i], opt));
    }
  }
  if (primary < 0) {
    for (size_t i = 0; i < outs.size() && primary < 0; ++i) {
      if (outs[i].layout.sequence) primary = static_cast<int64_t>(i);
    }
  }
  py::list result;
  for (const LeafOut& o : outs) {
    const Layout& l = o.layout;
    if (!l.sequence) {
      result.append(py::make_tuple(o.value, py::none(), py::none(), py::none()));
      continue;
    }
    result.append(py::make_tuple(o.value, long_tensor(l.lengths, opt),
                                 l.packed ? py::cast(long_tensor(l.offsets, opt)) : py::none(), l.max_len));
  }
  py::object mask = py::none();
  if (primary >= 0 && !packed) mask = py::cast(mask_of(outs[primary].layout, opt));
  py::object fingerprints = py::none();
  if (fingerprint) {
    digest_keys(root);
    const Node& data = data_child >= 0 ? root.children[data_child] : root;
    std::vector<int64_t> fp(opt.batch);
    Scratch scratch;
    for (int64_t b = 0; b < opt.batch; ++b) fp[b] = static_cast<int64_t>(combine(data, b, outs, scratch));
    fingerprints = py::cast(long_tensor(fp, opt));
  }
  return py::make_tuple(long_tensor(w.index, opt), long_tensor(w.view, opt), result, primary, mask, fingerprints);
}

}  // namespace

void bind_collate(py::module_& m) {
  m.def("collate", &collate, py::arg("samples"), py::arg("walk"), py::arg("leaves"), py::arg("left"),
        py::arg("pad_to_multiple_of"), py::arg("packed"), py::arg("pin_memory"), py::arg("float_dtype"),
        py::arg("primary"), py::arg("fingerprint") = false, py::arg("data_child") = -1,
        "Collate a list of samples along a plan built by provcollate.collate; see provcollate.Collator.");
}

}  // namespace provcollate
