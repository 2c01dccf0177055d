// vidtune streamer core: a bounded pool of staging slots, worker threads and a FIFO of group loads.
//
// A "group" is a packed blob of weights (several blocks' parameters) with one source of truth:
// host RAM (pinned on CUDA) or a file (the disk tier). Loading a group copies that blob into a free
// slot of the pool; the caller (Python) points the parameters at the slot and evicts the group
// when done. The pool holds prefetch_depth + 1 slots, so resident + in-flight bytes are bounded by
// construction. The state machine is shared; a Backend does the copies (CPU: memcpy/pread in the
// workers; CUDA: side stream + one event per slot, streamer_cuda.cu).
//
// No torch headers here on purpose: the module builds with pybind11 alone.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace vidtune {

enum class GroupState : int { Evicted = 0, InFlight = 1, Resident = 2 };

constexpr size_t kAlign = 4096;  // O_DIRECT needs block-aligned buffers, offsets and lengths
inline size_t round_up(size_t n, size_t a = kAlign) { return (n + a - 1) / a * a; }

// Where the copies happen. Methods marked [worker] run on a worker thread, [compute] on the caller's.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual void* alloc_slot(size_t n) = 0;  // compute-domain memory (CUDA: device)
  virtual void free_slot(void* p) = 0;
  virtual void* alloc_host(size_t n) = 0;  // RAM-tier source (CUDA: pinned)
  virtual void free_host(void* p) = 0;
  // [worker] host source -> slot.
  virtual void copy_in(int slot, void* dst, const void* src, size_t n) = 0;
  // [worker] file -> slot. `n` is padded to kAlign when `direct` (the file is padded too).
  virtual void read_in(int slot, void* dst, int fd, size_t n, bool direct) = 0;
  // [compute] the compute stream must not read the slot before its copy completed.
  virtual void wait_ready(int slot, uint64_t stream) { (void)slot; (void)stream; }
  // [compute] the slot is free once the compute stream's work so far is done.
  virtual void mark_released(int slot, uint64_t stream) { (void)slot; (void)stream; }
};

class CpuBackend : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  void* alloc_slot(size_t n) override;
  void free_slot(void* p) override;
  void* alloc_host(size_t n) override { return alloc_slot(n); }
  void free_host(void* p) override { free_slot(p); }
  void copy_in(int slot, void* dst, const void* src, size_t n) override;
  void read_in(int slot, void* dst, int fd, size_t n, bool direct) override;
};

// pread until `n` bytes are read; throws on error or short file.
void pread_full(int fd, void* dst, size_t n);

struct Stats {
  uint64_t bytes_copied = 0;      // bytes moved source -> slot (host or disk)
  uint64_t bytes_read_disk = 0;   // subset of bytes_copied that came from files
  uint64_t loads = 0;             // group loads issued
  uint64_t evictions = 0;
  uint64_t resident_bytes = 0;    // bytes of groups resident or in flight (slot-sized)
  uint64_t peak_resident_bytes = 0;
};

class Streamer {
 public:
  Streamer(std::unique_ptr<Backend> backend, int num_slots, size_t slot_bytes, int num_workers);
  ~Streamer();
  Streamer(const Streamer&) = delete;
  Streamer& operator=(const Streamer&) = delete;

  int add_group(size_t nbytes);                 // allocates its RAM source; returns group id
  void* host_ptr(int gid);                      // RAM source (nullptr once spilled)
  size_t group_bytes(int gid) const;
  // Disk tier: write the RAM source to `path` (padded, fsynced), free the RAM copy.
  // Reads then use O_DIRECT, or buffered reads followed by POSIX_FADV_DONTNEED where the
  // filesystem refuses O_DIRECT (tmpfs), so the page cache never serves the next load.
  void spill(int gid, const std::string& path);
  bool is_on_disk(int gid) const;
  bool uses_direct_io(int gid) const;

  // Queue a load. No-op (returns false) if resident or in flight. Throws if no slot is free:
  // the caller evicts first, which is what keeps the resident bound.
  bool load(int gid);
  // Block the host until the copy was issued/completed, then make `stream` wait for it
  // (CUDA: cudaStreamWaitEvent, no host sync). Returns the slot index.
  int wait(int gid, uint64_t stream = 0);
  // Release the group's slot (waits for an in-flight copy first). No-op when evicted.
  void evict(int gid, uint64_t stream = 0);

  GroupState state(int gid) const;
  int slot_of(int gid) const;  // -1 when evicted
  void* slot_ptr(int slot) const;
  size_t slot_bytes() const { return slot_bytes_; }
  int num_slots() const { return static_cast<int>(slots_.size()); }
  int num_groups() const;
  int free_slots() const;
  Stats stats() const;
  void reset_stats();
  Backend& backend() { return *backend_; }

 private:
  struct Group {
    size_t nbytes = 0;
    void* host = nullptr;
    int fd = -1;
    bool direct = false;
    std::string path;
    GroupState state = GroupState::Evicted;
    int slot = -1;
    std::string error;
  };
  struct Job {
    int gid;
    int slot;
  };
  void worker_loop();
  Group& group(int gid);
  const Group& group(int gid) const;

  std::unique_ptr<Backend> backend_;
  size_t slot_bytes_;
  std::vector<void*> slots_;
  std::vector<int> free_;
  std::vector<Group> groups_;
  std::deque<Job> queue_;
  Stats stats_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_;  // workers wait for jobs
  std::condition_variable done_cv_;  // callers wait for completions
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace vidtune
