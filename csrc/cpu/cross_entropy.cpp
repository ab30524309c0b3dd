// Weighted / blended softmax cross-entropy on the CPU (kernel ops cpp_wce_*).
// Signatures and semantics: DEVELOPING.md ("cross_entropy"). Validated input
// (commentaries_ext/ops/cross_entropy.py): logits [N, C] float32/float64 with any
// strides, target [N] int64 (in range or == ignore_index: make_mix checks it again, and is
// the only check on the reduced path of cross_entropy_autograd.cpp), target_b/lam [N] or
// None, per-row tensors with any stride. Outputs are new contiguous tensors.
//
// Every row is handled by one thread (rows spread with at::parallel_for). A row
// with column stride 1 is read in place, otherwise it is first gathered into a
// thread-local buffer (likewise u and t); the per-row passes then run over a
// contiguous row with at::vec::Vectorized (the second pass over a row reads it
// from L1/L2, so memory sees the logits once per op). wce_forward_grad, the hot
// one, takes blocks of rows that fit in L1 in phases (all maxima, then all
// exponentials, then the scaling) so that rows overlap, and a row's tail is its
// last full vector. Math in the logits dtype.
// Extreme logits: the row max is subtracted before exp; a row max of -inf (all
// -inf) gives lse = -inf; target terms with a zero coefficient (lam 0 or 1) are
// dropped, so a -inf logit there gives no NaN.
#include "cpu/simd.h"  // first: selects the Vectorized specialisation
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cross_entropy_contract.h"

namespace commentaries_ext {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// vexp: the exponential of every kernel here, always inlined (ATen's exp_u20 stays an
// out-of-line call per vector at some call sites). float under AVX-512: x = n ln2 + r
// (Cody-Waite, |r| <= ln2/2), a degree-5 minimax polynomial for e^r (1.03e-7 relative,
// 1.9e-7 as evaluated in float, fitted by linear programming on |r| <= ln2/2) scaled by 2^n
// with scalef; x < ln(FLT_MIN) (-87.34) gives 0 (as exp_u20: no denormals) by the mask
// alone (no clamp: -inf or a huge negative x is masked), x >= 88.72 saturates at e^88.72
// (scalef would overflow to inf but turn +inf into NaN); NaN gives NaN (the row reductions
// rely on it). The inputs here are z - max or z - lse (<= ~0). AVX2: the same polynomial,
// x clamped to [-88, 88] and 2^n from the exponent bits. Otherwise (double, no SIMD) ATen's exp
// (Sleef u10).
template <typename T>
inline __attribute__((always_inline)) Vec<T> vexp(const Vec<T>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 xv = x;
    // min returns its second operand when one is NaN: NaN x stays NaN
    const __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.72f), xv);
    const __mmask16 keep = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.33654475f), _CMP_NLT_UQ);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504089f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);  // ln2 = hi + lo, n * hi exact
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.00831472f), r, _mm512_set1_ps(0.04189025f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.1666709f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.4999923f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(keep, q, n);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 xv = x;
    const __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-88.f), xv));
    const __m256 small = _mm256_cmp_ps(xv, _mm256_set1_ps(-87.33654475f), _CMP_LT_OQ);  // false for NaN
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504089f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(0.00831472f), r, _mm256_set1_ps(0.04189025f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.1666709f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.4999923f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.f));
    // 2^n from the exponent bits (n in [-127, 127]; n = -127 only where small zeroes it)
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(small, _mm256_mul_ps(q, _mm256_castsi256_ps(e)));
  }
#endif
  return x.exp();
}

// Plain (not NaN-propagating) vector max: one instruction instead of IEEE maximum's four.
template <typename T>
inline __attribute__((always_inline)) Vec<T> vmax(const Vec<T>& a, const Vec<T>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return Vec<T>(_mm512_max_ps(a, b));
  if constexpr (std::is_same_v<T, double>) return Vec<T>(_mm512_max_pd(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return Vec<T>(_mm256_max_ps(a, b));
  if constexpr (std::is_same_v<T, double>) return Vec<T>(_mm256_max_pd(a, b));
#endif
  return at::vec::maximum(a, b);
}

// Horizontal sum and max of a vector. float: ATen's shuffle tree (no store, no scalar
// loop: with 16 lanes a scalar loop is a 16-long dependency chain per row).
template <typename T>
inline T hsum(const Vec<T>& v) {
  if constexpr (std::is_same_v<T, float>) {
    return at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return a + b; }, v);
  } else {
    alignas(64) T buf[Vec<T>::size()];
    v.store(buf);
    T s = 0;
    for (int k = 0; k < Vec<T>::size(); ++k) s += buf[k];
    return s;
  }
}

// NaN propagates (at::vec::maximum is IEEE maximum).
template <typename T>
inline T hmax(const Vec<T>& v) {
  if constexpr (std::is_same_v<T, float>) {
    return at::vec::vec_reduce_all<T>(
        [](const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }, v);
  } else {
    alignas(64) T buf[Vec<T>::size()];
    v.store(buf);
    T s = buf[0];
    for (int k = 1; k < Vec<T>::size(); ++k) s = (buf[k] > s || std::isnan(buf[k])) ? buf[k] : s;
    return s;
  }
}

// Rows: a row is *regular* when its max is finite and the sum of its exponentials is not
// NaN. row_max skips or returns a NaN logit (plain max), and vexp maps a NaN to NaN, so a
// NaN anywhere makes the row irregular; so do a +inf logit (max +inf) and a row of -inf
// (max -inf). Regular rows take the vector path; the rest special_lse and std::exp.

