#include "streamer.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace vidtune {

void* CpuBackend::alloc_slot(size_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, kAlign, round_up(n == 0 ? 1 : n)) != 0) throw std::bad_alloc();
  return p;
}

void CpuBackend::free_slot(void* p) { std::free(p); }

void CpuBackend::copy_in(int, void* dst, const void* src, size_t n) { std::memcpy(dst, src, n); }

void pread_full(int fd, void* dst, size_t n) {
  char* out = static_cast<char*>(dst);
  size_t done = 0;
  while (done < n) {
    ssize_t r = ::pread(fd, out + done, n - done, static_cast<off_t>(done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(std::string("streamer: pread failed: ") + std::strerror(errno));
    }
    if (r == 0) throw std::runtime_error("streamer: file shorter than its group");
    done += static_cast<size_t>(r);
  }
}

void CpuBackend::read_in(int, void* dst, int fd, size_t n, bool direct) {
  pread_full(fd, dst, n);
  // Drop what the buffered read cached, so the next load of this group really reads the disk.
  if (!direct) ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
}

Streamer::Streamer(std::unique_ptr<Backend> backend, int num_slots, size_t slot_bytes,
                   int num_workers)
    : backend_(std::move(backend)), slot_bytes_(round_up(slot_bytes)) {
  if (num_slots < 1) throw std::invalid_argument("streamer: num_slots must be >= 1");
  if (num_workers < 1) throw std::invalid_argument("streamer: num_workers must be >= 1");
  for (int i = 0; i < num_slots; ++i) {
    slots_.push_back(backend_->alloc_slot(slot_bytes_));
    free_.push_back(num_slots - 1 - i);  // pop_back hands out slot 0 first
  }
  for (int i = 0; i < num_workers; ++i) workers_.emplace_back([this] { worker_loop(); });
}

Streamer::~Streamer() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
  for (auto& g : groups_) {
    if (g.host) backend_->free_host(g.host);
    if (g.fd >= 0) ::close(g.fd);
  }
  for (void* s : slots_) backend_->free_slot(s);
}

Streamer::Group& Streamer::group(int gid) {
  if (gid < 0 || gid >= static_cast<int>(groups_.size()))
    throw std::out_of_range("streamer: unknown group " + std::to_string(gid));
  return groups_[gid];
}

const Streamer::Group& Streamer::group(int gid) const {
  return const_cast<Streamer*>(this)->group(gid);
}

int Streamer::add_group(size_t nbytes) {
  std::lock_guard<std::mutex> lk(mu_);
  if (nbytes > slot_bytes_)
    throw std::invalid_argument("streamer: group of " + std::to_string(nbytes) +
                                " bytes does not fit a slot of " + std::to_string(slot_bytes_));
  Group g;
  g.nbytes = nbytes;
  g.host = backend_->alloc_host(round_up(nbytes == 0 ? 1 : nbytes));
  std::memset(g.host, 0, round_up(nbytes == 0 ? 1 : nbytes));
  groups_.push_back(std::move(g));
  return static_cast<int>(groups_.size()) - 1;
}

void* Streamer::host_ptr(int gid) {
  std::lock_guard<std::mutex> lk(mu_);
  return group(gid).host;
}

size_t Streamer::group_bytes(int gid) const {
  std::lock_guard<std::mutex> lk(mu_);
  return group(gid).nbytes;
}

void Streamer::spill(int gid, const std::string& path) {
  std::lock_guard<std::mutex> lk(mu_);
  Group& g = group(gid);
  if (!g.host) throw std::runtime_error("streamer: group " + std::to_string(gid) + " already spilled");
  if (g.state != GroupState::Evicted)
    throw std::runtime_error("streamer: spill needs an evicted group");
  const size_t padded = round_up(g.nbytes == 0 ? 1 : g.nbytes);
  int wfd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (wfd < 0) throw std::runtime_error("streamer: cannot create " + path + ": " + std::strerror(errno));
  const char* src = static_cast<const char*>(g.host);
  size_t done = 0;
  while (done < padded) {
    ssize_t w = ::pwrite(wfd, src + done, padded - done, static_cast<off_t>(done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      ::close(wfd);
      throw std::runtime_error("streamer: write to " + path + " failed: " + std::strerror(errno));
    }
    done += static_cast<size_t>(w);
  }
  ::fsync(wfd);
  ::posix_fadvise(wfd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(wfd);
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECT);
  g.direct = fd >= 0;
  if (fd < 0) fd = ::open(path.c_str(), O_RDONLY);  // tmpfs and some FUSE mounts refuse O_DIRECT
  if (fd < 0) throw std::runtime_error("streamer: cannot open " + path + ": " + std::strerror(errno));
  g.fd = fd;
  g.path = path;
  backend_->free_host(g.host);
  g.host = nullptr;
}

bool Streamer::is_on_disk(int gid) const {
  std::lock_guard<std::mutex> lk(mu_);
  return group(gid).fd >= 0;
}

bool Streamer::uses_direct_io(int gid) const {
  std::lock_guard<std::mutex> lk(mu_);
  return group(gid).direct;
}

bool Streamer::load(int gid) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    Group& g = group(gid);
    if (g.state != GroupState::Evicted) return false;
    if (free_.empty())
      throw std::runtime_error("streamer: no free slot for group " + std::to_string(gid) +
                               " (evict a group first; the pool holds prefetch_depth + 1 slots)");
    g.slot = free_.back();
    free_.pop_back();
    g.state = GroupState::InFlight;
    g.error.clear();
    queue_.push_back(Job{gid, g.slot});
    stats_.loads += 1;
    stats_.resident_bytes += slot_bytes_;
    if (stats_.resident_bytes > stats_.peak_resident_bytes)
      stats_.peak_resident_bytes = stats_.resident_bytes;
  }
  work_cv_.notify_one();
  return true;
}

