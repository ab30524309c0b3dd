// A scoped caching CPU allocator for the engine's hot loops.
//
// Why: a hypergradient call on the CPU allocates the same few activation-sized
// buffers (~3 MB each on the reference ConvNet) in every Hessian-vector
// product.  glibc serves blocks that large with mmap (or trims them off the
// heap top) and returns them to the OS on free, so every product first-touches
// fresh pages (a ConvNet hyper-step at K = 5: 1.19x faster with this cache on
// a 2-core VM, python/bench_engine_paths.py).  CUDA torch caches
// device memory for exactly this reason; this does the same on the CPU, but
// only while a scope is open, so the memory goes back when the scope closes.
//
// The first scope installs this allocator as torch's CPU allocator
// (c10::SetCPUAllocator) and it stays installed: outside scopes it passes every
// call through to c10::alloc_cpu / free_cpu.  Staying matters because oneDNN
// allocates raw buffers with the allocator installed at allocation time and
// frees them with the one installed at free time: had a scope's exit restored
// the previous allocator, such a buffer freed later bypassed this allocator's
// block table, and a block glibc reused at that address was once cached under
// the old, larger size (a heap overflow).  Every block comes from
// c10::alloc_cpu (torch's alignment, fill and THP settings) and has this
// allocator's deleter; blocks of at least kMinCachedBytes, when freed inside a
// scope, wait in a free list keyed by their rounded size.  The cache holds at
// most the peak of the bytes handed out inside the scope and alive (and
// kMaxCachedBytes), so a loop of ever-new sizes cannot pile up free memory.  A forked child (a
// DataLoader worker) caches nothing: the lock is held across fork() and the
// child drops what it inherited.  The object is immortal: DataPtrs refer to it.
#include <torch/library.h>

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace commentaries_ext {
namespace {

constexpr size_t kMinCachedBytes = size_t{64} << 10;
constexpr size_t kRounding = size_t{4} << 10;
// Past this many cached free bytes a freed block is released instead of kept.
constexpr size_t kMaxCachedBytes = size_t{2} << 30;

class ScopedCachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    const bool cacheable = n >= kMinCachedBytes;
    const size_t size = cacheable ? (n + kRounding - 1) / kRounding * kRounding : n;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (caching()) {
        auto it = free_.find(size);
        if (it != free_.end() && !it->second.empty()) {  // a hit: one lock for the whole call
          void* block = it->second.back();
          it->second.pop_back();
          cached_bytes_ -= size;
          ++hits_;
          track(block, size, true);
          c10::profiledCPUMemoryReporter().New(block, n);
          return {block, block, &release, c10::Device(c10::DeviceType::CPU)};
        }
        ++misses_;
      }
    }
    void* block = c10::alloc_cpu(size);
    // Small blocks are never cached (glibc's bins serve them well): they need no entry
    // where torch's default allocator, whose deleter frees them alike, was the previous
    // one (size 0 in live_ means "release at once")
    if (cacheable || track_small_) {
      std::lock_guard<std::mutex> lock(mutex_);
      track(block, cacheable ? size : 0, depth_ > 0);
    }
    c10::profiledCPUMemoryReporter().New(block, n);
    return {block, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Opens a scope; returns false (and caches nothing) when another allocator is
  // installed: one of higher priority than torch's default, or one another library
  // installed after this one (not replaced: its blocks are its own).
  bool enter() {
    // before the allocator can be installed, and never with the lock held: a fork between
    // installing it and registering these would leave the child's lock held for good
    static std::once_flag fork_handlers;
    std::call_once(fork_handlers, [] { pthread_atfork(&lock_for_fork, &unlock_after_fork, &child_after_fork); });
    std::vector<void*> dropped;
    bool ok = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop_inherited(dropped);
      if (!in_child_) {
        if (!installed_) {
          previous_ = c10::GetCPUAllocator();
          c10::SetCPUAllocator(this, 0);
          installed_ = c10::GetCPUAllocator() == this;
          if (installed_)
            track_small_ = previous_->raw_deleter() != c10::GetDefaultCPUAllocator()->raw_deleter();
        }
        if (installed_ && c10::GetCPUAllocator() == this) {
          if (depth_++ == 0) peak_scoped_bytes_ = scoped_bytes_;
          ok = true;
        }
      }
    }
    for (void* block : dropped) c10::free_cpu(block);
    return ok;
  }

  void exit() {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TORCH_CHECK(depth_ > 0, "cpu_memory_cache_exit: no scope is open");
      if (--depth_ > 0) return;
      take_free_lists(to_free);
    }
    for (void* block : to_free) c10::free_cpu(block);
  }

  // [hits, misses, cached free bytes, open scopes]
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {hits_, misses_, static_cast<int64_t>(cached_bytes_), in_child_ ? 0 : depth_};
  }

  static ScopedCachingCPUAllocator& instance() {
    static auto* allocator = new ScopedCachingCPUAllocator();  // immortal, see above
    return *allocator;
  }

 private:
  // (all below with mutex_ held)
  bool caching() const { return depth_ > 0 && !in_child_; }

  void track(void* block, size_t size, bool scoped) {
    live_[block] = Block{size, scoped};
    if (scoped) {
      scoped_bytes_ += size;
      peak_scoped_bytes_ = std::max(peak_scoped_bytes_, scoped_bytes_);
    }
  }

  void take_free_lists(std::vector<void*>& out) {
    for (auto& [size, blocks] : free_) out.insert(out.end(), blocks.begin(), blocks.end());
    free_.clear();
    cached_bytes_ = 0;
  }

  // A forked child's free lists are its copy of the parent's: freed at its first call.
  void drop_inherited(std::vector<void*>& out) {
    if (in_child_ && !free_.empty()) take_free_lists(out);
  }

  static void lock_for_fork() { instance().mutex_.lock(); }
  static void unlock_after_fork() { instance().mutex_.unlock(); }
  static void child_after_fork() {
    auto& self = instance();
    self.in_child_ = true;  // single-threaded here: no other thread holds or waits for the lock
    self.mutex_.unlock();
  }

  static void release(void* block) {
    auto& self = instance();
    bool owned = false, cached = false;
    std::vector<void*> dropped;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      self.drop_inherited(dropped);
      auto it = self.live_.find(block);
      if (it != self.live_.end()) {
        owned = true;
        // Reported before the block can be handed out again by another thread.
        c10::profiledCPUMemoryReporter().Delete(block);
        const size_t size = it->second.size;
        if (it->second.scoped) self.scoped_bytes_ -= size;
        self.live_.erase(it);
        const size_t cap = std::min(kMaxCachedBytes, self.peak_scoped_bytes_);
        if (size > 0 && self.caching() && self.cached_bytes_ + size <= cap) {
          self.free_[size].push_back(block);
          self.cached_bytes_ += size;
          cached = true;
        }
      }
    }
    for (void* b : dropped) c10::free_cpu(b);
    if (!owned) {
      // a small block (see allocate), or one raw_allocate'd by the allocator installed
      // before this one and raw_deallocate'd through this one's raw_deleter()
      self.previous_->raw_deleter()(block);
      return;
    }
    if (!cached) c10::free_cpu(block);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  struct Block {
    size_t size;  // rounded; 0: never cached
    bool scoped;  // handed out inside a scope
  };
  std::unordered_map<void*, Block> live_;
  size_t cached_bytes_ = 0;
  size_t scoped_bytes_ = 0;       // blocks handed out inside scopes and not yet freed
  size_t peak_scoped_bytes_ = 0;  // their peak since the outermost scope opened: the cache's cap
  int64_t depth_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  bool installed_ = false;
  bool track_small_ = true;  // small blocks need entries (see allocate)
  bool in_child_ = false;
  c10::Allocator* previous_ = nullptr;
};

bool cpu_memory_cache_enter() { return ScopedCachingCPUAllocator::instance().enter(); }
void cpu_memory_cache_exit() { ScopedCachingCPUAllocator::instance().exit(); }
std::vector<int64_t> cpu_memory_cache_stats() { return ScopedCachingCPUAllocator::instance().stats(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  // Process-wide, not traced: plain functions rather than tensor ops.
  m.def("cpu_memory_cache_enter() -> bool", &cpu_memory_cache_enter);
  m.def("cpu_memory_cache_exit() -> ()", &cpu_memory_cache_exit);
  m.def("cpu_memory_cache_stats() -> int[]", &cpu_memory_cache_stats);
}

}  // namespace commentaries_ext
