// pybind11 bindings of the streamer. Built twice: vidtune._native (CPU backend, always) and, with
// VIDTUNE_WITH_CUDA, vidtune._native_cuda (CPU + CUDA backends, linked to cudart). Only
// vidtune/native.py imports them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "streamer.h"
#ifdef VIDTUNE_WITH_CUDA
#include "streamer_cuda.h"
#endif

#ifndef VIDTUNE_MODULE_NAME
#define VIDTUNE_MODULE_NAME _native
#endif

namespace py = pybind11;
using vidtune::Streamer;

namespace {
// Host memory exposed through the buffer protocol; holds the streamer alive, so a torch tensor
// made with torch.frombuffer can outlive every Python reference to the streamer.
struct HostBuffer {
  std::shared_ptr<Streamer> owner;
  void* ptr;
  size_t nbytes;
};

std::shared_ptr<Streamer> make(const std::string& backend, int num_slots, size_t slot_bytes,
                               int num_workers, int device) {
  std::unique_ptr<vidtune::Backend> b;
  if (backend == "cpu") {
    b.reset(new vidtune::CpuBackend());
  }
#ifdef VIDTUNE_WITH_CUDA
  else if (backend == "cuda") {
    b = vidtune::make_cuda_backend(device, num_slots, slot_bytes);
  }
#endif
  else {
    throw std::invalid_argument("streamer: backend '" + backend + "' is not built into this module");
  }
  (void)device;
  return std::make_shared<Streamer>(std::move(b), num_slots, slot_bytes, num_workers);
}
}  // namespace

// Types are module-local: the CPU core and the CUDA module are built from this file and load
// side by side; global pybind11 types would collide ("GroupState is already registered").
PYBIND11_MODULE(VIDTUNE_MODULE_NAME, m) {
  m.doc() = "vidtune group-offload streamer (C++ core)";
#ifdef VIDTUNE_WITH_CUDA
  m.attr("BACKENDS") = py::make_tuple("cpu", "cuda");
  m.def("cuda_device_count", &vidtune::cuda_device_count);
#else
  m.attr("BACKENDS") = py::make_tuple("cpu");
#endif
  m.attr("ALIGN") = vidtune::kAlign;

  py::enum_<vidtune::GroupState>(m, "GroupState", py::module_local())
      .value("EVICTED", vidtune::GroupState::Evicted)
      .value("IN_FLIGHT", vidtune::GroupState::InFlight)
      .value("RESIDENT", vidtune::GroupState::Resident);

  py::class_<HostBuffer>(m, "HostBuffer", py::buffer_protocol(), py::module_local())
      .def_buffer([](HostBuffer& b) {
        return py::buffer_info(b.ptr, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes)}, {1});
      })
      .def_property_readonly("ptr", [](const HostBuffer& b) { return reinterpret_cast<uintptr_t>(b.ptr); })
      .def("__len__", [](const HostBuffer& b) { return b.nbytes; });

  py::class_<Streamer, std::shared_ptr<Streamer>>(m, "Streamer", py::module_local())
      .def(py::init(&make), py::arg("backend"), py::arg("num_slots"), py::arg("slot_bytes"),
           py::arg("num_workers") = 1, py::arg("device") = 0)
      .def_property_readonly("backend", [](Streamer& s) { return s.backend().name(); })
      .def_property_readonly("slot_bytes", &Streamer::slot_bytes)
      .def_property_readonly("num_slots", &Streamer::num_slots)
      .def_property_readonly("num_groups", &Streamer::num_groups)
      .def("free_slots", &Streamer::free_slots)
      .def("add_group", &Streamer::add_group, py::arg("nbytes"))
      .def("group_bytes", &Streamer::group_bytes)
      .def("host_buffer",
           [](std::shared_ptr<Streamer> s, int gid) {
             void* p = s->host_ptr(gid);
             if (!p) throw std::runtime_error("streamer: group was spilled to disk; no RAM copy");
             return HostBuffer{s, p, s->group_bytes(gid)};
           })
      .def("slot_buffer",
           [](std::shared_ptr<Streamer> s, int slot) {
             if (s->backend().name() != "cpu")
               throw std::runtime_error("streamer: slot_buffer is host memory only; use slot_ptr");
             return HostBuffer{s, s->slot_ptr(slot), s->slot_bytes()};
           })
      .def("slot_ptr", [](Streamer& s, int slot) { return reinterpret_cast<uintptr_t>(s.slot_ptr(slot)); })
      .def("spill", &Streamer::spill, py::call_guard<py::gil_scoped_release>())
      .def("is_on_disk", &Streamer::is_on_disk)
      .def("uses_direct_io", &Streamer::uses_direct_io)
      .def("load", &Streamer::load)
      .def("wait", &Streamer::wait, py::arg("gid"), py::arg("stream") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("evict", &Streamer::evict, py::arg("gid"), py::arg("stream") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("state", &Streamer::state)
      .def("slot_of", &Streamer::slot_of)
      .def("stats",
           [](Streamer& s) {
             auto st = s.stats();
             py::dict d;
             d["bytes_copied"] = st.bytes_copied;
             d["bytes_read_disk"] = st.bytes_read_disk;
             d["loads"] = st.loads;
             d["evictions"] = st.evictions;
             d["resident_bytes"] = st.resident_bytes;
             d["peak_resident_bytes"] = st.peak_resident_bytes;
             return d;
           })
      .def("reset_stats", &Streamer::reset_stats);
}