// The row passes read memory only in their first pass over a row; without help the memory
// would idle while the later passes compute in L1. So the passes that read the logits ask
// for the lines 8 KB ahead (the next rows), one 128-byte step per iteration of two vectors.
template <typename T>
inline __attribute__((always_inline)) void prefetch_ahead(const T* p) {
  prefetch_lines<8192, 2>(p);
}

// The last r lanes of v (0 < r < lane count), the others zero: for a row tail handled as the
// row's last full vector, overlapping lanes already done (a full load and store instead of
// masked ones, and no per-count blend).
template <typename T>
inline __attribute__((always_inline)) Vec<T> last_lanes(const Vec<T>& v, int64_t r) {
  constexpr int64_t W = Vec<T>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return Vec<T>(_mm512_maskz_mov_ps(__mmask16(0xFFFFu << (W - r)), v));
  if constexpr (std::is_same_v<T, double>) return Vec<T>(_mm512_maskz_mov_pd(__mmask8(0xFFu << (W - r)), v));
#endif
  return Vec<T>::blendv(Vec<T>(0), v, Vec<T>::arange(T(0), T(1)) >= Vec<T>(T(W - r)));
}

// The lanes of a row's running maxima, C >= 1: their max is the row max
template <typename T>
inline Vec<T> row_max_lanes(const T* z, int64_t C) {
  constexpr int64_t W = Vec<T>::size();
  if (C < W) return Vec<T>::set(Vec<T>(-std::numeric_limits<T>::infinity()), Vec<T>::loadu(z, C), C);
  // in address order; the last, overlapping vector covers the tail: max is idempotent
  Vec<T> m0 = Vec<T>::loadu(z), m1 = m0;
  int64_t c = W;
  for (; c + 2 * W <= C; c += 2 * W) {
    prefetch_ahead(z + c);
    m0 = vmax(m0, Vec<T>::loadu(z + c));
    m1 = vmax(m1, Vec<T>::loadu(z + c + W));
  }
  for (; c + W <= C; c += W) m0 = vmax(m0, Vec<T>::loadu(z + c));
  if (c < C) m1 = vmax(m1, Vec<T>::loadu(z + C - W));
  return vmax(m0, m1);
}

// max_c z_c of a contiguous row, C >= 1 (a NaN may be skipped: see above)
template <typename T>
inline T row_max(const T* z, int64_t C) {
  if (C < Vec<T>::size()) {
    T m = z[0];
    for (int64_t c = 1; c < C; ++c) m = z[c] > m ? z[c] : m;
    return m;
  }
  return hmax(row_max_lanes(z, C));
}

// The lanes of a row's running sums of exp(z_c - m) (m finite); kStore: the exponentials also
// go to out
template <typename T, bool kStore>
inline Vec<T> row_sumexp_lanes(const T* z, int64_t C, T m, T* out) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vm(m);
  Vec<T> s0(0), s1(0);
  int64_t c = 0;
  for (; c + 2 * W <= C; c += 2 * W) {
    prefetch_ahead(z + c);  // keeps memory busy while this row is exponentiated
    const Vec<T> e0 = vexp(Vec<T>::loadu(z + c) - vm), e1 = vexp(Vec<T>::loadu(z + c + W) - vm);
    if constexpr (kStore) {
      e0.store(out + c);
      e1.store(out + c + W);
    }
    s0 = s0 + e0;
    s1 = s1 + e1;
  }
  for (; c + W <= C; c += W) {
    const Vec<T> e0 = vexp(Vec<T>::loadu(z + c) - vm);
    if constexpr (kStore) e0.store(out + c);
    s0 = s0 + e0;
  }
  if (c < C && C >= W) {  // the last full vector of the row: its first lanes are stored again (same values), not summed again
    const Vec<T> e0 = vexp(Vec<T>::loadu(z + C - W) - vm);
    if constexpr (kStore) e0.store(out + C - W);
    s1 = s1 + last_lanes(e0, C - c);
  } else if (c < C) {  // pad with -inf: exp gives 0
    const int64_t r = C - c;
    const Vec<T> e0 = vexp(Vec<T>::set(Vec<T>(-std::numeric_limits<T>::infinity()), Vec<T>::loadu(z + c, r), r) - vm);
    if constexpr (kStore) e0.store(out + c, r);
    s1 = s1 + e0;
  }
  return s0 + s1;
}

// sum_c exp(z_c - m) of a contiguous row (m finite); kStore: the exponentials also go to out
template <typename T, bool kStore>
inline T row_sumexp(const T* z, int64_t C, T m, T* out) {
  return hsum(row_sumexp_lanes<T, kStore>(z, C, m, out));
}

// Horizontal reductions of a block's rows at once: out[r] = the max (kMax) or the sum of the
// lanes of lanes[r], r < n. float under AVX-512 takes 16 rows at a time through a
// transposition tree (each level combines two vectors' halves, so 16 rows cost 15 ops and 31
// shuffles, against ~8 dependent ones per row with a tree per row); the rest hmax / hsum.
// The max is the plain one (a NaN may be skipped, as in row_max_lanes).
template <bool kMax, typename T>
inline void reduce_rows(const Vec<T>* lanes, int64_t n, T* out) {
  int64_t r = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    auto op = [](__m512 a, __m512 b) __attribute__((always_inline)) {
      return kMax ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b);
    };
    // lane 4k + j of the last level holds row k + 4j
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (; r + 16 <= n; r += 16) {
      const Vec<T>* v = lanes + r;
      __m512 w[8], u[4], h[2];
      // 128-bit quarters: w[k] = rows 2k, 2k + 1 with 8 partials each
      for (int k = 0; k < 8; ++k)
        w[k] = op(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44), _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
      // u[k]: quarter q is row 4k + q with 4 partials
      for (int k = 0; k < 4; ++k)
        u[k] = op(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88), _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
      // within quarters: h[k], quarter q = rows 8k + q, 8k + 4 + q with 2 partials each
      for (int k = 0; k < 2; ++k)
        h[k] = op(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0x44), _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0xEE));
      const __m512 all = op(_mm512_shuffle_ps(h[0], h[1], 0x88), _mm512_shuffle_ps(h[0], h[1], 0xDD));
      _mm512_storeu_ps(out + r, _mm512_permutexvar_ps(order, all));
    }
  }
