// Fingerprints of Python values: XXH3-64 over the tagged encoding of provcollate/fingerprints.py.
#include "fingerprint.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/csrc/utils/tensor_numpy.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "pyvalues.h"

namespace provcollate {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "fingerprints hash little-endian bytes as they lie in memory");

namespace {

constexpr int kMaxDepth = 200;
constexpr size_t kMaxDims = 64;

void append_u64(std::string& s, uint64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }

uint64_t tagged(char tag, const void* data, size_t n) { return xxh3_64_prefixed(&tag, 1, data, n); }

}  // namespace

// torch's own names (str(dtype) without "torch."), the common ones without a call into Python.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kBool: return "bool";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: {
      std::string name = py::str(py::cast(t));
      return name.rfind("torch.", 0) == 0 ? name.substr(6) : name;
    }
  }
}

void append_tensor_header(std::string& out, at::ScalarType dtype, at::IntArrayRef sizes) {
  const std::string name = dtype_name(dtype);
  out.push_back('T');
  out.push_back(static_cast<char>(name.size()));
  out += name;
  out.push_back(static_cast<char>(sizes.size()));
  for (const int64_t s : sizes) append_u64(out, static_cast<uint64_t>(s));
}

std::string tensor_header(at::ScalarType dtype, at::IntArrayRef sizes) {
  std::string h;
  append_tensor_header(h, dtype, sizes);
  return h;
}

uint64_t bytes_digest(const char* header, size_t header_size, const void* data, size_t n) {
  return xxh3_64_prefixed(header, header_size, data, n);
}

uint64_t bytes_digest(const std::string& header, const void* data, size_t n) {
  return bytes_digest(header.data(), header.size(), data, n);
}

at::Tensor host_elements(const at::Tensor& t) {
  at::Tensor x = t.resolve_conj().resolve_neg();
  if (!x.is_cpu()) x = x.cpu();
  return x.contiguous();
}

uint64_t sequence_digest(char tag, const uint64_t* children, size_t n) {
  unsigned char head[9];
  head[0] = static_cast<unsigned char>(tag);
  const uint64_t count = n;
  std::memcpy(head + 1, &count, 8);
  return xxh3_64_prefixed(head, 9, children, 8 * n);
}

uint64_t sequence_digest(char tag, const std::vector<uint64_t>& children) {
  return sequence_digest(tag, children.data(), children.size());
}

uint64_t mapping_digest(std::pair<uint64_t, uint64_t>* pairs, size_t n) {
  static_assert(sizeof(std::pair<uint64_t, uint64_t>) == 16, "pairs lie as (key digest, value digest) words");
  std::sort(pairs, pairs + n);
  unsigned char head[9];
  head[0] = 'M';
  const uint64_t count = n;
  std::memcpy(head + 1, &count, 8);
  return xxh3_64_prefixed(head, 9, pairs, 16 * n);
}

uint64_t mapping_digest(std::vector<std::pair<uint64_t, uint64_t>> pairs) {
  return mapping_digest(pairs.data(), pairs.size());
}

namespace {

uint64_t tensor_digest(const at::Tensor& t) {
  const std::string header = tensor_header(t.scalar_type(), t.sizes());
  const at::Tensor x = host_elements(t.detach());
  return bytes_digest(header, x.const_data_ptr(), x.numel() * x.element_size());
}

// A list of numbers, rectangular, judged by its first elements (an empty one counts): its sizes
// and elements; false when `list` is not one (another list, a ragged one, an int past int64).
struct NumericList {
  std::vector<int64_t> shape;
  std::vector<PyObject*> flat;  // borrowed from `list`, which the caller holds
  bool any_float = false;

  bool walk(PyObject* v, size_t depth) {
    const Py_ssize_t n = PyList_GET_SIZE(v);
    if (n != shape[depth]) return false;
    PyObject** el = PySequence_Fast_ITEMS(v);
    if (depth + 1 == shape.size()) {
      for (Py_ssize_t i = 0; i < n; ++i) {
        if (PyList_Check(el[i])) return false;
        const Num k = num_kind(el[i]);
        if (k == Num::Bad) return false;
        any_float = any_float || k == Num::Float;
        flat.push_back(el[i]);
      }
      return true;
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!PyList_Check(el[i]) || !walk(el[i], depth + 1)) return false;
    }
    return true;
  }

