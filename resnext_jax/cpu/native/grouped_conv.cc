// Grouped (and dense) 2-D convolution for XLA:CPU, forward and kernel gradient, called from JAX through the
// XLA FFI (resnext_jax/cpu/build.py builds and registers them).
//
// Layouts are JAX's: input NHWC (N, H, W, C), kernel HWIO in Flax's `feature_group_count` layout
// (KH, KW, C / G, O), output NHWC (N, Ho, Wo, O), float32. Supported: as many output as input channels
// per group (`cg`), and `cg` 1, 2 or 4 with C a multiple of 16, or a multiple of 8 (dense convs included:
// cg == C); resnext_jax/cpu/kernels.py's `supports` says the same.
//
// Forward (also the input gradient: the conv of dy, dilated by the stride, with the kernel flipped and
// transposed within groups, which the forward does while packing the kernel). Output channels are computed
// in vectors for a block of neighbouring pixels at once. Groups narrower than 8 (and 8 where C is a
// multiple of 16): the input value each of 16 lanes needs for input channel `c` of its group is gathered
// with one permute of the 16 input channels at the same position. Groups of a multiple of 8 or 16 channels:
// up to 4 vectors of 8 or 16 output channels (all in one group) x 7 or 14 pixels, each pixel's input
// broadcast from memory, the kernel packed so that it is read in order. Either is multiplied by a kernel
// row (a contiguous vector of output channels). No FLOP is spent on zeros, unlike a block-diagonal dense
// conv, nor on the zeros of a dilated input: with input dilation the pixels of a block are output columns
// of one phase, which all meet real input columns under the same kernel taps.
//
// Kernel gradient: dW[i, j, c, o] = sum over pixels of dy[o] * x[the input under tap (i, j), channel c of
// o's group]. Per vector of output channels, accumulators for 3 taps x up to 8 input channels stay in
// registers while a few rows of x and dy (in L1) stream past; each input vector is permuted (or broadcast)
// once per input channel and used for all 3 taps of a kernel row (strided wide convs: once per tap).
//
// Instruction sets: built with AVX-512F/VL (`__AVX512F__`), the vectors are 16 lanes (8 for groups of an odd
// multiple of 8 channels); built with AVX2 and FMA only (AMD Zen, older Intel), 8 lanes everywhere, with
// register blocks sized for 16 vector registers instead of 32, and the narrow groups' gather done by
// in-lane shuffles (groups of 1, 2 and 4 channels never cross a 128-bit half of an 8-channel vector).
// native.py picks the build for the CPU it runs on.
//
// Work is shared out between the calling thread and XLA's intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using resnext_jax::RunInParallel;

#if defined(__AVX512F__) && defined(__AVX512VL__)
constexpr bool kAvx512 = true;
using Mask = __mmask16;  // which lanes of a load are real input (all or none)
#else
constexpr bool kAvx512 = false;
using Mask = uint16_t;
#endif

struct Shape {
  int64_t n, h, w, c, kh, kw, cg, sh, sw, ph, pw, ho, wo;
  int64_t dh = 1, dw = 1;  // forward only: input dilation (1 + the zeros between input rows/columns)
  // At least max(cg, 16) zeros: the input of pixels on the padding, so that the broadcast kernels need no
  // masks (AVX-512 has 7 usable mask registers, and reloading them costs shuffle-port uops; AVX2 has none).
  const float* zeros = nullptr;
};

constexpr int kPixels = 8;  // forward: output pixels per register block

// Division rounding down, for negative offsets too; the common divisor 1 skips the division.
inline int64_t FloorDiv(int64_t a, int64_t b) {
  return b == 1 ? a : a / b - (a % b != 0 && (a < 0) != (b < 0));
}
inline int64_t FloorMod(int64_t a, int64_t b) { return b == 1 ? 0 : a - FloorDiv(a, b) * b; }

// Vectors of output channels: 16 lanes (AVX-512) for groups of a multiple of 16 channels (and the permute
// kernels of narrower groups); 8 lanes (AVX-512VL on 256 bits, half the FMA throughput) for groups of an
// odd multiple of 8 channels (RegNet's 24, 56, 120, ...), whose 16-lane vectors would straddle two groups.
#if defined(__AVX512F__) && defined(__AVX512VL__)
struct V16 {
  using T = __m512;
  static constexpr int kLanes = 16;
  static T Zero() { return _mm512_setzero_ps(); }
  static T Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T Bcast(float x) { return _mm512_set1_ps(x); }
  static T Fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T Add(T a, T b) { return _mm512_add_ps(a, b); }
};
#endif
struct V8 {
  using T = __m256;
  static constexpr int kLanes = 8;
  static T Zero() { return _mm256_setzero_ps(); }
  static T Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T Bcast(float x) { return _mm256_set1_ps(x); }
  static T Fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T Add(T a, T b) { return _mm256_add_ps(a, b); }
};

// Calls f(std::integral_constant<int, C>()) for C = 0, ..., N - 1: constant channel indices for the
// shuffles' immediates.
template <typename F, int... Cs>
inline __attribute__((always_inline)) void StaticForEach(F&& f, std::integer_sequence<int, Cs...>) {
  (f(std::integral_constant<int, Cs>()), ...);
}
template <int N, typename F>
inline __attribute__((always_inline)) void StaticFor(F&& f) {
  StaticForEach(f, std::make_integer_sequence<int, N>());
}

// Calls f(std::integral_constant<int, Q>(), t0) for the row's blocks of P pixels (Q = P), then once for the
// last wo % P pixels (Q = wo % P, if any), so that every block size is a compile-time constant.
template <int P, typename F>
inline __attribute__((always_inline)) void ForEachPixelBlock(int64_t wo, F&& f) {
  int64_t t0 = 0;
  for (; t0 + P <= wo; t0 += P) f(std::integral_constant<int, P>(), t0);
  StaticFor<P>([&](auto q) {
    if constexpr (q() > 0)
      if (q() == wo - t0) f(q, t0);
  });
}

#if defined(__AVX512F__) && defined(__AVX512VL__)
using VWide = V16;  // the widest vector