#endif
  for (; r < n; ++r) out[r] = kMax ? hmax(lanes[r]) : hsum(lanes[r]);
}

inline bool regular(double m, double s) { return std::isfinite(m) && !std::isnan(s); }

// lse of any row (column stride s1) in IEEE terms: NaN with a NaN logit, else +inf with a
// +inf logit, -inf when every logit is -inf (or C == 0). For the irregular rows.
template <typename T>
T special_lse(const T* z, int64_t s1, int64_t C) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < C; ++c) {
    const T v = z[c * s1];
    if (std::isnan(v)) return v;
    m = v > m ? v : m;
  }
  if (!std::isfinite(m)) return m;
  T s = 0;
  for (int64_t c = 0; c < C; ++c) s += std::exp(z[c * s1] - m);
  return m + std::log(s);
}

// lse of a contiguous row
template <typename T>
inline T row_lse(const T* z, int64_t C) {
  if (C == 0) return -std::numeric_limits<T>::infinity();
  const T m = row_max(z, C);
  const T s = std::isfinite(m) ? row_sumexp<T, false>(z, C, m, nullptr) : T(0);
  return regular(m, s) ? m + std::log(s) : special_lse(z, 1, C);
}

// A row of a [N, C] tensor as a contiguous pointer: in place when the column
// stride is 1, else gathered into buf.
template <typename T>
inline const T* row_ptr(const T* base, int64_t i, int64_t s0, int64_t s1, int64_t C, std::vector<T>& buf) {
  const T* p = base + i * s0;
  if (s1 == 1 || C <= 1) return p;
  buf.resize(C);
  for (int64_t c = 0; c < C; ++c) buf[c] = p[c * s1];
  return buf.data();
}

// An output at least this large does not stay in the cache for its consumer: it is staged
// in a small L1 buffer and written with non-temporal stores, which skip the read for
// ownership of each destination line (a third of the traffic of a read-once/write-once op).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t W = Vec<T>::size();
  int64_t k = 0;
  for (; k < n && reinterpret_cast<uintptr_t>(dst + k) % sizeof(Vec<T>) != 0; ++k) dst[k] = src[k];
  for (; k + W <= n; k += W) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(dst + k, _mm512_loadu_ps(src + k));
    else _mm512_stream_pd(dst + k, _mm512_loadu_pd(src + k));
#else
    if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(dst + k, _mm256_loadu_ps(src + k));
    else _mm256_stream_pd(dst + k, _mm256_loadu_pd(src + k));
#endif
  }
  for (; k < n; ++k) dst[k] = src[k];
#else
  std::copy(src, src + n, dst);
#endif
}

// Non-temporal stores are weakly ordered: each thread fences before its work is used.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

int64_t grain_for(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

struct Mix {
  const int64_t* y;
  int64_t sy;
  const int64_t* yb;  // null without mixing
  int64_t syb;
  int64_t ignore_index;
};

// The inputs' shapes and dtypes, and the targets' range, are checked here although the Python
// layer validates them: the kernels index rows with the targets, so a direct call of an op with a
// bad input must be an error, not an access out of bounds.

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, C]");
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor");
}

// A per-row input: [N] (any stride), and a per-logit input: the logits' shape (any strides)
// (csrc/cross_entropy_contract.h), both of the logits dtype here (the kernels read them as T).
void check_logits_dtype(const at::Tensor& t, const at::Tensor& logits, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == logits.scalar_type(), op, ": ", name, " must have the logits dtype ",
              logits.scalar_type(), ", got ", t.scalar_type());
}

void check_rows(const at::Tensor& t, const at::Tensor& logits, const char* name, const char* op) {
  cross_entropy_contract::check_rows(t, logits, name, op);
  check_logits_dtype(t, logits, name, op);
}

void check_like_logits(const at::Tensor& t, const at::Tensor& logits, const char* name, const char* op) {
  cross_entropy_contract::check_like_logits(t, logits, name, op);
  check_logits_dtype(t, logits, name, op);
}

