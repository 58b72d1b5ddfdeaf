// Grouped 2-D convolution forward for XLA:CPU, called from JAX through the XLA FFI
// (resnext_jax/ops/native.py builds and registers it).
//
// Layouts are JAX's: input NHWC (N, H, W, C), kernel HWIO in Flax's `feature_group_count` layout
// (KH, KW, C / G, O), output NHWC (N, Ho, Wo, O), float32. Supported: as many output as input channels
// per group (`cg`), C a multiple of 16, and `cg` one of `RowFor`'s widths (ResNeXt's 4-32, RegNet's 8, 16,
// 48, 64); resnext_jax/ops/native.py's GROUP_WIDTHS lists the same.
//
// Each output pixel's channels are computed 16 at a time (one AVX-512 vector) for 8 neighbouring
// pixels at once. For a vector of output channels, the input value each lane needs for input channel
// `c` of its group is gathered with one permute of the 16 input channels at the same position (groups
// narrower than 16) or broadcast from memory (groups of 16 or more), then multiplied by the kernel row
// (a contiguous vector of the HWIO kernel). No FLOP is spent on zeros, unlike a block-diagonal dense conv.
// Output rows are shared out between the calling thread and XLA's intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t n, h, w, c, kh, kw, cg, sh, sw, ph, pw, ho, wo;
};

constexpr int kPixels = 8;  // output pixels per register block

// One output row; `CG` (channels per group) is a compile-time constant so that every inner loop has a
// constant trip count and the accumulators stay in registers. CG < 16: one permute per input channel
// gathers each lane's input; CG >= 16: a whole vector of outputs shares one group, so a broadcast does.
template <int CG>
void ConvRow(const float* x, const float* k, float* y, const Shape& s, int64_t row) {
  const int64_t n = row / s.ho, ho = row % s.ho, o = s.c, blocks = o / 16;
  __m512i index[CG < 16 ? CG : 1];
  if constexpr (CG < 16) {
    for (int c = 0; c < CG; ++c) {
      alignas(64) int32_t lanes[16];
      for (int l = 0; l < 16; ++l) lanes[l] = (l / CG) * CG + c;
      index[c] = _mm512_load_si512(lanes);
    }
  }
  float* y_row = y + (n * s.ho + ho) * s.wo * o;
  // Output-channel blocks outermost: a block's kernel slice (kh * kw * CG vectors) stays in L1 across the row.
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t group_start = (b * 16) / CG * CG;  // first input channel of this vector's group
    for (int64_t wo0 = 0; wo0 < s.wo; wo0 += kPixels) {
      __m512 acc[kPixels];
#pragma GCC unroll 8
      for (int p = 0; p < kPixels; ++p) acc[p] = _mm512_setzero_ps();
      for (int64_t i = 0; i < s.kh; ++i) {
        const int64_t hi = ho * s.sh + i - s.ph;
        if (hi < 0 || hi >= s.h) continue;
        const float* x_row = x + (n * s.h + hi) * s.w * s.c;
        for (int64_t j = 0; j < s.kw; ++j) {
          const float* k_tap = k + (i * s.kw + j) * CG * o + b * 16;
          // Pixels past the row's end or on the padding read channel 0 of column 0, masked to zero.
          __mmask16 inside[kPixels];
          const float* x_at[kPixels];
#pragma GCC unroll 8
          for (int p = 0; p < kPixels; ++p) {
            const int64_t wi = (wo0 + p) * s.sw + j - s.pw;
            const bool ok = wo0 + p < s.wo && wi >= 0 && wi < s.w;
            inside[p] = ok ? 0xFFFF : 0;
            x_at[p] = x_row + (ok ? wi : 0) * s.c;
          }
          if constexpr (CG < 16) {
            __m512 xv[kPixels];
#pragma GCC unroll 8
            for (int p = 0; p < kPixels; ++p) xv[p] = _mm512_maskz_loadu_ps(inside[p], x_at[p] + b * 16);
#pragma GCC unroll 16
            for (int c = 0; c < CG; ++c) {
              const __m512 kv = _mm512_loadu_ps(k_tap + c * o);
#pragma GCC unroll 8
              for (int p = 0; p < kPixels; ++p)
                acc[p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(index[c], xv[p]), kv, acc[p]);
            }
          } else {
            for (int c = 0; c < CG; ++c) {
              const __m512 kv = _mm512_loadu_ps(k_tap + c * o);
#pragma GCC unroll 8
              for (int p = 0; p < kPixels; ++p)
                acc[p] = _mm512_mask3_fmadd_ps(_mm512_set1_ps(x_at[p][group_start + c]), kv, acc[p], inside[p]);
            }
          }
        }
      }
      const int64_t pixels = std::min<int64_t>(kPixels, s.wo - wo0);
      for (int64_t p = 0; p < pixels; ++p) _mm512_storeu_ps(y_row + (wo0 + p) * o + b * 16, acc[p]);
    }
  }
}

using RowFn = void (*)(const float*, const float*, float*, const Shape&, int64_t);

RowFn RowFor(int64_t cg) {
  switch (cg) {
    case 1: return ConvRow<1>;
    case 2: return ConvRow<2>;
    case 4: return ConvRow<4>;
    case 8: return ConvRow<8>;
    case 16: return ConvRow<16>;
    case 32: return ConvRow<32>;
    case 48: return ConvRow<48>;
    case 64: return ConvRow<64>;
    default: return nullptr;
  }
}

// Rows handed out one at a time; tasks that start after the work is gone return at once, and the
// caller only waits for rows in progress, so a busy pool cannot stall it.
struct Work {
  const float* x;
  const float* k;
  float* y;
  Shape s;
  RowFn row_fn;
  int64_t rows;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  void Run() {
    for (int64_t row; (row = next.fetch_add(1)) < rows;) {
      row_fn(x, k, y, s, row);
      done.fetch_add(1);
    }
  }
};

ffi::Error GroupedConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                              ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  const auto xd = x.dimensions(), kd = kernel.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("grouped_conv_forward: rank-4 NHWC input, HWIO kernel and output");
  Shape s{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[2], sh, sw, ph, pw, yd[1], yd[2]};
  const RowFn row_fn = RowFor(s.cg);
  if (s.c % 16 || kd[3] != s.c || yd[3] != s.c || s.c % s.cg || row_fn == nullptr)
    return ffi::Error::InvalidArgument("grouped_conv_forward: unsupported channels/groups");
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->k = kernel.typed_data();
  work->y = y->typed_data();
  work->s = s;
  work->row_fn = row_fn;
  work->rows = s.n * s.ho;
  // The calling thread works too: one helper fewer than the pool has threads (it may be one of them).
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, work->rows - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load() < work->rows) std::this_thread::yield();
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
                                  .Attr<int64_t>("pw"));
