// The module and the dispatcher schemas of every op. Kernels register themselves per backend
// (cpu/, cuda/) and autograd in autograd.cpp; fake kernels are registered in provcollate/ops.py.
#include <torch/library.h>

#include "collate.h"
#include "fingerprint.h"
#include "record.h"

// `import provcollate._C` loads this library, which runs the registrations below.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  provcollate::bind_collate(m);
  provcollate::bind_fingerprint(m);
  provcollate::bind_record(m);
}

TORCH_LIBRARY(provcollate, m) {
  // Every output size is a host integer, so no op ever waits on the device to learn it.
  m.def("pad(Tensor values, Tensor offsets, SymInt max_len, Scalar pad_value=0, bool left=False)"
        " -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("unpad(Tensor padded, Tensor offsets, SymInt total, bool left=False) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("unpad_scatter_(Tensor(a!) dst, Tensor padded, Tensor lengths, Tensor dst_offsets,"
        " bool left=False) -> ()",
        {at::Tag::pt2_compliant_tag});
}