// Per input channel `c` of a group of CG (< 16) channels: lane l takes channel c of lane l's group.
template <int CG>
void GroupIndices(__m512i* index) {
  for (int c = 0; c < CG; ++c) {
    alignas(64) int32_t lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = (l / CG) * CG + c;
    index[c] = _mm512_load_si512(lanes);
  }
}
#else
using VWide = V8;

// AVX2: lane l of 8 takes channel C of lane l's group of CG (1, 2 or 4) channels; groups that narrow stay
// within a 128-bit half, so one in-lane shuffle (`vpermilps` with an immediate) does it.
template <int CG, int C>
inline __attribute__((always_inline)) __m256 Spread(__m256 x) {
  static_assert(CG == 1 || CG == 2 || CG == 4);
  if constexpr (CG == 1) return x;
  else if constexpr (CG == 2) return _mm256_permute_ps(x, C | C << 2 | (2 + C) << 4 | (2 + C) << 6);
  else return _mm256_permute_ps(x, C * 0x55);
}
#endif

// Calls `tap(t, inside, x_at)` for every kernel tap t = i * kw + j that reaches real input for at least one
// of the P output pixels phase + (t0 + p) * dw (p < P, t0 + p < count) of output row `ho` of image `n`:
// x_at[p] points at that pixel's input (channel 0), or at column 0 of the input row where `inside[p]` is 0
// (past the row's end or on the padding). With input dilation (dw > 1, then sw == 1) the pixels are output
// columns of one phase (column mod dw), so a tap reaches real input columns for all of them or for none.
template <int P, typename Tap>
inline __attribute__((always_inline)) void ForEachTap(const float* x, const Shape& s, int64_t n, int64_t ho,
                                                       int64_t phase, int64_t t0, int64_t count, Tap&& tap) {
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t m = ho * s.sh + i - s.ph;  // row of the dilated input
    if (m < 0 || FloorMod(m, s.dh) || FloorDiv(m, s.dh) >= s.h) continue;
    const float* x_row = x + (n * s.h + FloorDiv(m, s.dh)) * s.w * s.c;
    for (int64_t j = 0; j < s.kw; ++j) {
      const int64_t d = phase + j - s.pw;
      if (FloorMod(d, s.dw)) continue;  // this phase meets only the dilation's zeros under tap j
      const int64_t base = FloorDiv(d, s.dw);
      Mask inside[P], any = 0;
      const float* x_at[P];
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const int64_t wi = (t0 + p) * s.sw + base;
        const bool ok = t0 + p < count && wi >= 0 && wi < s.w;
        inside[p] = ok ? 0xFFFF : 0;
        any |= inside[p];
        x_at[p] = x_row + (ok ? wi : 0) * s.c;
      }
      if (any) tap(i * s.kw + j, inside, x_at);
    }
  }
}