// target (and target_b with lam: mixing) of logits [N, C]: int64 [N], each target in [0, C) or
// ignore_index, target_b in [0, C) on the rows not ignored; lam [N] of the logits dtype.
Mix make_mix(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& target_b,
             const std::optional<at::Tensor>& lam, int64_t ignore_index, const char* op) {
  const int64_t N = logits.size(0), C = logits.size(1);
  cross_entropy_contract::check_rows(target, logits, "target", op);
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64");
  cross_entropy_contract::check_mix_pair(target_b.has_value(), lam.has_value(), op);
  Mix m{target.const_data_ptr<int64_t>(), target.stride(0), nullptr, 0, ignore_index};
  if (target_b.has_value()) {
    cross_entropy_contract::check_rows(*target_b, logits, "target_b", op);
    TORCH_CHECK(target_b->scalar_type() == at::kLong, op, ": target_b must be int64");
    check_rows(*lam, logits, "lam", op);
    m.yb = target_b->const_data_ptr<int64_t>();
    m.syb = target_b->stride(0);
  }
  if (C == 0) return m;  // nothing is read by class index
  bool bad = false;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y = m.y[i * m.sy];
    const bool valid = y != ignore_index;
    bad |= valid && static_cast<uint64_t>(y) >= static_cast<uint64_t>(C);
    if (m.yb) bad |= valid && static_cast<uint64_t>(m.yb[i * m.syb]) >= static_cast<uint64_t>(C);
  }
  if (bad) {
    for (int64_t i = 0; i < N; ++i) {
      const int64_t y = m.y[i * m.sy];
      if (y == ignore_index) continue;
      TORCH_CHECK(y >= 0 && y < C, op, ": target holds ", y, ", out of range for ", C, " classes (row ", i, ")");
      if (m.yb) {
        const int64_t yb = m.yb[i * m.syb];
        TORCH_CHECK(yb >= 0 && yb < C, op, ": target_b holds ", yb, ", out of range for ", C, " classes (row ", i,
                    ")");
      }
    }
  }
  return m;
}

// -------------------------------------------------------------- forward

// Small C with column stride 1: blocks of rows are shifted by their max into a
// flat scratch buffer, so that exp and log run on full vectors (per-row vector
// code would leave most lanes idle and pay a horizontal reduction per row).
template <typename T>
void lse_small_block(const T* z, int64_t s0, int64_t C, int64_t i0, int64_t rb, T* sh, T* ms, T* sums, T* lse_out) {
  constexpr int64_t W = Vec<T>::size();
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rb; ++r) {
    const T* row = z + (i0 + r) * s0;
    // branchless max (a data-dependent branch per element mispredicts on random logits);
    // it skips NaN, so NaN is found by the raw sum (NaN iff a NaN or both +-inf, then checked)
    T m = row[0], raw = row[0];
    for (int64_t c = 1; c < C; ++c) {
      m = row[c] > m ? row[c] : m;
      raw += row[c];
    }
    if (std::isnan(raw))
      for (int64_t c = 0; c < C; ++c)
        if (std::isnan(row[c])) m = row[c];
    const T mm = (m == ninf) ? T(0) : m;
    ms[r] = mm;
    T* o = sh + r * C;
    for (int64_t c = 0; c < C; ++c) o[c] = row[c] - mm;
  }
  const int64_t L = rb * C;
  int64_t k = 0;
  for (; k + W <= L; k += W) vexp(Vec<T>::loadu(sh + k)).store(sh + k);
  if (k < L) vexp(Vec<T>::loadu(sh + k, L - k)).store(sh + k, L - k);
  for (int64_t r = 0; r < rb; ++r) {
    const T* o = sh + r * C;
    T sacc = 0;
    for (int64_t c = 0; c < C; ++c) sacc += o[c];
    sums[r] = sacc;
  }
  k = 0;
  for (; k + W <= rb; k += W) (Vec<T>::loadu(ms + k) + Vec<T>::loadu(sums + k).log()).store(lse_out + k);
  for (; k < rb; ++k) lse_out[k] = ms[k] + std::log(sums[k]);
  for (int64_t r = 0; r < rb; ++r)
    if (std::isinf(ms[r])) lse_out[r] = ms[r];  // a +inf logit: lse is +inf
}

constexpr int64_t kSmallC = 32;
// wce_forward_grad's phased general path (below) beats the small path from C = 16 for
// float and from C = 32 for double (AVX-512, measured)
template <typename T>
constexpr int64_t kSmallCGrad = std::is_same_v<T, float> ? 15 : 24;
constexpr int64_t kRowBlock = 64;
// elements per row block of the general paths: the block and its output rows stay in L1
constexpr int64_t kBlockElems = 2048;

std::tuple<at::Tensor, at::Tensor> cpp_wce_forward(const at::Tensor& logits, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& target_b,
                                                   const std::optional<at::Tensor>& lam, int64_t ignore_index) {
  check_logits(logits, "wce_forward");
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor loss = new_output({N}, logits.options());
  at::Tensor lse = new_output({N}, logits.options());
  const Mix mix = make_mix(logits, target, target_b, lam, ignore_index, "wce_forward");
  if (N == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cpp_wce_forward", [&] {
    using T = scalar_t;
    const T* z = logits.const_data_ptr<T>();
    const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
    const T* lm = mix.yb ? lam->const_data_ptr<T>() : nullptr;
    const int64_t slm = mix.yb ? lam->stride(0) : 0;
    T* lo = loss.mutable_data_ptr<T>();
    T* ls = lse.mutable_data_ptr<T>();
    const bool small = C > 0 && C <= kSmallC && (s1 == 1 || C == 1);
    at::parallel_for(0, N, grain_for(C), [&](int64_t b, int64_t e) {
      std::vector<T> buf;
      if (small) {
        std::vector<T> sh(kRowBlock * C), scratch(3 * kRowBlock);
        for (int64_t i0 = b; i0 < e; i0 += kRowBlock)
          lse_small_block(z, s0, C, i0, std::min(kRowBlock, e - i0), sh.data(), scratch.data(),
                          scratch.data() + kRowBlock, ls + i0);
      }
      for (int64_t i = b; i < e; ++i) {
        const T* row = row_ptr(z, i, s0, s1, C, buf);
        const T l = small ? ls[i] : row_lse(row, C);
        ls[i] = l;
        const int64_t y = mix.y[i * mix.sy];
        if (y == mix.ignore_index || C == 0) {
          lo[i] = 0;
          continue;
        }
        T tgt;
        if (lm) {
          const T a = lm[i * slm];
          const int64_t yb = mix.yb[i * mix.syb];
          tgt = (a == T(0) ? T(0) : a * row[y]) + (a == T(1) ? T(0) : (T(1) - a) * row[yb]);
        } else {
          tgt = row[y];
        }
        lo[i] = l - tgt;
      }
    });
  });
  return {loss, lse};
}

