// The Recorder's compiled hot path (record.cpp), bound into provcollate._C by provcollate.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace provcollate {

// Adds `record_rows(index, views, lengths, left, sources, targets)` and its named records
// RecordTargets (with `add_plain(index, output)`, the one-output, plain-index form) and
// RecordOutcome to the module; provcollate/store/fast.py (FastPath) uses them.
void bind_record(pybind11::module_& m);

}  // namespace provcollate