// Output channels [c0, c1) of one output row of the forward, in blocks of `OB` vectors and `P` pixels:
// `block` is called per (channel block b, P pixels) with the pixels' accumulators, zeroed, and fills them.
template <typename Vec, int OB, int P, typename Block>
inline __attribute__((always_inline)) void ForEachBlock(float* y, const Shape& s, int64_t row, int64_t c0,
                                                         int64_t c1, Block&& block) {
  const int64_t n = row / s.ho, ho = row % s.ho, o = s.c;
  float* y_row = y + (n * s.ho + ho) * s.wo * o;
  // Output-channel blocks outermost: a block's kernel slice stays in cache across the row.
  constexpr int kBlock = OB * Vec::kLanes;
  for (int64_t b = c0 / kBlock; b < c1 / kBlock; ++b) {
    for (int64_t phase = 0; phase < std::min(s.dw, s.wo); ++phase) {
      const int64_t count = (s.wo - phase + s.dw - 1) / s.dw;  // output columns phase, phase + dw, ...
      for (int64_t t0 = 0; t0 < count; t0 += P) {
        typename Vec::T acc[P][OB];
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
          for (int v = 0; v < OB; ++v) acc[p][v] = Vec::Zero();
        block(n, ho, b, phase, t0, count, acc);
        // Constant trip counts here too: a loop to a runtime bound would keep `acc` in memory throughout.
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
          for (int v = 0; v < OB; ++v)
            if (t0 + p < count) Vec::Store(y_row + (phase + (t0 + p) * s.dw) * o + (b * OB + v) * Vec::kLanes, acc[p][v]);
      }
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512VL__)
// Forward row, groups narrower than 16 channels (`CG`, a compile-time constant so that the inner loops have
// constant trip counts and the accumulators stay in registers): a vector of 16 output channels spans
// 16 / CG groups, and one permute per input channel gathers each lane's input from the 16 input channels
// at the same position.
template <int CG>
void ConvRow(const float* x, const float* k, float* y, const Shape& s, int64_t row, int64_t c0, int64_t c1) {
  __m512i index[CG];
  GroupIndices<CG>(index);
  ForEachBlock<V16, 1, kPixels>(y, s, row, c0, c1, [&](int64_t n, int64_t ho, int64_t b, int64_t phase, int64_t t0,
                                          int64_t count, __m512 (&acc)[kPixels][1]) {
    ForEachTap<kPixels>(x, s, n, ho, phase, t0, count,
                        [&](int64_t tap, const Mask* inside, const float* const* x_at) {
      const float* k_tap = k + tap * CG * s.c + b * 16;
      __m512 xv[kPixels];
#pragma GCC unroll 8
      for (int p = 0; p < kPixels; ++p) xv[p] = _mm512_maskz_loadu_ps(inside[p], x_at[p] + b * 16);
#pragma GCC unroll 16
      for (int c = 0; c < CG; ++c) {
        const __m512 kv = _mm512_loadu_ps(k_tap + c * s.c);
#pragma GCC unroll 8
        for (int p = 0; p < kPixels; ++p)
          acc[p][0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(index[c], xv[p]), kv, acc[p][0]);
      }
    });
  });
}
#else
// Forward row, groups of 1, 2 or 4 channels, AVX2: a vector of 8 output channels spans 8 / CG groups; the
// CG kernel vectors of a tap stay in registers while each pixel's 8 input channels are loaded once and
// spread by one in-lane shuffle per input channel (8 accumulators + CG kernel vectors + 2 fit 16 registers).
// Blocks clear of the padding take a path of their own with named accumulators: through the generic taps
// GCC 12 stored the `acc` array to the stack and reloaded it around every tap; 56x56x128 with 4-channel
// groups at batch 8 went from 6.3 to 4.4 ms on the AMD EPYC (docs/benchmarks-history.md, eleventh session).
template <int CG>
void ConvRow(const float* x, const float* k, float* y, const Shape& s, int64_t row, int64_t c0, int64_t c1) {
  ForEachBlock<V8, 1, kPixels>(y, s, row, c0, c1, [&](int64_t n, int64_t ho, int64_t b, int64_t phase, int64_t t0,
                                         int64_t count, __m256 (&acc)[kPixels][1]) {
    // Interior blocks without input dilation: every tap's 8 inputs are in the row, a fixed stride apart.
    if (s.dw == 1 && s.dh == 1 && t0 + kPixels <= count && t0 * s.sw - s.pw >= 0 &&
        (t0 + kPixels - 1) * s.sw + s.kw - 1 - s.pw < s.w) {
      const int64_t step = s.sw * s.c;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      for (int64_t i = 0; i < s.kh; ++i) {
        const int64_t m = ho * s.sh + i - s.ph;
        if (m < 0 || m >= s.h) continue;
        const float* x_row = x + ((n * s.h + m) * s.w + t0 * s.sw - s.pw) * s.c + b * 8;
        const float* k_row = k + i * s.kw * CG * s.c + b * 8;
        for (int64_t j = 0; j < s.kw; ++j) {
          const float* k_tap = k_row + j * CG * s.c;
          const float* xa = x_row + j * s.c;
          __m256 kv[CG];
#pragma GCC unroll 4
          for (int c = 0; c < CG; ++c) kv[c] = _mm256_loadu_ps(k_tap + c * s.c);
#define RESNEXT_PIXEL(P, A)                                                                            \
  {                                                                                                     \
    const __m256 xv = _mm256_loadu_ps(xa + P * step);                                                   \
    StaticFor<CG>([&](auto c) { A = _mm256_fmadd_ps(Spread<CG, c()>(xv), kv[c()], A); });             \
  }
          RESNEXT_PIXEL(0, a0) RESNEXT_PIXEL(1, a1) RESNEXT_PIXEL(2, a2) RESNEXT_PIXEL(3, a3)
          RESNEXT_PIXEL(4, a4) RESNEXT_PIXEL(5, a5) RESNEXT_PIXEL(6, a6) RESNEXT_PIXEL(7, a7)
#undef RESNEXT_PIXEL
        }
      }
      acc[0][0] = a0, acc[1][0] = a1, acc[2][0] = a2, acc[3][0] = a3;
      acc[4][0] = a4, acc[5][0] = a5, acc[6][0] = a6, acc[7][0] = a7;
      return;
    }
    ForEachTap<kPixels>(x, s, n, ho, phase, t0, count,
                        [&](int64_t tap, const Mask* inside, const float* const* x_at) {
      const float* k_tap = k + tap * CG * s.c + b * 8;
      __m256 kv[CG];
#pragma GCC unroll 4
      for (int c = 0; c < CG; ++c) kv[c] = _mm256_loadu_ps(k_tap + c * s.c);
#pragma GCC unroll 8
      for (int p = 0; p < kPixels; ++p) {
        const __m256 xv = _mm256_loadu_ps(inside[p] ? x_at[p] + b * 8 : s.zeros);
        StaticFor<CG>([&](auto c) { acc[p][0] = _mm256_fmadd_ps(Spread<CG, c()>(xv), kv[c()], acc[p][0]); });
      }
    });
  });
}
#endif

// Forward row, groups of a multiple of 8 or 16 channels (`Vec`'s lanes; dense convs included): a block of
// OB vectors (all in one group) x P pixels; per input channel and tap, OB kernel vectors are loaded and each
// pixel's input is broadcast from memory into OB FMAs.
template <typename Vec, int OB, int P, bool kPerTap = false>
void ConvRowWide(const float* x, const float* k, float* y, const Shape& s, int64_t row, int64_t c0,
                 int64_t c1) {
  constexpr int kBlock = OB * Vec::kLanes;
  ForEachBlock<Vec, OB, P>(y, s, row, c0, c1, [&](int64_t n, int64_t ho, int64_t b, int64_t phase, int64_t t0,
                                          int64_t count, typename Vec::T (&acc)[P][OB]) {
    const int64_t group_start = (b * kBlock) / s.cg * s.cg;  // first input channel of the block's group
    if constexpr (!kAvx512 && OB == 1 && P == 7 && !kPerTap) {
      // AVX2, blocks clear of the padding, no input dilation: named accumulators, pixels a fixed stride apart.
      if (s.dw == 1 && s.dh == 1 && t0 + P <= count && t0 * s.sw - s.pw >= 0 &&
          (t0 + P - 1) * s.sw + s.kw - 1 - s.pw < s.w) {
        const int64_t step = s.sw * s.c;
        using T = typename Vec::T;
        T a0 = Vec::Zero(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0;
        for (int64_t i = 0; i < s.kh; ++i) {
          const int64_t m = ho * s.sh + i - s.ph;
          if (m < 0 || m >= s.h) continue;
          const float* x_row = x + ((n * s.h + m) * s.w + t0 * s.sw - s.pw) * s.c + group_start;
          for (int64_t j = 0; j < s.kw; ++j) {
            const float* k_tap = k + ((b * s.kh * s.kw + i * s.kw + j) * s.cg) * kBlock;
            const float* xa = x_row + j * s.c;
            for (int64_t c = 0; c < s.cg; ++c) {
              const T kv = Vec::Load(k_tap + c * kBlock);
              a0 = Vec::Fma(Vec::Bcast(xa[c]), kv, a0);
              a1 = Vec::Fma(Vec::Bcast(xa[step + c]), kv, a1);
              a2 = Vec::Fma(Vec::Bcast(xa[2 * step + c]), kv, a2);
              a3 = Vec::Fma(Vec::Bcast(xa[3 * step + c]), kv, a3);
              a4 = Vec::Fma(Vec::Bcast(xa[4 * step + c]), kv, a4);
              a5 = Vec::Fma(Vec::Bcast(xa[5 * step + c]), kv, a5);
              a6 = Vec::Fma(Vec::Bcast(xa[6 * step + c]), kv, a6);
            }
          }
        }
        acc[0][0] = a0, acc[1][0] = a1, acc[2][0] = a2, acc[3][0] = a3, acc[4][0] = a4, acc[5][0] = a5;
        acc[6][0] = a6;
        return;
      }
    }
    ForEachTap<P>(x, s, n, ho, phase, t0, count,
                  [&](int64_t tap, const Mask* inside, const float* const* x_at) {
      // The kernel comes packed (see GroupedConvForward): (block b, tap, input channel, the block's outputs).
      const float* k_tap = k + ((b * s.kh * s.kw + tap) * s.cg) * kBlock;
      const float* x_in[P];
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) x_in[p] = inside[p] ? x_at[p] + group_start : s.zeros;
      // kPerTap (AVX2, groups over 32 channels; 1 x 7 blocks leave room for 7 more registers): each tap sums
      // into its own accumulators, added to the total after the tap, so that a wide group's long reduction
      // (9 x 264 terms in regnet_y_128gf) is 9 sums of 264 instead of one of 2376. One sum measured 1.12e-4
      // off torchvision's logits there (the parity bound is 1e-4).
      typename Vec::T part[P][OB];
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int v = 0; v < OB; ++v) part[p][v] = kPerTap ? Vec::Zero() : acc[p][v];
      for (int64_t c = 0; c < s.cg; ++c) {
        typename Vec::T kv[OB];
#pragma GCC unroll 4
        for (int v = 0; v < OB; ++v) kv[v] = Vec::Load(k_tap + c * kBlock + v * Vec::kLanes);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          const typename Vec::T xb = Vec::Bcast(x_in[p][c]);
#pragma GCC unroll 4
          for (int v = 0; v < OB; ++v) part[p][v] = Vec::Fma(xb, kv[v], part[p][v]);
        }
      }
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int v = 0; v < OB; ++v) acc[p][v] = kPerTap ? Vec::Add(acc[p][v], part[p][v]) : part[p][v];
    });
  });
}

