// Unit tests of the streamer core (CPU backend): run by ctest, and from tests/native via pytest.
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "streamer.h"

using namespace vidtune;

static int failures = 0;
#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

static bool throws(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception&) {
    return true;
  }
  return false;
}

static std::unique_ptr<Streamer> make(int slots, size_t bytes, int workers = 1) {
  return std::unique_ptr<Streamer>(new Streamer(std::unique_ptr<Backend>(new CpuBackend()), slots, bytes, workers));
}

static void fill(Streamer& s, int gid, unsigned char seed) {
  auto* p = static_cast<unsigned char*>(s.host_ptr(gid));
  for (size_t i = 0; i < s.group_bytes(gid); ++i) p[i] = static_cast<unsigned char>(seed + i * 7);
}

static bool matches(Streamer& s, int slot, size_t n, unsigned char seed) {
  auto* p = static_cast<unsigned char*>(s.slot_ptr(slot));
  for (size_t i = 0; i < n; ++i)
    if (p[i] != static_cast<unsigned char>(seed + i * 7)) return false;
  return true;
}

static void test_ram_states_and_stats() {
  auto s = make(2, 10000);
  CHECK(s->slot_bytes() == 12288);  // padded to the O_DIRECT block
  int a = s->add_group(10000), b = s->add_group(5000), c = s->add_group(123);
  fill(*s, a, 1); fill(*s, b, 2); fill(*s, c, 3);
  CHECK(s->state(a) == GroupState::Evicted);
  CHECK(s->load(a));
  CHECK(!s->load(a));  // already in flight or resident: no second copy
  CHECK(s->load(b));
  CHECK(throws([&] { s->load(c); }));  // pool of 2 is full: the bound holds
  int sa = s->wait(a), sb = s->wait(b);
  CHECK(sa != sb);
  CHECK(s->state(a) == GroupState::Resident);
  CHECK(matches(*s, sa, 10000, 1));
  CHECK(matches(*s, sb, 5000, 2));
  s->evict(a);
  CHECK(s->state(a) == GroupState::Evicted);
  CHECK(s->slot_of(a) == -1);
  CHECK(s->load(c));
  CHECK(matches(*s, s->wait(c), 123, 3));
  CHECK(throws([&] { s->wait(a); }));  // waiting on an evicted group is a caller bug
  Stats st = s->stats();
  CHECK(st.loads == 3);
  CHECK(st.bytes_copied == 10000 + 5000 + 123);
  CHECK(st.bytes_read_disk == 0);
  CHECK(st.peak_resident_bytes == 2 * s->slot_bytes());
  CHECK(st.resident_bytes == 2 * s->slot_bytes());
  CHECK(throws([&] { s->add_group(20000); }));  // bigger than a slot
}

static void test_disk_tier() {
  char dir[] = "/tmp/vidtune_streamer_XXXXXX";
  CHECK(mkdtemp(dir) != nullptr);
  auto s = make(1, 70000, 2);
  std::vector<int> ids;
  for (int i = 0; i < 3; ++i) {
    ids.push_back(s->add_group(60000 + i * 1000));
    fill(*s, ids.back(), static_cast<unsigned char>(10 * i));
    s->spill(ids.back(), std::string(dir) + "/g" + std::to_string(i) + ".bin");
    CHECK(s->is_on_disk(ids.back()));
    CHECK(s->host_ptr(ids.back()) == nullptr);  // RAM copy freed
  }
  for (int round = 0; round < 2; ++round)
    for (int i = 0; i < 3; ++i) {
      s->load(ids[i]);
      CHECK(matches(*s, s->wait(ids[i]), 60000 + i * 1000, static_cast<unsigned char>(10 * i)));
      s->evict(ids[i]);
    }
  Stats st = s->stats();
  CHECK(st.loads == 6);
  CHECK(st.bytes_read_disk == 2 * (60000 + 61000 + 62000));
  CHECK(st.peak_resident_bytes == s->slot_bytes());
  for (int i = 0; i < 3; ++i) unlink((std::string(dir) + "/g" + std::to_string(i) + ".bin").c_str());
  rmdir(dir);
}

static void test_missing_file_reports_error() {
  auto s = make(1, 4096);
  int g = s->add_group(100);
  CHECK(throws([&] { s->spill(g, "/nonexistent-dir/x.bin"); }));
  CHECK(s->host_ptr(g) != nullptr);  // failed spill keeps the RAM copy
}

static void test_many_loads_with_workers() {
  // Exercise the queue with several workers and evictions of still-in-flight prefetches.
  auto s = make(3, 1 << 16, 3);
  std::vector<int> ids;
  for (int i = 0; i < 8; ++i) {
    ids.push_back(s->add_group(1 << 16));
    fill(*s, ids.back(), static_cast<unsigned char>(i));
  }
  for (int step = 0; step < 50; ++step) {
    int g = ids[step % 8];
    s->load(g);
    s->load(ids[(step + 1) % 8]);
    CHECK(matches(*s, s->wait(g), 1 << 16, static_cast<unsigned char>(step % 8)));
    s->evict(g);
    s->evict(ids[(step + 1) % 8]);  // evicting an in-flight prefetch waits for its copy
  }
  CHECK(s->free_slots() == 3);
  CHECK(s->stats().resident_bytes == 0);
  CHECK(s->stats().peak_resident_bytes <= 2 * s->slot_bytes());
}

int main() {
  test_ram_states_and_stats();
  test_disk_tier();
  test_missing_file_reports_error();
  test_many_loads_with_workers();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("streamer core tests passed\n");
  return 0;
}