// -------------------------------------------------------------- backward

at::Tensor cpp_wce_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& lse,
                            const at::Tensor& target, const std::optional<at::Tensor>& target_b,
                            const std::optional<at::Tensor>& lam, int64_t ignore_index) {
  check_logits(logits, "wce_backward");
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor out = new_output({N, C}, logits.options());
  if (N == 0 || C == 0) return out;
  check_rows(grad_loss, logits, "grad_loss", "wce_backward");
  check_rows(lse, logits, "lse", "wce_backward");
  const Mix mix = make_mix(logits, target, target_b, lam, ignore_index, "wce_backward");
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cpp_wce_backward", [&] {
    using T = scalar_t;
    constexpr int64_t W = Vec<T>::size();
    const T* z = logits.const_data_ptr<T>();
    const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
    const T* g = grad_loss.const_data_ptr<T>();
    const int64_t sg = grad_loss.stride(0);
    const T* ls = lse.const_data_ptr<T>();
    const int64_t sls = lse.stride(0);
    const T* lm = mix.yb ? lam->const_data_ptr<T>() : nullptr;
    const int64_t slm = mix.yb ? lam->stride(0) : 0;
    T* o = out.mutable_data_ptr<T>();
    at::parallel_for(0, N, grain_for(C), [&](int64_t b, int64_t e) {
      std::vector<T> buf;
      for (int64_t i = b; i < e; ++i) {
        T* orow = o + i * C;
        const int64_t y = mix.y[i * mix.sy];
        if (y == mix.ignore_index) {
          std::fill(orow, orow + C, T(0));
          continue;
        }
        const T* row = row_ptr(z, i, s0, s1, C, buf);
        const T gi = g[i * sg];
        const T li = ls[i * sls];
        if (!std::isfinite(li)) {  // rare rows (NaN, +-inf lse): std::exp, exact in IEEE (exp_u20 maps NaN to inf)
          for (int64_t c = 0; c < C; ++c) orow[c] = gi * std::exp(row[c] - li);
        } else {
          const Vec<T> vl(li), vg(gi);
          int64_t c = 0;
          for (; c + W <= C; c += W) (vg * vexp(Vec<T>::loadu(row + c) - vl)).store(orow + c);
          if (c < C) (vg * vexp(Vec<T>::loadu(row + c, C - c) - vl)).store(orow + c, C - c);
        }
        if (lm) {
          const T a = lm[i * slm];
          const int64_t yb = mix.yb[i * mix.syb];
          orow[y] -= gi * a;
          orow[yb] -= gi * (T(1) - a);
        } else {
          orow[y] -= gi;
        }
      }
    });
  });
  return out;
}

// -------------------------------------------------------------- forward with the gradient