// AVX2 (compiled in both builds, used by the AVX2 one), no input dilation: P pixels x V vectors of 8 output
// channels of one group (V = 2, P <= 6 for groups of a multiple of 16 channels; V = 3, P <= 4 for RegNet's
// 24), at most 12 named accumulators kept over all taps: V kernel loads and P broadcasts per V * P FMAs, where
// 1 x 7 blocks need 8 loads per 7. Padding is read from `s.zeros`. The kernel comes packed per 8V output
// channels (block, tap, input channel, 8V).
template <int V, int P>
inline void WidePixels(const float* x, const float* k_block, const Shape& s, int64_t n, int64_t ho, int64_t t0,
                       int64_t group_start, float* y) {
  static_assert((V == 2 && P >= 1 && P <= 6) || (V == 3 && P >= 1 && P <= 4));
  constexpr int L = 8 * V;
  const __m256 z = _mm256_setzero_ps();
  __m256 a00 = z, a01 = z, a02 = z, a10 = z, a11 = z, a12 = z, a20 = z, a21 = z, a22 = z, a30 = z, a31 = z,
         a32 = z, a40 = z, a41 = z, a50 = z, a51 = z;
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t m = ho * s.sh + i - s.ph;
    if (m < 0 || m >= s.h) continue;
    const float* x_row = x + (n * s.h + m) * s.w * s.c + group_start;
    for (int64_t j = 0; j < s.kw; ++j) {
      const float* xp[P];
      for (int p = 0; p < P; ++p) {
        const int64_t wi = (t0 + p) * s.sw + j - s.pw;
        xp[p] = wi >= 0 && wi < s.w ? x_row + wi * s.c : s.zeros;
      }
      const float* kt = k_block + (i * s.kw + j) * s.cg * L;
      for (int64_t c = 0; c < s.cg; ++c) {
        const __m256 k0 = _mm256_loadu_ps(kt + c * L), k1 = _mm256_loadu_ps(kt + c * L + 8);
        const __m256 k2 = V > 2 ? _mm256_loadu_ps(kt + c * L + 16) : z;
        __m256 b;
#define RESNEXT_PIXEL(p)                                                \
  if constexpr (P > p) {                                                \
    b = _mm256_broadcast_ss(xp[p] + c);                                 \
    a##p##0 = _mm256_fmadd_ps(b, k0, a##p##0);                          \
    a##p##1 = _mm256_fmadd_ps(b, k1, a##p##1);                          \
    if constexpr (V > 2 && p < 4) a##p##2 = _mm256_fmadd_ps(b, k2, a##p##2); \
  }
        RESNEXT_PIXEL(0) RESNEXT_PIXEL(1) RESNEXT_PIXEL(2) RESNEXT_PIXEL(3)
#undef RESNEXT_PIXEL
        if constexpr (P > 4) {
          b = _mm256_broadcast_ss(xp[4] + c);
          a40 = _mm256_fmadd_ps(b, k0, a40);
          a41 = _mm256_fmadd_ps(b, k1, a41);
        }
        if constexpr (P > 5) {
          b = _mm256_broadcast_ss(xp[5] + c);
          a50 = _mm256_fmadd_ps(b, k0, a50);
          a51 = _mm256_fmadd_ps(b, k1, a51);
        }
      }
    }
  }
  const int64_t o = s.c;
  const __m256 out[6][3] = {{a00, a01, a02}, {a10, a11, a12}, {a20, a21, a22}, {a30, a31, a32}, {a40, a41, z},
                            {a50, a51, z}};
#pragma GCC unroll 6
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(y + p * o + 8 * v, out[p][v]);
}