  bool read(PyObject* list) {
    PyObject* y = list;
    while (PyList_Check(y)) {
      shape.push_back(PyList_GET_SIZE(y));
      if (PyList_GET_SIZE(y) == 0 || shape.size() > kMaxDims) break;  // (a list that holds itself ends here too)
      y = PyList_GET_ITEM(y, 0);
    }
    if (shape.size() > kMaxDims) return false;
    if (shape.back() != 0 && (PyList_Check(y) || num_kind(y) == Num::Bad)) return false;
    return walk(list, 0);
  }
};

// Digest of a numeric list: int64 elements, or float64 when any is a float; nullopt-like false
// when an int does not fit int64 (then the list is hashed as a container).
bool numeric_digest(const NumericList& nl, uint64_t* out) {
  const std::string header = tensor_header(nl.any_float ? at::kDouble : at::kLong, nl.shape);
  if (nl.any_float) {
    std::vector<double> values(nl.flat.size());
    for (size_t i = 0; i < values.size(); ++i) {
      PyObject* o = nl.flat[i];
      values[i] = num_kind(o) == Num::Bool ? (bool_value(o) ? 1.0 : 0.0) : float_value(o);
    }
    *out = bytes_digest(header, values.data(), values.size() * sizeof(double));
    return true;
  }
  std::vector<int64_t> values(nl.flat.size());
  for (size_t i = 0; i < values.size(); ++i) {
    PyObject* o = nl.flat[i];
    if (num_kind(o) == Num::Bool) {
      values[i] = bool_value(o);
    } else if (!int_value(o, &values[i])) {
      return false;
    }
  }
  *out = bytes_digest(header, values.data(), values.size() * sizeof(int64_t));
  return true;
}

uint64_t int_digest(PyObject* o) {
  const py::object v = py::reinterpret_steal<py::object>(PyNumber_Long(o));
  if (!v) throw py::error_already_set();
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow == 0) return tagged('I', &x, 8);
  const std::string text = py::str(v);
  return tagged('J', text.data(), text.size());
}

uint64_t utf8_digest(PyObject* o) {
  Py_ssize_t size = 0;
  if (const char* utf8 = PyUnicode_AsUTF8AndSize(o, &size)) return tagged('S', utf8, size);
  PyErr_Clear();  // lone surrogates: encoded with surrogatepass below
  const py::object b = py::reinterpret_steal<py::object>(PyUnicode_AsEncodedString(o, "utf-8", "surrogatepass"));
  if (!b) throw py::error_already_set();
  return tagged('S', PyBytes_AS_STRING(b.ptr()), PyBytes_GET_SIZE(b.ptr()));
}

uint64_t type_digest(PyObject* o) {
  const py::handle type(reinterpret_cast<PyObject*>(Py_TYPE(o)));
  const std::string name = py::str(type.attr("__module__")).cast<std::string>() + "." +
                           py::str(type.attr("__qualname__")).cast<std::string>();
  const py::bytes encoded = py::reinterpret_steal<py::bytes>(
      PyUnicode_AsEncodedString(py::str(name).ptr(), "utf-8", "surrogatepass"));
  if (!encoded) throw py::error_already_set();
  const std::string bytes = encoded;
  return tagged('O', bytes.data(), bytes.size());
}

// A numpy array or scalar as a tensor; an undefined tensor when torch cannot hold its dtype.
at::Tensor numpy_tensor(PyObject* o) {
  const NumpyTypes& np = numpy_types();
  py::object arr = np.asarray(py::handle(o));
  for (int attempt = 0; attempt < 2; ++attempt) {
    try {
      return torch::utils::tensor_from_numpy(arr.ptr(), /*warn_if_not_writeable=*/false);
    } catch (const c10::Error&) {
    } catch (py::error_already_set&) {
    }
    if (attempt == 0) arr = np.array(arr);
  }
  return at::Tensor();
}

}  // namespace