void Streamer::worker_loop() {
  for (;;) {
    Job job;
    int fd;
    bool direct;
    size_t n;
    const void* src;
    {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [this] { return stop_ || !queue_.empty(); });
      if (stop_ && queue_.empty()) return;
      job = queue_.front();
      queue_.pop_front();
      const Group& g = groups_[job.gid];
      fd = g.fd;
      direct = g.direct;
      n = g.nbytes;
      src = g.host;
    }
    std::string err;
    try {
      void* dst = slots_[job.slot];
      if (fd >= 0)
        backend_->read_in(job.slot, dst, fd, direct ? round_up(n == 0 ? 1 : n) : n, direct);
      else
        backend_->copy_in(job.slot, dst, src, n);
    } catch (const std::exception& e) {
      err = e.what();
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      Group& g = groups_[job.gid];
      g.state = GroupState::Resident;
      g.error = err;
      if (err.empty()) {
        stats_.bytes_copied += n;
        if (fd >= 0) stats_.bytes_read_disk += n;
      }
    }
    done_cv_.notify_all();
  }
}

int Streamer::wait(int gid, uint64_t stream) {
  int slot;
  {
    std::unique_lock<std::mutex> lk(mu_);
    Group& g = group(gid);
    if (g.state == GroupState::Evicted)
      throw std::runtime_error("streamer: wait on group " + std::to_string(gid) + ", which was not loaded");
    done_cv_.wait(lk, [&] { return g.state != GroupState::InFlight; });
    if (!g.error.empty()) throw std::runtime_error(g.error);
    slot = g.slot;
  }
  backend_->wait_ready(slot, stream);
  return slot;
}

void Streamer::evict(int gid, uint64_t stream) {
  std::unique_lock<std::mutex> lk(mu_);
  Group& g = group(gid);
  if (g.state == GroupState::Evicted) return;
  // A worker may still be writing the slot: wait for it (host sync; only a prefetch that is
  // evicted before use takes this path).
  done_cv_.wait(lk, [&] { return g.state != GroupState::InFlight; });
  backend_->mark_released(g.slot, stream);
  free_.push_back(g.slot);
  g.slot = -1;
  g.state = GroupState::Evicted;
  stats_.evictions += 1;
  stats_.resident_bytes -= slot_bytes_;
}

GroupState Streamer::state(int gid) const {
  std::lock_guard<std::mutex> lk(mu_);
  return group(gid).state;
}

int Streamer::slot_of(int gid) const {
  std::lock_guard<std::mutex> lk(mu_);
  return group(gid).slot;
}

void* Streamer::slot_ptr(int slot) const {
  if (slot < 0 || slot >= static_cast<int>(slots_.size()))
    throw std::out_of_range("streamer: unknown slot " + std::to_string(slot));
  return slots_[slot];
}

int Streamer::num_groups() const {
  std::lock_guard<std::mutex> lk(mu_);
  return static_cast<int>(groups_.size());
}

int Streamer::free_slots() const {
  std::lock_guard<std::mutex> lk(mu_);
  return static_cast<int>(free_.size());
}

Stats Streamer::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

void Streamer::reset_stats() {
  std::lock_guard<std::mutex> lk(mu_);
  const uint64_t resident = stats_.resident_bytes;
  stats_ = Stats{};
  stats_.resident_bytes = resident;
  stats_.peak_resident_bytes = resident;
}

}  // namespace vidtune