// The first-order fast path of a reduced loss: in one pass over the logits, the
// per-row loss and lse of cpp_wce_forward and grad_i = s_i (p_i - mix_i) (s = row_scale,
// None: 1; zero rows where ignored), so that a backward needs no second exp pass.
// p = exp(z - m) / sum exp(z - m) from the same exponentials as the lse; rows whose lse
// is not finite (an infinite max, NaN) take p = exp(z - lse) as wce_backward does.
template <typename T>
inline T target_logit(const T* row, const Mix& mix, const T* lm, int64_t slm, int64_t i, int64_t y) {
  if (!lm) return row[y];
  const T a = lm[i * slm];
  const int64_t yb = mix.yb[i * mix.syb];
  return (a == T(0) ? T(0) : a * row[y]) + (a == T(1) ? T(0) : (T(1) - a) * row[yb]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpp_wce_forward_grad(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& target_b,
    const std::optional<at::Tensor>& lam, const std::optional<at::Tensor>& row_scale, int64_t ignore_index) {
  check_logits(logits, "wce_forward_grad");
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor loss = new_output({N}, logits.options());
  at::Tensor lse = new_output({N}, logits.options());
  at::Tensor grad = new_output({N, C}, logits.options());
  if (row_scale.has_value()) check_rows(*row_scale, logits, "row_scale", "wce_forward_grad");
  const Mix mix = make_mix(logits, target, target_b, lam, ignore_index, "wce_forward_grad");
  if (N == 0) return {loss, lse, grad};
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cpp_wce_forward_grad", [&] {
    using T = scalar_t;
    constexpr int64_t W = Vec<T>::size();
    const T ninf = -std::numeric_limits<T>::infinity();
    const T* z = logits.const_data_ptr<T>();
    const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
    const T* lm = mix.yb ? lam->const_data_ptr<T>() : nullptr;
    const int64_t slm = mix.yb ? lam->stride(0) : 0;
    const T* rs = row_scale.has_value() ? row_scale->const_data_ptr<T>() : nullptr;
    const int64_t srs = row_scale.has_value() ? row_scale->stride(0) : 0;
    T* lo = loss.mutable_data_ptr<T>();
    T* ls = lse.mutable_data_ptr<T>();
    T* go = grad.mutable_data_ptr<T>();
    // Row i from its lse l and, in grow, its exponentials exp(z - m); q = row_scale / their sum.
    auto finish_row = [&](int64_t i, const T* row, T* grow, T q, T l) __attribute__((always_inline)) {
      ls[i] = l;
      const int64_t y = mix.y[i * mix.sy];
      if (y == mix.ignore_index) {
        lo[i] = 0;
        std::fill(grow, grow + C, T(0));
        return;
      }
      lo[i] = l - target_logit(row, mix, lm, slm, i, y);
      const T r = rs ? rs[i * srs] : T(1);
      if (!std::isfinite(l)) {  // rare rows: std::exp for IEEE NaN/inf (exp_u20 is not exact there)
        for (int64_t c = 0; c < C; ++c) grow[c] = r * std::exp(row[c] - l);
      } else {
        // the target entries first: written after the vector pass, not read back from its stores
        // (without mixing, a = 1 and yb = y: gyb = gy)
        const T a = lm ? lm[i * slm] : T(1);
        const int64_t yb = lm ? mix.yb[i * mix.syb] : y;
        const T gy = q * grow[y] - r * a;
        const T gyb = (yb == y ? gy : q * grow[yb]) - r * (T(1) - a);
        const Vec<T> vq(q);
        if (C >= W && C % W != 0) {  // the tail as the last full vector, read before the loop writes its first lanes
          const Vec<T> tail = vq * Vec<T>::loadu(grow + C - W);
          for (int64_t c = 0; c + W <= C; c += W) (vq * Vec<T>::loadu(grow + c)).store(grow + c);
          tail.store(grow + C - W);
        } else {
          int64_t c = 0;
          for (; c + W <= C; c += W) (vq * Vec<T>::loadu(grow + c)).store(grow + c);
          if (c < C) (vq * Vec<T>::loadu(grow + c, C - c)).store(grow + c, C - c);
        }
        grow[y] = gy;
        grow[yb] = gyb;
        return;
      }
      if (lm) {
        const T a = lm[i * slm];
        grow[y] -= r * a;
        grow[mix.yb[i * mix.syb]] -= r * (T(1) - a);
      } else {
        grow[y] -= r;
      }
    };
    const bool small = C > 0 && C <= kSmallCGrad<T> && (s1 == 1 || C == 1);
    const bool stream = N * C * int64_t(sizeof(T)) >= kStreamBytes;
    at::parallel_for(0, N, grain_for(C), [&](int64_t b, int64_t e) {
      if (small) {
        // a block of rows of the contiguous gradient is one flat run: lse_small_block leaves the
        // shifted exponentials in it (and the lse in ls)
        alignas(64) T ms[kRowBlock], sums[kRowBlock];
        for (int64_t i0 = b; i0 < e; i0 += kRowBlock) {
          const int64_t rb = std::min(kRowBlock, e - i0);
          T* gb = go + i0 * C;
          lse_small_block(z, s0, C, i0, rb, gb, ms, sums, ls + i0);
          for (int64_t r = 0; r < rb; ++r)
            finish_row(i0 + r, z + (i0 + r) * s0, gb + r * C, (rs ? rs[(i0 + r) * srs] : T(1)) / sums[r], ls[i0 + r]);
        }
        return;
      }
      // Blocks of rows that fit in L1 with their gradient rows, in phases over the block: the
      // row maxima, then the exponentials (into the gradient rows) and their sums, then the
      // logs and 1 / sums as vectors, then each row scaled while still in L1 (in the staging
      // buffer when the gradient is streamed). Within a phase the rows are independent, so
      // the core overlaps one row's exp latency with the next row's work (row by row, each row
      // waited on its max, then on its sum), and the rows' horizontal reductions run 16 at a
      // time (reduce_rows).
      int64_t rows = std::clamp<int64_t>(kBlockElems / std::max<int64_t>(C, 1), 1, kRowBlock);
      // whole groups of 16 for reduce_rows, rounded up (a block of at most ~2 kBlockElems: measured
      // 3-6 % faster than rounding down at C = 96 to 112)
      if (rows > 16) rows = (rows + 15) / 16 * 16;
      std::vector<T> stage(stream ? rows * C : 0), gathered(s1 == 1 ? 0 : rows * C);
      alignas(64) T mb[kRowBlock], sb[kRowBlock], lb[kRowBlock], qb[kRowBlock];
      Vec<T> lanes[kRowBlock];  // per row: the lanes of its max, then of its sum
      for (int64_t i0 = b; i0 < e; i0 += rows) {
        const int64_t rb = std::min(rows, e - i0);
        T* gblock = stream ? stage.data() : go + i0 * C;
        // the block's rows, contiguous: in place, or gathered when the column stride is not 1
        const T* zb = z + i0 * s0;
        int64_t zs = s0;
        if (s1 != 1) {
          for (int64_t r = 0; r < rb; ++r)
            for (int64_t c = 0; c < C; ++c) gathered[r * C + c] = zb[r * s0 + c * s1];
          zb = gathered.data();
          zs = C;
        }
        if (rb < 16 || C == 0) {  // long rows, or a thread's last rows: no group of 16 to reduce together
          for (int64_t r = 0; r < rb; ++r) mb[r] = C > 0 ? row_max(zb + r * zs, C) : ninf;
          for (int64_t r = 0; r < rb; ++r)
            sb[r] = std::isfinite(mb[r]) ? row_sumexp<T, true>(zb + r * zs, C, mb[r], gblock + r * C) : T(0);
        } else {
          for (int64_t r = 0; r < rb; ++r) lanes[r] = row_max_lanes(zb + r * zs, C);
          reduce_rows<true>(lanes, rb, mb);
          for (int64_t r = 0; r < rb; ++r)
            lanes[r] = std::isfinite(mb[r]) ? row_sumexp_lanes<T, true>(zb + r * zs, C, mb[r], gblock + r * C) : Vec<T>(0);
          reduce_rows<false>(lanes, rb, sb);
        }
        for (int64_t r = 0; r < rb; ++r) qb[r] = rs ? rs[(i0 + r) * srs] : T(1);
        int64_t r = 0;
        for (; r + W <= rb; r += W) {
          const Vec<T> vs = Vec<T>::loadu(sb + r);
          (Vec<T>::loadu(mb + r) + vs.log()).store(lb + r);
          (Vec<T>::loadu(qb + r) / vs).store(qb + r);
        }
        if (r < rb) {
          const Vec<T> vs = Vec<T>::loadu(sb + r, rb - r);
          (Vec<T>::loadu(mb + r, rb - r) + vs.log()).store(lb + r, rb - r);
          (Vec<T>::loadu(qb + r, rb - r) / vs).store(qb + r, rb - r);
        }
        for (r = 0; r < rb; ++r) {
          const int64_t i = i0 + r;
          if (C == 0) {
            ls[i] = ninf;
            lo[i] = 0;
            continue;
          }
          const T* row = zb + r * zs;
          if (regular(mb[r], sb[r])) finish_row(i, row, gblock + r * C, qb[r], lb[r]);
          else finish_row(i, row, gblock + r * C, T(0), special_lse(row, 1, C));  // l not finite
        }
        if (stream) stream_copy(go + i0 * C, stage.data(), rb * C);
      }
      if (stream) stream_fence();
    });
  });
  return {loss, lse, grad};
}