uint64_t object_digest(PyObject* o, int depth) {
  if (depth > kMaxDepth) {
    throw py::value_error("fingerprint: data nested deeper than " + std::to_string(kMaxDepth) + " levels");
  }
  // Exact builtins first: no numpy scalar is one of them.
  int64_t small = 0;
  if (PyLong_CheckExact(o) && compact_int(o, &small)) return tagged('I', &small, 8);
  if (PyFloat_CheckExact(o)) {
    const double x = PyFloat_AS_DOUBLE(o);
    return tagged('F', &x, 8);
  }
  if (PyUnicode_CheckExact(o)) return utf8_digest(o);
  if (THPVariable_Check(o)) return tensor_digest(THPVariable_Unpack(o));
  const NumpyTypes& np = numpy_types();
  if (np.ok && (isinstance(o, np.ndarray) || isinstance(o, np.generic))) {
    const at::Tensor t = numpy_tensor(o);
    return t.defined() ? tensor_digest(t) : type_digest(o);
  }
  if (PyLong_Check(o)) return int_digest(o);  // bool too: True is 1
  if (PyFloat_Check(o)) {
    const double x = PyFloat_AS_DOUBLE(o);
    return tagged('F', &x, 8);
  }
  if (PyUnicode_Check(o)) return utf8_digest(o);
  if (PyBytes_Check(o)) return tagged('B', PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o));
  if (o == Py_None) return tagged('N', "", 0);
  if (PyList_Check(o) || PyTuple_Check(o)) {
    const py::object held = py::reinterpret_borrow<py::object>(o);  // elements stay alive while read
    if (PyList_Check(o)) {
      NumericList nl;
      uint64_t d = 0;
      if (nl.read(o) && numeric_digest(nl, &d)) return d;
    }
    std::vector<uint64_t> children;
    const py::object items = py::reinterpret_steal<py::object>(PySequence_Fast(o, "fingerprint"));
    if (!items) throw py::error_already_set();
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(items.ptr()); ++i) {
      const py::object child = py::reinterpret_borrow<py::object>(PySequence_Fast_GET_ITEM(items.ptr(), i));
      children.push_back(object_digest(child.ptr(), depth + 1));
    }
    return sequence_digest(PyList_Check(o) ? 'L' : 'U', children);
  }
  if (PyDict_Check(o) || isinstance(o, mapping_abc())) {
    std::vector<std::pair<uint64_t, uint64_t>> pairs;
    const py::object entries = py::reinterpret_borrow<py::object>(o).attr("items")();
    for (const py::handle kv : entries) {
      const py::tuple pair = py::reinterpret_borrow<py::tuple>(kv);
      pairs.emplace_back(object_digest(pair[0].ptr(), depth + 1), object_digest(pair[1].ptr(), depth + 1));
    }
    return mapping_digest(std::move(pairs));
  }
  return type_digest(o);
}

void bind_fingerprint(py::module_& m) {
  m.def(
      "fingerprint", [](const py::handle& data) { return static_cast<int64_t>(object_digest(data.ptr())); },
      py::arg("data"), "The fingerprint of one example's data (signed int64); see provcollate.fingerprint.");
  m.def(
      "xxh3_64",
      [](const py::bytes& data, size_t piece) {
        const std::string_view b(data);
        Xxh3 h;
        for (size_t at = 0; at < b.size(); at += std::max<size_t>(piece, 1)) {
          h.update(b.data() + at, std::min(b.size() - at, std::max<size_t>(piece, 1)));
        }
        return h.digest();
      },
      py::arg("data"), py::arg("piece") = SIZE_MAX,
      "XXH3-64 of `data` fed to the streaming hash `piece` bytes at a time (the digest does not depend on it).");
  m.def(
      "xxh3_64_prefixed",
      [](const py::bytes& head, const py::bytes& data) {
        const std::string_view h(head), d(data);
        return xxh3_64_prefixed(h.data(), h.size(), d.data(), d.size());
      },
      py::arg("head"), py::arg("data"), "XXH3-64 of head + data, in one call.");
  m.attr("xxh3_isa") = xxh3_isa();
}

}  // namespace provcollate
