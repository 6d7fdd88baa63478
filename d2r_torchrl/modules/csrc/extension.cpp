// Python bindings of the native D2R operators (native.h).
#include <torch/csrc/utils/pybind.h>

#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &d2r::chain_forward, "D2R module chain forward (CPU, blocked over samples)");
  m.def("backward", &d2r::chain_backward, "D2R module chain backward (CPU, blocked over samples)");
  m.def("route_slots", &d2r::route_slots, "D2R routes of every gate from flat router logits (CPU)");
}
