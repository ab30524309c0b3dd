// Helpers shared by the C++ kernels of every op family.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <limits>

namespace commentaries_ext {

// When poisoning is on (tests), every kernel output starts as NaN, so that an
// element a kernel forgets to write shows up instead of passing by luck.
std::atomic<bool>& poison_outputs_flag();

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs_flag().load(std::memory_order_relaxed) && at::isFloatingType(out.scalar_type())) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

}  // namespace commentaries_ext
