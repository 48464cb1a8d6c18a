// Python values as the fused collate pass and the fingerprints read them: numbers (bool < int <
// float, like torch.tensor's inference, numpy scalars included), numpy and Mapping types. Call
// with the GIL held.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace provcollate {

namespace py = pybind11;

inline std::string type_name(PyObject* o) {
  return py::str(py::handle(reinterpret_cast<PyObject*>(Py_TYPE(o))).attr("__name__"));
}

// Python numbers: bool < int < float, like torch.tensor's inference.

enum class Num : int { Bool = 0, Int = 1, Float = 2, Bad = 3 };

struct NumpyTypes {
  py::object ndarray, generic, bool_, integer, floating, asarray, array;
  bool ok = false;
};

inline const py::object& mapping_abc() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> storage;
  return storage.call_once_and_store_result([] { return py::module_::import("collections.abc").attr("Mapping"); })
      .get_stored();
}

inline const NumpyTypes& numpy_types() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<NumpyTypes> storage;
  return storage
      .call_once_and_store_result([] {
        NumpyTypes t;
        try {
          const py::module_ np = py::module_::import("numpy");
          t.ndarray = np.attr("ndarray");
          t.generic = np.attr("generic");
          t.bool_ = np.attr("bool_");
          t.integer = np.attr("integer");
          t.floating = np.attr("floating");
          t.asarray = np.attr("asarray");
          t.array = np.attr("array");
          t.ok = true;
        } catch (py::error_already_set&) {
          t.ok = false;  // numpy is optional: without it no sample can hold an array
        }
        return t;
      })
      .get_stored();
}

inline bool isinstance(PyObject* o, const py::object& type) {
  const int r = PyObject_IsInstance(o, type.ptr());
  if (r < 0) throw py::error_already_set();
  return r == 1;
}

inline Num num_kind(PyObject* o) {
  if (PyLong_CheckExact(o)) return Num::Int;
  if (PyFloat_Check(o)) return Num::Float;
  if (PyBool_Check(o)) return Num::Bool;
  if (PyLong_Check(o)) return Num::Int;
  const NumpyTypes& np = numpy_types();
  if (np.ok && isinstance(o, np.generic)) {
    if (isinstance(o, np.bool_)) return Num::Bool;
    if (isinstance(o, np.integer)) return Num::Int;
    if (isinstance(o, np.floating)) return Num::Float;
  }
  return Num::Bad;
}

// The value of a small exact int without a call (token ids are almost always small).
inline bool compact_int(PyObject* o, int64_t* v) {
#if PY_VERSION_HEX >= 0x030C0000
  if (!PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(o))) return false;
  *v = PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(o));
  return true;
#else
  const Py_ssize_t size = Py_SIZE(o);
  if (size < -1 || size > 1) return false;
  *v = size == 0 ? 0 : size * static_cast<int64_t>(reinterpret_cast<PyLongObject*>(o)->ob_digit[0]);
  return true;
#endif
}

// Any int (or numpy integer) as int64; false when it does not fit.
inline bool int_value(PyObject* o, int64_t* v) {
  if (PyLong_CheckExact(o) && compact_int(o, v)) return true;
  const py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(o));
  if (!idx) throw py::error_already_set();
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(idx.ptr(), &overflow);
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  *v = x;
  return overflow == 0;
}

inline double float_value(PyObject* o) {
  if (PyFloat_Check(o)) return PyFloat_AS_DOUBLE(o);
  const double x = PyFloat_AsDouble(o);
  if (x == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return x;
}

inline bool bool_value(PyObject* o) {
  if (PyBool_Check(o)) return o == Py_True;
  const int r = PyObject_IsTrue(o);
  if (r < 0) throw py::error_already_set();
  return r == 1;
}

}  // namespace provcollate
