// CUDA backend of the streamer: device slots, a side stream for the copies, one event per slot.
//
// Order of a load into slot s (all on the side stream, issued by a worker thread):
//   cudaStreamWaitEvent(side, released[s])   the compute stream's last reads of s are done
//   [disk tier] pread file -> pinned[s]      host; first waits copied[s] so pinned[s] is free
//   cudaMemcpyAsync(slot s <- pinned source)
//   cudaEventRecord(copied[s], side)
// The compute stream then does cudaStreamWaitEvent(compute, copied[s]) (Streamer::wait); at
// eviction the core records released[s] on the compute stream. The host thread that runs the
// model never synchronises; only a worker blocks, on its own copy, before reusing a bounce buffer.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "streamer_cuda.h"

namespace vidtune {

namespace {
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("streamer (cuda): ") + what + ": " + cudaGetErrorString(e));
}
}  // namespace

class CudaBackend : public Backend {
 public:
  CudaBackend(int device, int num_slots, size_t slot_bytes) : device_(device) {
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking), "cudaStreamCreate");
    copied_.resize(num_slots);
    released_.resize(num_slots);
    pinned_.resize(num_slots, nullptr);
    for (int i = 0; i < num_slots; ++i) {
      check(cudaEventCreateWithFlags(&copied_[i], cudaEventDisableTiming), "cudaEventCreate");
      check(cudaEventCreateWithFlags(&released_[i], cudaEventDisableTiming), "cudaEventCreate");
    }
    slot_bytes_ = slot_bytes;
  }
  ~CudaBackend() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(side_);
    for (auto e : copied_) cudaEventDestroy(e);
    for (auto e : released_) cudaEventDestroy(e);
    for (auto p : pinned_)
      if (p) cudaFreeHost(p);
    cudaStreamDestroy(side_);
  }
  std::string name() const override { return "cuda"; }
  void* alloc_slot(size_t n) override {
    check(cudaSetDevice(device_), "cudaSetDevice");
    void* p = nullptr;
    check(cudaMalloc(&p, n), "cudaMalloc (slot)");
    return p;
  }
  void free_slot(void* p) override { cudaFree(p); }
  void* alloc_host(size_t n) override {
    void* p = nullptr;
    check(cudaHostAlloc(&p, n, cudaHostAllocPortable), "cudaHostAlloc (RAM tier)");
    return p;
  }
  void free_host(void* p) override { cudaFreeHost(p); }

  void copy_in(int slot, void* dst, const void* src, size_t n) override {
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaStreamWaitEvent(side_, released_[slot], 0), "cudaStreamWaitEvent (release)");
    check(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, side_), "cudaMemcpyAsync");
    check(cudaEventRecord(copied_[slot], side_), "cudaEventRecord");
  }

  void read_in(int slot, void* dst, int fd, size_t n, bool direct) override {
    check(cudaSetDevice(device_), "cudaSetDevice");
    if (!pinned_[slot]) check(cudaHostAlloc(&pinned_[slot], slot_bytes_, cudaHostAllocPortable), "cudaHostAlloc (bounce)");
    // The previous copy out of this bounce buffer must be done before pread overwrites it.
    check(cudaEventSynchronize(copied_[slot]), "cudaEventSynchronize (bounce)");
    CpuBackend().read_in(slot, pinned_[slot], fd, n, direct);
    copy_in(slot, dst, pinned_[slot], n);
  }

  void wait_ready(int slot, uint64_t stream) override {
    check(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), copied_[slot], 0),
          "cudaStreamWaitEvent (ready)");
  }
  void mark_released(int slot, uint64_t stream) override {
    check(cudaEventRecord(released_[slot], reinterpret_cast<cudaStream_t>(stream)),
          "cudaEventRecord (release)");
  }

 private:
  int device_;
  size_t slot_bytes_ = 0;
  cudaStream_t side_ = nullptr;
  std::vector<cudaEvent_t> copied_, released_;
  std::vector<void*> pinned_;
};

std::unique_ptr<Backend> make_cuda_backend(int device, int num_slots, size_t slot_bytes) {
  return std::unique_ptr<Backend>(new CudaBackend(device, num_slots, slot_bytes));
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

}  // namespace vidtune
