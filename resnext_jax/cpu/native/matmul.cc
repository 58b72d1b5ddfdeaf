// A matmul with a per-column affine epilogue and optionally a per-k affine prologue, float32, row-major:
//   y[i, j] = act(sum over k of a'[i, k] * b[k, j] * scale[j] + shift[j] (+ residual[i, j])),  act = ReLU or none,
//   a'[i, k] = a[i, k], or act'(a[i, k] * a_scale[k] + a_shift[k]) with act' ReLU or none,
// a (M, K), b (K, N) with N a multiple of 8, scale and shift (N), residual (M, N), a_scale and a_shift (K).
// Called from JAX through the XLA FFI (resnext_jax/cpu/build.py builds and registers it): a 1x1 conv with its
// inference batch norm, for a residual block's last conv the shortcut's add and the ReLU, and the batch norm
// and ReLU before the conv (`native.matmul_affine`).
//
// Why a kernel: at inference XLA:CPU runs a 1x1 conv's matmul in its runtime (Eigen) and the batch norm after
// it as a separate pass over the output, or two with a residual (docs/benchmarks-history.md, twelfth session). Here
// the epilogue runs on each register block just before it is stored, so the output is written once.
//
// Blocking: weights repacked per 16 columns, (N / 16, K, 16) (and (K, 8) for the last 8 of N = 16m + 8), by
// all threads before the matmul. Register blocks of 6 rows x 16 columns (12 AVX2 accumulators; 6 x 8 for
// the last 8), K in chunks of 256 (a 16 KiB weight panel, in L1) whose partial sums go through the output
// tile, which stays in L1. Each block of 6 rows walks every column block, so its rows of `a` stay in L1 while
// the packed weights stream from L2 or L3 (this order measured 150-183 GFLOP/s on ResNeXt-50's 1x1 shapes
// where column blocks outside row blocks measured 93-180); a work item is 1 to 8 such row blocks. 8-lane
// AVX2 code in both builds; the models use it on AVX2 builds only (`native.MATMUL_ISAS`).
//
// Deterministic: each output is summed over k in a fixed order.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "tail.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kCols = 16;   // columns per register block (two 8-lane vectors)
constexpr int kRows = 6;        // rows per register block
constexpr int64_t kDepth = 256; // k per pass over an output tile

struct Epilogue {
  const float* scale;     // at the block's first column
  const float* shift;
  const float* residual;  // at the block's first row and column, or nullptr
  int64_t ldr;
  bool relu;
};

// Applies the epilogue to a stored P x 8V tile in place (L1). Not inlined: the matmul's 12 accumulators
// and this code's constants together would not fit the 16 registers, and GCC then spills an accumulator
// around the k loop.
template <int P, int V>
__attribute__((noinline)) void ApplyEpilogue(float* c, int64_t ldc, const Epilogue& e) {
  const __m256 zero = _mm256_setzero_ps();
  for (int v = 0; v < V; ++v) {
    const __m256 s = _mm256_loadu_ps(e.scale + 8 * v), h = _mm256_loadu_ps(e.shift + 8 * v);
    for (int p = 0; p < P; ++p) {
      float* out = c + p * ldc + 8 * v;
      __m256 x = _mm256_fmadd_ps(_mm256_loadu_ps(out), s, h);
      if (e.residual) x = _mm256_add_ps(x, _mm256_loadu_ps(e.residual + p * e.ldr + 8 * v));
      _mm256_storeu_ps(out, e.relu ? _mm256_max_ps(zero, x) : x);  // zero first: NaN is kept
    }
  }
}