// -------------------------------------------------------------- hvp

// The second pass of the HVP: orow = q * orow * (u - dot), where orow holds p (or exp(z - m)
// with q folding in 1 / sum).
template <typename T>
inline void hvp_scale_row(T* orow, const T* urow, T q, T dot, int64_t C) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vq(q), vd(dot);
  int64_t c = 0;
  for (; c + W <= C; c += W) (vq * Vec<T>::loadu(orow + c) * (Vec<T>::loadu(urow + c) - vd)).store(orow + c);
  if (c < C) {
    const int64_t r = C - c;
    (vq * Vec<T>::loadu(orow + c, r) * (Vec<T>::loadu(urow + c, r) - vd)).store(orow + c, r);
  }
}


// Both HVP kernels: lse given (wce_hvp: p = exp(z - lse)) or not (wce_softmax_hvp: one pass
// keeps exp(z - m) in out and sums exp and exp * u, so the row is exponentiated once instead
// of once more for the lse). Rows with a non-finite lse (or max) use std::exp (IEEE NaN/inf).
at::Tensor hvp_impl(const char* name, const at::Tensor& logits, const at::Tensor* lse, const at::Tensor& scale,
                    const at::Tensor& u) {
  check_logits(logits, name);
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor out = new_output({N, C}, logits.options());
  if (N == 0 || C == 0) return out;
  if (lse) check_rows(*lse, logits, "lse", name);
  check_rows(scale, logits, "scale", name);
  check_like_logits(u, logits, "u", name);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cpp_wce_hvp", [&] {
    using T = scalar_t;
    constexpr int64_t W = Vec<T>::size();
    const T* z = logits.const_data_ptr<T>();
    const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
    const T* up = u.const_data_ptr<T>();
    const int64_t u0 = u.stride(0), u1 = u.stride(1);
    const T* ls = lse ? lse->const_data_ptr<T>() : nullptr;
    const int64_t sls = lse ? lse->stride(0) : 0;
    const T* sc = scale.const_data_ptr<T>();
    const int64_t ssc = scale.stride(0);
    T* o = out.mutable_data_ptr<T>();
    const bool stream = N * C * int64_t(sizeof(T)) >= kStreamBytes;
    at::parallel_for(0, N, grain_for(C), [&](int64_t b, int64_t e) {
      std::vector<T> zbuf, ubuf, stage(stream ? C : 0);
      for (int64_t i = b; i < e; ++i) {
        T* orow = stream ? stage.data() : o + i * C;
        const T* row = row_ptr(z, i, s0, s1, C, zbuf);
        const T* urow = row_ptr(up, i, u0, u1, C, ubuf);
        const T si = sc[i * ssc];
        // shift: lse (normalised exponentials) or the row max (divide by their sum after)
        const T shift = ls ? ls[i * sls] : row_max(row, C);
        // a non-finite lse, or an irregular row (softmax_hvp): std::exp, IEEE NaN/inf
        auto special_row = [&](T l) {
          T dot = 0;
          for (int64_t c = 0; c < C; ++c) {
            orow[c] = std::exp(row[c] - l);
            dot += orow[c] * urow[c];
          }
          hvp_scale_row(orow, urow, si, dot, C);
        };
        if (!std::isfinite(shift)) {
          special_row(ls ? shift : special_lse(row, 1, C));
          if (stream) stream_copy(o + i * C, orow, C);
          continue;
        }
        const Vec<T> vm(shift);
        Vec<T> sv(0), dv(0);
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          if (c % (2 * W) == 0) {  // one 128-byte step of each input per two vectors
            prefetch_ahead(row + c);
            prefetch_ahead(urow + c);
          }
          const Vec<T> ev = vexp(Vec<T>::loadu(row + c) - vm);
          ev.store(orow + c);
          sv = sv + ev;
          dv = at::vec::fmadd(ev, Vec<T>::loadu(urow + c), dv);
        }
        if (c < C) {  // tail: -inf padding gives exp 0, u's zero padding adds nothing
          const int64_t r = C - c;
          const Vec<T> x = Vec<T>::set(Vec<T>(-std::numeric_limits<T>::infinity()), Vec<T>::loadu(row + c, r), r);
          const Vec<T> ev = vexp(x - vm);
          ev.store(orow + c, r);
          sv = sv + ev;
          dv = at::vec::fmadd(ev, Vec<T>::loadu(urow + c, r), dv);
        }
        const T sum = hsum(sv), d = hsum(dv);
        // out = s * p * (u - p.u); p = e (lse given) or e / sum
        if (ls) hvp_scale_row(orow, urow, si, d, C);
        else if (std::isnan(sum)) special_row(special_lse(row, 1, C));  // a NaN logit skipped by row_max
        else hvp_scale_row(orow, urow, si / sum, d / sum, C);
        if (stream) stream_copy(o + i * C, orow, C);
      }
      if (stream) stream_fence();
    });
  });
  return out;
}

