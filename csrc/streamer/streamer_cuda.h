// Factory for the CUDA backend (streamer_cuda.cu); kept apart so C++ sources need no CUDA headers.
#pragma once
#include <memory>

#include "streamer.h"

namespace vidtune {
std::unique_ptr<Backend> make_cuda_backend(int device, int num_slots, size_t slot_bytes);
int cuda_device_count();
}  // namespace vidtune
