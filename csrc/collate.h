// The collate fast path (collate.cpp), bound into provcollate._C by provcollate.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace provcollate {

// Adds `collate(samples, walk, leaves, left, pad_to_multiple_of, packed, pin_memory,
// float_dtype, primary)` to the module; provcollate/collate.py builds its plan arguments.
void bind_collate(pybind11::module_& m);

}  // namespace provcollate
