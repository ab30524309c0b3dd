// col2im on the CPU (kernel op cpp_col2im): the scatter half of a 2-D convolution's input
// gradient by matmul + col2im (commentaries_ext/engine/conv.py). ATen's CPU col2im walks
// every (channel, kernel offset) plane with index arithmetic per element and takes ~290 us
// for the reference ConvNet's first layer at batch 32 ([32, 25, 196] -> [32, 1, 28, 28]),
// longer than the matmul in front of it.
//
// Here each (n, c) output plane is one task: it is zeroed, then for every kernel offset
// (kh, kw) and output row oh the run of L_w columns is added into the input row it lands
// on. The offsets of a run (first valid ow, last valid ow) are worked out once per (kw)
// and per (kh, oh), so the inner loop is a plain strided add; with stride 1 it is a
// vectorised add. Contract (validated by commentaries_ext/ops/fold.py): cols [N, C*KH*KW,
// OH*OW] contiguous float32/float64 on the CPU, OH and OW the convolution's output sizes
// for (H, W) with the given kernel, dilation, padding and stride.
#include "cpu/simd.h"  // first: selects the Vectorized specialisation
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"

namespace commentaries_ext {
namespace {

int64_t out_size(int64_t in, int64_t k, int64_t d, int64_t p, int64_t s) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1;  // < 0: no block fits (C++ division truncates towards 0)
  return span < 0 ? 0 : span / s + 1;
}

// [first, last) of the output positions o with 0 <= o * s - p + off < in
std::pair<int64_t, int64_t> valid_run(int64_t out, int64_t in, int64_t s, int64_t p, int64_t off) {
  // o * s >= p - off  and  o * s < in + p - off
  const int64_t lo_num = p - off, hi_num = in + p - off;
  int64_t first = lo_num <= 0 ? 0 : (lo_num + s - 1) / s;
  int64_t last = hi_num <= 0 ? 0 : (hi_num + s - 1) / s;
  first = std::min(first, out);
  last = std::clamp(last, first, out);
  return {first, last};
}

at::Tensor cpp_col2im(const at::Tensor& cols, at::IntArrayRef output_size, at::IntArrayRef kernel_size,
                      at::IntArrayRef dilation, at::IntArrayRef padding, at::IntArrayRef stride) {
  TORCH_CHECK(output_size.size() == 2 && kernel_size.size() == 2 && dilation.size() == 2 && padding.size() == 2 &&
                  stride.size() == 2,
              "col2im: output_size, kernel_size, dilation, padding and stride must have 2 entries each");
  TORCH_CHECK(cols.dim() == 3 && cols.is_contiguous() && cols.device().is_cpu() &&
                  (cols.scalar_type() == at::kFloat || cols.scalar_type() == at::kDouble),
              "col2im: cols must be a contiguous [N, C*KH*KW, L] float32/float64 CPU tensor");
  const int64_t H = output_size[0], W = output_size[1], KH = kernel_size[0], KW = kernel_size[1];
  const int64_t dh = dilation[0], dw = dilation[1], ph = padding[0], pw = padding[1], sh = stride[0], sw = stride[1];
  TORCH_CHECK(KH > 0 && KW > 0 && dh > 0 && dw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0 && H > 0 && W > 0,
              "col2im: sizes, dilation and stride must be positive and padding non-negative");
  // bounded so that KH * KW, d * (k - 1) and H + 2 p cannot overflow; OH * OW still could (OH up
  // to ~3 * 2^31), so the column count is compared by division
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  for (const int64_t v : {H, W, KH, KW, dh, dw, ph, pw, sh, sw})
    TORCH_CHECK(v <= kMax, "col2im: sizes, dilation, padding and stride must be at most ", kMax);
  const int64_t OH = out_size(H, KH, dh, ph, sh), OW = out_size(W, KW, dw, pw, sw);
  TORCH_CHECK(OH > 0 && OW > 0 && cols.size(2) % OW == 0 && cols.size(2) / OW == OH && cols.size(1) % (KH * KW) == 0,
              "col2im: cols of shape ", cols.sizes(), " does not match an output of ", H, "x", W, " with kernel ", KH,
              "x", KW);
  const int64_t N = cols.size(0), C = cols.size(1) / (KH * KW);
  at::Tensor out = new_output({N, C, H, W}, cols.options());
  if (out.numel() == 0) return out;
  std::vector<std::pair<int64_t, int64_t>> run_w(KW), run_h(KH);
  for (int64_t kw = 0; kw < KW; ++kw) run_w[kw] = valid_run(OW, W, sw, pw, kw * dw);
  for (int64_t kh = 0; kh < KH; ++kh) run_h[kh] = valid_run(OH, H, sh, ph, kh * dh);
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "cpp_col2im", [&] {
    using T = scalar_t;
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t V = Vec::size();
    const T* src = cols.const_data_ptr<T>();
    T* dst = out.mutable_data_ptr<T>();
    at::parallel_for(0, N * C, std::max<int64_t>(1, 2048 / (H * W)), [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1; ++plane) {
        T* o = dst + plane * H * W;
        std::fill(o, o + H * W, T(0));
        const T* cp = src + plane * KH * KW * OH * OW;  // (n, c) -> its KH*KW column rows
        for (int64_t kh = 0; kh < KH; ++kh)
          for (int64_t kw = 0; kw < KW; ++kw) {
            const T* row = cp + (kh * KW + kw) * OH * OW;
            const auto [w0, w1] = run_w[kw];
            for (int64_t oh = run_h[kh].first; oh < run_h[kh].second; ++oh) {
              T* orow = o + (oh * sh - ph + kh * dh) * W + (w0 * sw - pw + kw * dw);
              const T* crow = row + oh * OW;
              int64_t ow = w0;
              if (sw == 1) {
                for (; ow + V <= w1; ow += V) {
                  T* q = orow + (ow - w0);
                  (Vec::loadu(q) + Vec::loadu(crow + ow)).store(q);
                }
              }
              for (; ow < w1; ++ow) orow[(ow - w0) * sw] += crow[ow];
            }
          }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  m.def("cpp_col2im(Tensor cols, int[2] output_size, int[2] kernel_size, int[2] dilation, int[2] padding, "
        "int[2] stride) -> Tensor");
}

TORCH_LIBRARY_IMPL(commentaries_ext, CPU, m) { m.impl("cpp_col2im", &cpp_col2im); }

}  // namespace commentaries_ext