template <int V>
void ConvRowWideV(const float* x, const float* k, float* y, const Shape& s, int64_t row, int64_t c0, int64_t c1) {
  constexpr int L = 8 * V, P = V == 2 ? 6 : 4;
  if (s.dw != 1 || s.dh != 1) return ConvRowWide<V8, V, P>(x, k, y, s, row, c0, c1);  // the same packing
  const int64_t n = row / s.ho, ho = row % s.ho, taps = s.kh * s.kw;
  float* y_row = y + row * s.wo * s.c;
  for (int64_t b = c0 / L; b < c1 / L; ++b) {
    const int64_t group_start = (b * L) / s.cg * s.cg;
    const float* kb = k + b * taps * s.cg * L;
    float* yb = y_row + b * L;
    ForEachPixelBlock<P>(s.wo, [&](auto q, int64_t t0) {
      WidePixels<V, q()>(x, kb, s, n, ho, t0, group_start, yb + t0 * s.c);
    });
  }
}

// AVX2, 8-channel groups, 3-wide kernel rows, stride 1, no input dilation: each input value is broadcast
// once per kernel row and multiplied into the 3 output pixels it reaches (one kernel vector per tap), where
// the 1 x 7 blocks broadcast it once per tap: P + 2 broadcasts per 3P FMAs instead of 7 per 7 (on the AMD
// EPYC the broadcasts, not the FMAs, bound those blocks: 28x28x256 at batch 8 went from 3.3 to 1.9 ms with
// P = 10, 2.35 ms with P = 8). The kernel comes packed per 8 output channels (block, tap, input channel, 8).
template <int P>
inline void StationaryPixels(const float* x, const float* k_block, const Shape& s, int64_t n, int64_t ho,
                             int64_t t0, int64_t group_start, float* y) {
  static_assert(P >= 1 && P <= 10);
  __m256 a[P];
  StaticFor<P>([&](auto p) { a[p()] = _mm256_setzero_ps(); });
  const int64_t cg = s.cg;
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t m = ho * s.sh + i - s.ph;
    if (m < 0 || m >= s.h) continue;
    const float* x_row = x + (n * s.h + m) * s.w * s.c + group_start;
    const float* xp[P + 2];
    for (int q = 0; q < P + 2; ++q) {
      const int64_t wi = t0 + q - s.pw;
      xp[q] = wi >= 0 && wi < s.w ? x_row + wi * s.c : s.zeros;
    }
    const float* kt = k_block + i * 3 * cg * 8;
    for (int64_t c = 0; c < cg; ++c) {
      const __m256 k0 = _mm256_loadu_ps(kt + c * 8), k1 = _mm256_loadu_ps(kt + (cg + c) * 8),
                   k2 = _mm256_loadu_ps(kt + (2 * cg + c) * 8);
      // Input column q reaches output q under tap 0, q - 1 under tap 1 and q - 2 under tap 2.
      StaticFor<P + 2>([&](auto q) {
        const __m256 b = _mm256_broadcast_ss(xp[q()] + c);
        if constexpr (q() < P) a[q()] = _mm256_fmadd_ps(b, k0, a[q()]);
        if constexpr (q() >= 1 && q() - 1 < P) a[q() - 1] = _mm256_fmadd_ps(b, k1, a[q() - 1]);
        if constexpr (q() >= 2 && q() - 2 < P) a[q() - 2] = _mm256_fmadd_ps(b, k2, a[q() - 2]);
      });
    }
  }
  StaticFor<P>([&](auto p) { _mm256_storeu_ps(y + p() * s.c, a[p()]); });
}

void ConvRowStationary(const float* x, const float* k, float* y, const Shape& s, int64_t row, int64_t c0,
                       int64_t c1) {
  if (s.kw != 3 || s.sw != 1 || s.dw != 1 || s.dh != 1) return ConvRowWide<V8, 1, 7>(x, k, y, s, row, c0, c1);
  constexpr int P = 10;
  const int64_t n = row / s.ho, ho = row % s.ho, taps = s.kh * s.kw;
  float* y_row = y + row * s.wo * s.c;
  for (int64_t b = c0 / 8; b < c1 / 8; ++b) {
    const int64_t group_start = (b * 8) / s.cg * s.cg;
    const float* kb = k + b * taps * s.cg * 8;
    float* yb = y_row + b * 8;
    ForEachPixelBlock<P>(s.wo, [&](auto q, int64_t t0) {
      StationaryPixels<q()>(x, kb, s, n, ho, t0, group_start, yb + t0 * s.c);
    });
  }
}

#if !(defined(__AVX512F__) && defined(__AVX512VL__))
// AVX2, groups of 1, 2 or 4 channels, 3-wide kernel rows, stride 1, no input dilation: as
// `StationaryPixels`, each input vector is loaded and spread once per kernel row and input channel and
// multiplied into the 3 output pixels it reaches, instead of once per tap (the kernel vectors are read from
// L1 as FMA operands). 56x56x128 with 4-channel groups at batch 8 on the AMD EPYC: 4.4 ms by 8-pixel blocks
// of `ConvRow`, 3.8 ms stationary with 8 pixels, 2.9-3.1 ms with 12 (14: no better, more spills).
template <int CG, int P>
inline void NarrowStationaryPixels(const float* x, const float* k, const Shape& s, int64_t n, int64_t ho,
                                   int64_t t0, int64_t b, float* y) {
  __m256 a[P];
  StaticFor<P>([&](auto p) { a[p()] = _mm256_setzero_ps(); });
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t m = ho * s.sh + i - s.ph;
    if (m < 0 || m >= s.h) continue;
    const float* x_row = x + (n * s.h + m) * s.w * s.c + b * 8;
    const float* k_row = k + i * 3 * CG * s.c + b * 8;  // tap (i, j), input channel c: + (j * CG + c) * s.c
    StaticFor<P + 2>([&](auto q) {
      const int64_t wi = t0 + q() - s.pw;
      const __m256 xv = _mm256_loadu_ps(wi >= 0 && wi < s.w ? x_row + wi * s.c : s.zeros);
      StaticFor<CG>([&](auto c) {
        const __m256 v = Spread<CG, c()>(xv);
        if constexpr (q() < P) a[q()] = _mm256_fmadd_ps(v, _mm256_loadu_ps(k_row + c() * s.c), a[q()]);
        if constexpr (q() >= 1 && q() - 1 < P)
          a[q() - 1] = _mm256_fmadd_ps(v, _mm256_loadu_ps(k_row + (CG + c()) * s.c), a[q() - 1]);
        if constexpr (q() >= 2 && q() - 2 < P)
          a[q() - 2] = _mm256_fmadd_ps(v, _mm256_loadu_ps(k_row + (2 * CG + c()) * s.c), a[q() - 2]);
      });
    });
  }
  StaticFor<P>([&](auto p) { _mm256_storeu_ps(y + p() * s.c, a[p()]); });
}