at::Tensor cpp_wce_hvp(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& scale, const at::Tensor& u) {
  return hvp_impl("wce_hvp", logits, &lse, scale, u);
}

at::Tensor cpp_wce_softmax_hvp(const at::Tensor& logits, const at::Tensor& scale, const at::Tensor& u) {
  return hvp_impl("wce_softmax_hvp", logits, nullptr, scale, u);
}

// -------------------------------------------------------------- jvp

at::Tensor cpp_wce_jvp(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& target,
                       const std::optional<at::Tensor>& target_b, const std::optional<at::Tensor>& lam,
                       const at::Tensor& t, int64_t ignore_index) {
  check_logits(logits, "wce_jvp");
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor out = new_output({N}, logits.options());
  check_rows(lse, logits, "lse", "wce_jvp");
  check_like_logits(t, logits, "t", "wce_jvp");
  const Mix mix = make_mix(logits, target, target_b, lam, ignore_index, "wce_jvp");
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cpp_wce_jvp", [&] {
    using T = scalar_t;
    constexpr int64_t W = Vec<T>::size();
    const T* z = logits.const_data_ptr<T>();
    const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
    const T* tp = t.const_data_ptr<T>();
    const int64_t t0 = t.stride(0), t1 = t.stride(1);
    const T* ls = lse.const_data_ptr<T>();
    const int64_t sls = lse.stride(0);
    const T* lm = mix.yb ? lam->const_data_ptr<T>() : nullptr;
    const int64_t slm = mix.yb ? lam->stride(0) : 0;
    T* o = out.mutable_data_ptr<T>();
    at::parallel_for(0, N, grain_for(C), [&](int64_t b, int64_t e) {
      std::vector<T> zbuf, tbuf;
      for (int64_t i = b; i < e; ++i) {
        const int64_t y = mix.y[i * mix.sy];
        if (y == mix.ignore_index || C == 0) {
          o[i] = 0;
          continue;
        }
        const T* row = row_ptr(z, i, s0, s1, C, zbuf);
        const T* trow = row_ptr(tp, i, t0, t1, C, tbuf);
        const T li = ls[i * sls];
        const Vec<T> vl(li);
        Vec<T> d0(0);
        int64_t c = 0;
        if (!std::isfinite(li)) {  // rare rows (NaN, +-inf lse): std::exp, exact in IEEE (exp_u20 maps NaN to inf)
          T acc = 0;
          for (; c < C; ++c) acc += std::exp(row[c] - li) * trow[c];
          d0 = Vec<T>::set(Vec<T>(0), Vec<T>(acc), 1);
        }
        for (; c + W <= C; c += W)
          d0 = at::vec::fmadd(vexp(Vec<T>::loadu(row + c) - vl), Vec<T>::loadu(trow + c), d0);
        if (c < C) {
          // zero-padded t: padded lanes contribute exp(0 - lse) * 0 = 0 (finite lse)
          const Vec<T> p = vexp(Vec<T>::loadu(row + c, C - c) - vl);
          d0 = at::vec::fmadd(Vec<T>::set(Vec<T>(0), p, C - c), Vec<T>::loadu(trow + c, C - c), d0);
        }
        T acc = hsum(d0);
        if (lm) {
          const T a = lm[i * slm];
          const int64_t yb = mix.yb[i * mix.syb];
          acc -= (a == T(0) ? T(0) : a * trow[y]) + (a == T(1) ? T(0) : (T(1) - a) * trow[yb]);
        } else {
          acc -= trow[y];
        }
        o[i] = acc;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  m.def("cpp_wce_forward(Tensor logits, Tensor target, Tensor? target_b, Tensor? lam, int ignore_index) -> (Tensor, Tensor)");
  m.def("cpp_wce_backward(Tensor grad_loss, Tensor logits, Tensor lse, Tensor target, Tensor? target_b, Tensor? lam, int ignore_index) -> Tensor");
  m.def("cpp_wce_forward_grad(Tensor logits, Tensor target, Tensor? target_b, Tensor? lam, Tensor? row_scale, int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def("cpp_wce_softmax_hvp(Tensor logits, Tensor scale, Tensor u) -> Tensor");
  m.def("cpp_wce_hvp(Tensor logits, Tensor lse, Tensor scale, Tensor u) -> Tensor");
  m.def("cpp_wce_jvp(Tensor logits, Tensor lse, Tensor target, Tensor? target_b, Tensor? lam, Tensor t, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(commentaries_ext, CPU, m) {
  m.impl("cpp_wce_forward", &cpp_wce_forward);
  m.impl("cpp_wce_backward", &cpp_wce_backward);
  m.impl("cpp_wce_forward_grad", &cpp_wce_forward_grad);
  m.impl("cpp_wce_softmax_hvp", &cpp_wce_softmax_hvp);
  m.impl("cpp_wce_hvp", &cpp_wce_hvp);
  m.impl("cpp_wce_jvp", &cpp_wce_jvp);
}

}  // namespace commentaries_ext