// c[p, 0:8V] (+)= sum over k < kc of a[p * lda + k] * bp[k * 8V + 0:8V] for the P <= 6 rows p of one block,
// V = 2 (a 16-column block) or 1 (the last 8 columns of N = 16m + 8); `first` starts from zero, else from c;
// `last` applies the epilogue. Named accumulators, so that GCC keeps them in registers.
template <int P, int V>
inline void RowBlock(const float* a, int64_t lda, const float* bp, int64_t kc, float* c, int64_t ldc, bool first,
                     bool last, const Epilogue& e) {
  static_assert(P >= 1 && P <= kRows && (V == 1 || V == 2));
  constexpr int64_t cols = 8 * V;
  // The tile's output lines (written first) and residual lines (read last) are requested now, so that
  // their misses overlap the k loop instead of stalling the stores and the epilogue.
  for (int p = 0; p < P; ++p) {
    if (first) _mm_prefetch(reinterpret_cast<const char*>(c + p * ldc), _MM_HINT_T0);
    if (last && e.residual) _mm_prefetch(reinterpret_cast<const char*>(e.residual + p * e.ldr), _MM_HINT_T0);
  }
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  if (!first) {
    c00 = _mm256_loadu_ps(c);
    if constexpr (P > 1) c10 = _mm256_loadu_ps(c + ldc);
    if constexpr (P > 2) c20 = _mm256_loadu_ps(c + 2 * ldc);
    if constexpr (P > 3) c30 = _mm256_loadu_ps(c + 3 * ldc);
    if constexpr (P > 4) c40 = _mm256_loadu_ps(c + 4 * ldc);
    if constexpr (P > 5) c50 = _mm256_loadu_ps(c + 5 * ldc);
    if constexpr (V > 1) {
      c01 = _mm256_loadu_ps(c + 8);
      if constexpr (P > 1) c11 = _mm256_loadu_ps(c + ldc + 8);
      if constexpr (P > 2) c21 = _mm256_loadu_ps(c + 2 * ldc + 8);
      if constexpr (P > 3) c31 = _mm256_loadu_ps(c + 3 * ldc + 8);
      if constexpr (P > 4) c41 = _mm256_loadu_ps(c + 4 * ldc + 8);
      if constexpr (P > 5) c51 = _mm256_loadu_ps(c + 5 * ldc + 8);
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_loadu_ps(bp + k * cols);
    const __m256 w1 = V > 1 ? _mm256_loadu_ps(bp + k * cols + 8) : w0;
    __m256 x = _mm256_broadcast_ss(a + k);
    c00 = _mm256_fmadd_ps(x, w0, c00);
    if constexpr (V > 1) c01 = _mm256_fmadd_ps(x, w1, c01);
    if constexpr (P > 1) {
      x = _mm256_broadcast_ss(a + lda + k);
      c10 = _mm256_fmadd_ps(x, w0, c10);
      if constexpr (V > 1) c11 = _mm256_fmadd_ps(x, w1, c11);
    }
    if constexpr (P > 2) {
      x = _mm256_broadcast_ss(a + 2 * lda + k);
      c20 = _mm256_fmadd_ps(x, w0, c20);
      if constexpr (V > 1) c21 = _mm256_fmadd_ps(x, w1, c21);
    }
    if constexpr (P > 3) {
      x = _mm256_broadcast_ss(a + 3 * lda + k);
      c30 = _mm256_fmadd_ps(x, w0, c30);
      if constexpr (V > 1) c31 = _mm256_fmadd_ps(x, w1, c31);
    }
    if constexpr (P > 4) {
      x = _mm256_broadcast_ss(a + 4 * lda + k);
      c40 = _mm256_fmadd_ps(x, w0, c40);
      if constexpr (V > 1) c41 = _mm256_fmadd_ps(x, w1, c41);
    }
    if constexpr (P > 5) {
      x = _mm256_broadcast_ss(a + 5 * lda + k);
      c50 = _mm256_fmadd_ps(x, w0, c50);
      if constexpr (V > 1) c51 = _mm256_fmadd_ps(x, w1, c51);
    }
  }
  _mm256_storeu_ps(c, c00);
  if constexpr (P > 1) _mm256_storeu_ps(c + ldc, c10);
  if constexpr (P > 2) _mm256_storeu_ps(c + 2 * ldc, c20);
  if constexpr (P > 3) _mm256_storeu_ps(c + 3 * ldc, c30);
  if constexpr (P > 4) _mm256_storeu_ps(c + 4 * ldc, c40);
  if constexpr (P > 5) _mm256_storeu_ps(c + 5 * ldc, c50);
  if constexpr (V > 1) {
    _mm256_storeu_ps(c + 8, c01);
    if constexpr (P > 1) _mm256_storeu_ps(c + ldc + 8, c11);
    if constexpr (P > 2) _mm256_storeu_ps(c + 2 * ldc + 8, c21);
    if constexpr (P > 3) _mm256_storeu_ps(c + 3 * ldc + 8, c31);
    if constexpr (P > 4) _mm256_storeu_ps(c + 4 * ldc + 8, c41);
    if constexpr (P > 5) _mm256_storeu_ps(c + 5 * ldc + 8, c51);
  }
  if (last) ApplyEpilogue<P, V>(c, ldc, e);
}

// One column block (V = 2) or the last 8 columns (V = 1) of the P rows at `a`; K in chunks of kDepth.
template <int P, int V>
void RowsTimesColumns(const float* a, int64_t k_total, const float* panel, float* c, int64_t n, const Epilogue& e) {
  for (int64_t k0 = 0; k0 < k_total; k0 += kDepth) {
    const int64_t kc = std::min(kDepth, k_total - k0);
    RowBlock<P, V>(a + k0, k_total, panel + k0 * 8 * V, kc, c, n, k0 == 0, k0 + kc == k_total, e);
  }
}

// All columns of the P rows at `a`: the packed weights hold N / 16 panels (K, 16), then for N = 16m + 8 one
// panel (K, 8).
template <int P>
void RowsTimesPanel(const float* a, int64_t k_total, const float* bp, float* c, int64_t n, const float* scale,
                    const float* shift, const float* residual, bool relu) {
  const auto at = [=](int64_t j) { return Epilogue{scale + j, shift + j, residual ? residual + j : nullptr, n, relu}; };
  int64_t j = 0;
  for (; j + kCols <= n; j += kCols) RowsTimesColumns<P, 2>(a, k_total, bp + j * k_total, c + j, n, at(j));
  if (j < n) RowsTimesColumns<P, 1>(a, k_total, bp + j * k_total, c + j, n, at(j));
}

// The P rows at `a` (stride k) as act(a * scale + shift) into `out` (stride k): the prologue, applied once
// per 6 rows and read from L1 by every column block.
template <int P>
void StageRows(const float* a, int64_t k, const float* scale, const float* shift, bool relu, float* out) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256i tail = resnext_jax::TailMask8(k);
  for (int p = 0; p < P; ++p) {
    const float* src = a + p * k;
    float* dst = out + p * k;
    for (int64_t t = 0; t < k; t += 8) {
      const bool full = t + 8 <= k;
      __m256 v = _mm256_fmadd_ps(resnext_jax::LoadOrTail(src + t, full, tail),
                                 resnext_jax::LoadOrTail(scale + t, full, tail),
                                 resnext_jax::LoadOrTail(shift + t, full, tail));
      if (relu) v = _mm256_max_ps(zero, v);  // zero first: a NaN in v is kept, as XLA keeps it
      if (full) _mm256_storeu_ps(dst + t, v);
      else _mm256_maskstore_ps(dst + t, tail, v);
    }
  }
}