template <int CG>
void ConvRowNarrowStationary(const float* x, const float* k, float* y, const Shape& s, int64_t row, int64_t c0,
                             int64_t c1) {
  if (s.kw != 3 || s.sw != 1 || s.dw != 1 || s.dh != 1) return ConvRow<CG>(x, k, y, s, row, c0, c1);
  constexpr int P = 12;
  const int64_t n = row / s.ho, ho = row % s.ho;
  float* y_row = y + row * s.wo * s.c;
  for (int64_t b = c0 / 8; b < c1 / 8; ++b) {
    float* yb = y_row + b * 8;
    ForEachPixelBlock<P>(s.wo, [&](auto q, int64_t t0) {
      NarrowStationaryPixels<CG, q()>(x, k, s, n, ho, t0, b, yb + t0 * s.c);
    });
  }
}
#endif

// The kernel gradient of one vector of output channels (block `b`) over output rows [r0, r1) (row =
// n * ho + output row), added to `acc_buf` ((kh * kw) x cg x lanes floats: tap, input channel, lane).
// Accumulators for kTaps taps of one kernel row x kInputs input channels stay in registers while the rows
// stream past; the
// input is walked column by column (one stride phase at a time), so that each input vector is permuted
// (CG < 16, a compile-time constant; 16 lanes) or broadcast (CG == 0: groups of any multiple of `Vec`'s
// lanes, `s.cg`) once per input channel and used for every tap of the kernel row that reaches it. AVX2:
// 8 lanes, in-lane shuffles, and 4 input channels at a time for wide groups (3 x 4 accumulators + 3 dy
// vectors + a broadcast fill its 16 registers).
template <int CG, typename Vec = VWide>
void KernelGradRows(const float* x, const float* dy, float* acc_buf, const Shape& s, int64_t b, int64_t r0,
                    int64_t r1) {
  static_assert(CG < 16 && (CG == 0 || Vec::kLanes == VWide::kLanes));
  constexpr int kTaps = 3, kInputs = CG ? CG : (kAvx512 ? 8 : 4), L = Vec::kLanes;
  using T = typename Vec::T;
  const int64_t o = s.c, cg = CG ? CG : s.cg;
#if defined(__AVX512F__) && defined(__AVX512VL__)
  __m512i index[CG ? CG : 1];
  if constexpr (CG != 0) GroupIndices<CG>(index);
#endif
  const int64_t x_offset = CG ? b * L : (b * L) / cg * cg;  // x vector (CG < 16) or group start
  for (int64_t i = 0; i < s.kh; ++i) {
    for (int64_t j0 = 0; j0 < s.kw; j0 += kTaps) {
      const int taps = static_cast<int>(std::min<int64_t>(kTaps, s.kw - j0));
      for (int64_t c0 = 0; c0 < cg; c0 += kInputs) {
        T acc[kTaps][kInputs];
        float* acc_at = acc_buf + ((i * s.kw + j0) * cg + c0) * L;
#pragma GCC unroll 3
        for (int t = 0; t < kTaps; ++t)
#pragma GCC unroll 16
          for (int c = 0; c < kInputs; ++c)
            acc[t][c] = t < taps ? Vec::Load(acc_at + (t * cg + c) * L) : Vec::Zero();
        // (image, output row) stepped along rather than divided out per row: at 7x7 outputs a row is only
        // 7 columns of work, and two integer divisions were a measurable part of it.
        for (int64_t row = r0, n = r0 / s.ho, ho = r0 % s.ho; row < r1; ++row, ho = ho + 1 == s.ho ? 0 : ho + 1,
                     n += ho == 0) {
          const int64_t hi = ho * s.sh + i - s.ph;
          if (hi < 0 || hi >= s.h) continue;
          const float* x_row = x + (n * s.h + hi) * s.w * s.c + x_offset + (CG ? 0 : c0);
          const float* dy_row = dy + (n * s.ho + ho) * s.wo * o + b * L;
          if (CG == 0 && s.sw > 1) {
            // Wide groups, strided: walk the output columns instead (a broadcast is not worth sharing
            // between taps, and by input columns most taps would meet no output column).
            for (int64_t wo = 0; wo < s.wo; ++wo) {
              const T dyv = Vec::Load(dy_row + wo * o);
              const float* x_at[kTaps];
#pragma GCC unroll 3
              for (int t = 0; t < kTaps; ++t) {
                const int64_t wi = wo * s.sw + j0 + t - s.pw;
                x_at[t] = t < taps && wi >= 0 && wi < s.w ? x_row + wi * s.c : s.zeros;
              }
#pragma GCC unroll 8
              for (int c = 0; c < kInputs; ++c)
#pragma GCC unroll 3
                for (int t = 0; t < kTaps; ++t)
                  acc[t][c] = Vec::Fma(Vec::Bcast(x_at[t][c]), dyv, acc[t][c]);
            }
            continue;
          }
          for (int64_t phase = 0; phase < std::min(s.sw, s.w); ++phase) {
            // Input columns phase + sw * q meet output column q + offset[t] under tap j0 + t, if that is
            // an integer (`reaches`) inside the output row.
            int64_t offset[kTaps];
            bool reaches[kTaps];
            for (int t = 0; t < kTaps; ++t) {
              const int64_t d = phase + s.pw - (j0 + t);
              reaches[t] = t < taps && FloorMod(d, s.sw) == 0;
              offset[t] = FloorDiv(d, s.sw);
            }
            for (int64_t q = 0, wi = phase; wi < s.w; ++q, wi += s.sw) {
              T dyv[kTaps];
#pragma GCC unroll 3
              for (int t = 0; t < kTaps; ++t) {
                const int64_t wo = q + offset[t];
                dyv[t] = Vec::Load(reaches[t] && wo >= 0 && wo < s.wo ? dy_row + wo * o : s.zeros);
              }
              const float* x_at = x_row + wi * s.c;
              if constexpr (CG != 0) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
                const __m512 xv = _mm512_loadu_ps(x_at);
#pragma GCC unroll 16
                for (int c = 0; c < kInputs; ++c) {
                  const __m512 xc = _mm512_permutexvar_ps(index[c], xv);
#pragma GCC unroll 3
                  for (int t = 0; t < kTaps; ++t) acc[t][c] = Vec::Fma(xc, dyv[t], acc[t][c]);
                }
#else
                const __m256 xv = _mm256_loadu_ps(x_at);
                StaticFor<kInputs>([&](auto c) {
                  const __m256 xc = Spread<CG, c()>(xv);
#pragma GCC unroll 3
                  for (int t = 0; t < kTaps; ++t) acc[t][c()] = Vec::Fma(xc, dyv[t], acc[t][c()]);
                });
#endif
              } else {
#pragma GCC unroll 8
                for (int c = 0; c < kInputs; ++c) {
                  const T xc = Vec::Bcast(x_at[c]);
#pragma GCC unroll 3
                  for (int t = 0; t < kTaps; ++t) acc[t][c] = Vec::Fma(xc, dyv[t], acc[t][c]);
                }
              }
            }
          }
        }
        // Constant trip counts: a loop to a runtime bound would keep `acc` in memory throughout.
#pragma GCC unroll 3
        for (int t = 0; t < kTaps; ++t)
#pragma GCC unroll 16
          for (int c = 0; c < kInputs; ++c)
            if (t < taps) Vec::Store(acc_at + (t * cg + c) * L, acc[t][c]);
      }
    }
  }
}

