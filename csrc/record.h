// The Recorder's compiled hot path (record.cpp), bound into provcollate._C by provcollate.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace provcollate {

// Adds `record_rows(index, views, lengths, left, count, token_len, sources, targets)` to the
// module; provcollate/record.py (Recorder._add_fast) builds its arguments.
void bind_record(pybind11::module_& m);

}  // namespace provcollate
