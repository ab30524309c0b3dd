// A scoped caching CPU allocator for the engine's hot loops.
//
// Why: a hypergradient call on the CPU allocates the same few activation-sized
// buffers (~3 MB each on the reference ConvNet) in every Hessian-vector
// product.  glibc serves blocks that large with mmap (or trims them off the
// heap top) and returns them to the OS on free, so every product first-touches
// fresh pages (a ConvNet hyper-step at K = 5: 1.19x faster with this cache on
// a 2-core VM, python/bench_engine_paths.py).  CUDA torch caches
// device memory for exactly this reason; this does the same on the CPU, but
// only while a scope is open, so the rest of the process keeps glibc's
// behaviour and the memory goes back when the scope closes.
//
// While at least one scope is open this allocator is torch's CPU allocator
// (c10::SetCPUAllocator).  Every block comes from c10::alloc_cpu (torch's
// alignment, fill and THP settings) and has this allocator's deleter, so that
// the raw interface (raw_allocate / raw_deleter, which oneDNN uses) is
// consistent; blocks of at least kMinCachedBytes, when freed inside a scope,
// wait in a free list keyed by their rounded size.  A block freed after the
// last scope closed is released at once, and closing the last scope releases
// the free lists.  The object is immortal: DataPtrs handed out refer to it.
#include <torch/library.h>

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

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
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {  // a hit: one lock for the whole call
        void* block = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= size;
        ++hits_;
        live_[block] = size;
        c10::profiledCPUMemoryReporter().New(block, n);
        return {block, block, &release, c10::Device(c10::DeviceType::CPU)};
      }
      ++misses_;
    }
    void* block = c10::alloc_cpu(size);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Small blocks are never cached (size 0 in live_ means "release at once"):
      // glibc's bins already serve them well.
      live_[block] = cacheable ? size : 0;
    }
    c10::profiledCPUMemoryReporter().New(block, n);
    return {block, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Opens a scope; returns false (and caches nothing) when another allocator
  // of higher priority than torch's default is installed.
  bool enter() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_ == 0) {
      previous_ = c10::GetCPUAllocator();
      c10::SetCPUAllocator(this, 0);
      if (c10::GetCPUAllocator() != this) return false;
    }
    ++depth_;
    return true;
  }

  void exit() {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TORCH_CHECK(depth_ > 0, "cpu_memory_cache_exit: no scope is open");
      if (--depth_ > 0) return;
      c10::SetCPUAllocator(previous_, 0);
      for (auto& [size, blocks] : free_) to_free.insert(to_free.end(), blocks.begin(), blocks.end());
      free_.clear();
      cached_bytes_ = 0;
    }
    for (void* block : to_free) c10::free_cpu(block);
  }

  // [hits, misses, cached free bytes, open scopes]
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {hits_, misses_, static_cast<int64_t>(cached_bytes_), depth_};
  }

  static ScopedCachingCPUAllocator& instance() {
    static auto* allocator = new ScopedCachingCPUAllocator();  // immortal, see above
    return *allocator;
  }

 private:
  static void release(void* block) {
    auto& self = instance();
    bool owned = false, cached = false;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      auto it = self.live_.find(block);
      if (it != self.live_.end()) {
        owned = true;
        // Reported before the block can be handed out again by another thread.
        c10::profiledCPUMemoryReporter().Delete(block);
        const size_t size = it->second;
        self.live_.erase(it);
        if (size > 0 && self.depth_ > 0 && self.cached_bytes_ + size <= kMaxCachedBytes) {
          self.free_[size].push_back(block);
          self.cached_bytes_ += size;
          cached = true;
        }
      }
    }
    if (!owned) {
      // raw_allocate'd by the default allocator before a scope opened and
      // raw_deallocate'd inside it, through GetCPUAllocator()->raw_deleter().
      c10::GetDefaultCPUAllocator()->raw_deleter()(block);
      return;
    }
    if (!cached) c10::free_cpu(block);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> live_;
  size_t cached_bytes_ = 0;
  int64_t depth_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
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