using RowFn = void (*)(const float*, const float*, float*, const Shape&, int64_t, int64_t, int64_t);
using GradFn = void (*)(const float*, const float*, float*, const Shape&, int64_t, int64_t, int64_t);

struct Kernels {
  RowFn row;
  int64_t row_channels;  // output channels per forward work item (0: all): a multiple of its vector block
  GradFn grad;
  int64_t lanes;  // output channels per kernel-gradient block
};

// The forward's register block for groups of `cg` (a multiple of `Vec`'s lanes) channels and rows of `wo`
// pixels: the widest block of up to 4 vectors that stays within a group, and pixel blocks of 7 or 14, which
// divide the rows of 224-pixel ResNets (112, 56, 28, 14, 7). A work item computes one such channel block of
// one output row where the kernel is large (see GroupedConvForward).
template <typename Vec>
Kernels WideKernelsFor(int64_t cg, int64_t wo) {
  constexpr int L = Vec::kLanes;
  const bool short_rows = wo % 14 != 0;
  const GradFn grad = KernelGradRows<0, Vec>;
  if constexpr (!kAvx512) {
    // 16 registers: 1 vector x 7 pixels. Measured alone at batch 8 (bench_conv), against 1 x 14 where
    // rows allow and 2 x 7 for groups of 16k channels: 8-channel groups at 28x28x256 8.4 -> 4.4 ms (14
    // pixel pointers spill), 56->28x256 11.7 -> 9.9 ms, 16-channel groups at 14x14x512 3.0 -> 2.6 ms,
    // 28->14x512 6.8 -> 3.1 ms, 32-channel groups at 7x7x1024 2.9 -> 2.4 ms.
    if (cg > 32) return {ConvRowWide<Vec, 1, 7, true>, L, grad, L};
    if (cg % 16 == 0) return {ConvRowWideV<2>, 16, grad, L};
    if (cg == 24) return {ConvRowWideV<3>, 24, grad, L};
    if (cg == 8) return {ConvRowStationary, 8, grad, L};
    return {ConvRowWide<Vec, 1, 7>, L, grad, L};
  }
  if (cg % (4 * L) == 0) return {ConvRowWide<Vec, 4, 7>, 4 * L, grad, L};
  if (cg % (3 * L) == 0) return {ConvRowWide<Vec, 3, 7>, 3 * L, grad, L};
  if (cg % (2 * L) == 0) return {short_rows ? ConvRowWide<Vec, 2, 7> : ConvRowWide<Vec, 2, 14>, 2 * L, grad, L};
  return {short_rows ? ConvRowWide<Vec, 1, 7> : ConvRowWide<Vec, 1, 14>, L, grad, L};
}

// The kernels for `cg` channels per group and `c` channels; {} where unsupported.
Kernels KernelsFor(int64_t cg, int64_t c, int64_t wo) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if (c % 16 == 0) {
    switch (cg) {
      case 1: return {ConvRow<1>, 0, KernelGradRows<1>, 16};
      case 2: return {ConvRow<2>, 0, KernelGradRows<2>, 16};
      case 4: return {ConvRow<4>, 0, KernelGradRows<4>, 16};
      case 8: return {ConvRow<8>, 0, KernelGradRows<8>, 16};
    }
  }
  if (cg % 16 == 0) return WideKernelsFor<V16>(cg, wo);
#else
  if (c % 8 == 0) {
    switch (cg) {
      case 1: return {ConvRowNarrowStationary<1>, 0, KernelGradRows<1>, 8};
      case 2: return {ConvRowNarrowStationary<2>, 0, KernelGradRows<2>, 8};
      case 4: return {ConvRowNarrowStationary<4>, 0, KernelGradRows<4>, 8};
    }
  }
#endif
  if (cg % 8 == 0) return WideKernelsFor<V8>(cg, wo);
  return {nullptr, 0, nullptr, 0};
}