template <int P>
void RowItem(const float* a, int64_t k, const float* bp, float* c, int64_t n, const float* scale, const float* shift,
             const float* residual, bool relu, const float* a_scale, const float* a_shift, bool a_relu) {
  if (a_scale) {
    thread_local std::vector<float> staged;
    if (staged.size() < static_cast<size_t>(kRows * k)) staged.resize(static_cast<size_t>(kRows * k));
    StageRows<P>(a, k, a_scale, a_shift, a_relu, staged.data());
    a = staged.data();
  }
  RowsTimesPanel<P>(a, k, bp, c, n, scale, shift, residual, relu);
}

ffi::Error MatmulAffine(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> residual,
                        ffi::Buffer<ffi::F32> a_scale, ffi::Buffer<ffi::F32> a_shift, ffi::ResultBuffer<ffi::F32> y,
                        int64_t relu, int64_t with_residual, int64_t prologue, int64_t prologue_relu) {
  const auto ad = a.dimensions(), bd = b.dimensions(), yd = y->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("matmul_affine: a, b and y of rank 2");
  const int64_t m = ad[0], k = ad[1], n = bd[1];
  if (bd[0] != k || n % 8 || yd[0] != m || yd[1] != n || scale.element_count() != n ||
      shift.element_count() != n || (with_residual && residual.element_count() != m * n) ||
      (prologue && (a_scale.element_count() != k || a_shift.element_count() != k)))
    return ffi::Error::InvalidArgument(
        "matmul_affine: a (M, K), b (K, N) with N a multiple of 8, scale and shift (N), residual (M, N), "
        "a_scale and a_shift (K), y (M, N)");
  if (m == 0 || n == 0) return ffi::Error::Success();
  // Packed weights, (N / 16, K, 16) (then (K, 8) for N = 16m + 8): kept per calling thread (concurrent calls run on different threads) so
  // that a step does not map fresh pages for them on every call.
  thread_local std::vector<float> packed;
  if (packed.size() < static_cast<size_t>(k * n)) packed.resize(static_cast<size_t>(k * n));
  float* bp = packed.data();
  const float* bsrc = b.typed_data();
  resnext_jax::RunInParallel(pool, (n + kCols - 1) / kCols, [=](int64_t block) {
    const int64_t j = block * kCols, cols = std::min(kCols, n - j);  // 16, or 8 for the last of N = 16m + 8
    for (int64_t kk = 0; kk < k; ++kk) std::memcpy(bp + j * k + kk * cols, bsrc + kk * n + j, cols * sizeof(float));
  });
  const float *ap = a.typed_data(), *sp = scale.typed_data(), *hp = shift.typed_data();
  const float* rp = with_residual ? residual.typed_data() : nullptr;
  float* out = y->typed_data();
  const bool act = relu != 0, a_act = prologue_relu != 0;
  const float* as = prologue ? a_scale.typed_data() : nullptr;
  const float* ah = prologue ? a_shift.typed_data() : nullptr;
  // Work items of 1 to 8 blocks of 6 rows: at least ~64 items, so that ResNeXt-50's last stage (392 rows, 66
  // blocks) splits evenly between two threads (items of 4 blocks split it 9 : 8, 10.0-10.5 ms against
  // 9.2-9.7 per 1.64-GFLOP matmul), and runs of contiguous rows where there are many, whose next block's
  // rows are prefetched while one block runs.
  const int64_t blocks = (m + kRows - 1) / kRows, per_item = std::clamp<int64_t>(blocks / 64, 1, 8);
  resnext_jax::RunInParallel(pool, (blocks + per_item - 1) / per_item, [=](int64_t item) {
    const int64_t end = std::min(m, (item + 1) * per_item * kRows);
    for (int64_t i = item * per_item * kRows; i < end; i += kRows) {
      const float* ai = ap + i * k;
      for (const float *next = ai + kRows * k, *stop = ap + std::min(end, i + 2 * kRows) * k; next < stop; next += 16)
        _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T1);
      float* ci = out + i * n;
      const float* ri = rp ? rp + i * n : nullptr;
      switch (std::min<int64_t>(kRows, end - i)) {
        case 6: RowItem<6>(ai, k, bp, ci, n, sp, hp, ri, act, as, ah, a_act); break;
        case 5: RowItem<5>(ai, k, bp, ci, n, sp, hp, ri, act, as, ah, a_act); break;
        case 4: RowItem<4>(ai, k, bp, ci, n, sp, hp, ri, act, as, ah, a_act); break;
        case 3: RowItem<3>(ai, k, bp, ci, n, sp, hp, ri, act, as, ah, a_act); break;
        case 2: RowItem<2>(ai, k, bp, ci, n, sp, hp, ri, act, as, ah, a_act); break;
        default: RowItem<1>(ai, k, bp, ci, n, sp, hp, ri, act, as, ah, a_act); break;
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextJaxMatmulAffine, MatmulAffine,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("with_residual")
                                  .Attr<int64_t>("prologue")
                                  .Attr<int64_t>("prologue_relu"));