ffi::Error GroupedConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                              ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                              int64_t dh, int64_t dw, int64_t transpose) {
  const auto xd = x.dimensions(), kd = kernel.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("grouped_conv_forward: rank-4 NHWC input, HWIO kernel and output");
  Shape s{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[2], sh, sw, ph, pw, yd[1], yd[2], dh, dw};
  const std::vector<float> zeros(std::max<int64_t>(s.cg, 16), 0.0f);
  s.zeros = zeros.data();
  if (s.cg < 1 || s.c % s.cg) return ffi::Error::InvalidArgument("grouped_conv_forward: channels % groups");
  const Kernels kernels = KernelsFor(s.cg, s.c, s.wo);
  const RowFn row_fn = kernels.row;
  if (kd[3] != s.c || yd[3] != s.c || row_fn == nullptr)
    return ffi::Error::InvalidArgument("grouped_conv_forward: unsupported channels/groups");
  if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || (dw > 1 && sw > 1))
    return ffi::Error::InvalidArgument("grouped_conv_forward: strides and dilations >= 1, not both along W");
  const float *xp = x.typed_data(), *kp = kernel.typed_data();
  float* yp = y->typed_data();
  // The kernel's element (tap t, input channel c of the group, output channel o); with `transpose`, the
  // input gradient's kernel: the given one flipped (tap taps - 1 - t) and transposed within each group.
  const int64_t taps = s.kh * s.kw, cg = s.cg, c_all = s.c;
  const float* given = kp;
  auto element = [=](int64_t t, int64_t c, int64_t o) {
    return transpose ? given[((taps - 1 - t) * cg + o % cg) * c_all + o / cg * cg + c] : given[(t * cg + c) * c_all + o];
  };
  std::vector<float> packed(kernels.row_channels || transpose ? taps * cg * c_all : 0);
  if (kernels.row_channels) {
    // Wide groups read the kernel as (channel block, tap, input channel, block's outputs): sequential
    // reads that the prefetcher follows, instead of pieces of a block C floats apart.
    const int64_t block = kernels.row_channels, blocks = s.c / block;
    float* pp = packed.data();
    RunInParallel(pool, blocks, [=](int64_t b) {
      for (int64_t t = 0; t < taps; ++t) {
        float* to = pp + (b * taps + t) * cg * block;
        if (transpose) {  // source rows (one per output) are contiguous in the input channel
          for (int64_t l = 0; l < block; ++l)
            for (int64_t c = 0; c < cg; ++c) to[c * block + l] = element(t, c, b * block + l);
        } else {
          for (int64_t c = 0; c < cg; ++c)
            std::memcpy(to + c * block, given + (t * cg + c) * c_all + b * block, block * sizeof(float));
        }
      }
    });
    kp = pp;
  } else if (transpose) {
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t c = 0; c < cg; ++c)
        for (int64_t o = 0; o < c_all; ++o) packed[(t * cg + c) * c_all + o] = element(t, c, o);
    kp = packed.data();
  }
  // Items: whole output rows, so that the input rows stay in cache across the output channels; but where
  // the kernel would not stay in L2 (over 1 MiB), one channel block of a row, channel block-major, so
  // that consecutive items share its slice of the kernel (see WideKernelsFor).
  const bool slice_major = kernels.row_channels && taps * cg * c_all * sizeof(float) > (1 << 20);
  const int64_t rows = s.n * s.ho, per_item = slice_major ? kernels.row_channels : s.c;
  RunInParallel(pool, rows * (s.c / per_item), [=](int64_t item) {
    const int64_t c0 = item / rows * per_item;
    row_fn(xp, kp, yp, s, item % rows, c0, c0 + per_item);
  });
  return ffi::Error::Success();
}

ffi::Error GroupedConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                 ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("grouped_conv_kernel_grad: rank-4 NHWC input, output and HWIO kernel");
  Shape s{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[2], sh, sw, ph, pw, yd[1], yd[2]};
  const std::vector<float> zeros(std::max<int64_t>(s.cg, 16), 0.0f);
  s.zeros = zeros.data();
  if (s.cg < 1 || s.c % s.cg) return ffi::Error::InvalidArgument("grouped_conv_kernel_grad: channels % groups");
  const Kernels kernels = KernelsFor(s.cg, s.c, s.wo);
  const GradFn grad_fn = kernels.grad;
  if (kd[3] != s.c || yd[3] != s.c || yd[0] != s.n || grad_fn == nullptr)
    return ffi::Error::InvalidArgument("grouped_conv_kernel_grad: unsupported channels/groups");
  if (sh < 1 || sw < 1) return ffi::Error::InvalidArgument("grouped_conv_kernel_grad: strides >= 1");
  const int64_t lanes = kernels.lanes, blocks = s.c / lanes, rows = s.n * s.ho, taps = s.kh * s.kw,
                block_size = taps * s.cg * lanes;
  // Rows per pass over the accumulators: about 16 KiB of dy (and its input rows) stays in L1.
  const int64_t pass_rows = std::max<int64_t>(1, 16384 / (s.wo * 64));
  // Enough items for the pool (4 per thread); more than one slice of rows per block means partial sums.
  const int64_t slices = std::min<int64_t>(rows, std::max<int64_t>(1, (4 * pool.num_threads() + blocks - 1) / blocks));
  std::vector<float> partials(slices > 1 ? slices * blocks * block_size : 0);
  const float *xp = x.typed_data(), *dyp = dy.typed_data();
  float* dkp = dk->typed_data();
  const Shape shape = s;
  RunInParallel(pool, blocks * slices, [&, xp, dyp, dkp, grad_fn, lanes](int64_t item) {
    const int64_t b = item % blocks, slice = item / blocks;
    std::vector<float> acc(block_size, 0.0f);
    const int64_t first = rows * slice / slices, last = rows * (slice + 1) / slices;
    for (int64_t r0 = first; r0 < last; r0 += pass_rows)
      grad_fn(xp, dyp, acc.data(), shape, b, r0, std::min(last, r0 + pass_rows));
    if (slices > 1) {
      std::memcpy(&partials[(slice * blocks + b) * block_size], acc.data(), block_size * sizeof(float));
    } else {
      for (int64_t t = 0; t < taps * shape.cg; ++t)  // (tap, input channel) rows of `lanes`
        std::memcpy(dkp + t * shape.c + b * lanes, &acc[t * lanes], lanes * sizeof(float));
    }
  });
  if (slices > 1) {
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t t = 0; t < taps * s.cg; ++t)
        for (int64_t l = 0; l < lanes; ++l) {
          float sum = 0.0f;
          for (int64_t slice = 0; slice < slices; ++slice) sum += partials[(slice * blocks + b) * block_size + t * lanes + l];
          dkp[t * s.c + b * lanes + l] = sum;
        }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextJaxGroupedConvForward, GroupedConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("transpose"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextJaxGroupedConvKernelGrad, GroupedConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));
