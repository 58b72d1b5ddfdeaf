// Grouped 2-D convolution for XLA:CPU, forward and kernel gradient, called from JAX through the XLA FFI
// (resnext_jax/ops/native.py builds and registers them).
//
// Layouts are JAX's: input NHWC (N, H, W, C), kernel HWIO in Flax's `feature_group_count` layout
// (KH, KW, C / G, O), output NHWC (N, Ho, Wo, O), float32. Supported: as many output as input channels
// per group (`cg`), C a multiple of 16, and `cg` one of `KernelsFor`'s widths (ResNeXt's 4-32, RegNet's 8,
// 16, 48, 64); resnext_jax/ops/native.py's GROUP_WIDTHS lists the same.
//
// Forward (also the input gradient: the grouped conv of dy, dilated by the stride, with the kernel flipped
// and transposed within groups). Each output pixel's channels are computed 16 at a time (one AVX-512
// vector) for 8 pixels at once. For a vector of output channels, the input value each lane needs for input
// channel `c` of its group is gathered with one permute of the 16 input channels at the same position
// (groups narrower than 16) or broadcast from memory (groups of 16 or more), then multiplied by the kernel
// row (a contiguous vector of the HWIO kernel). No FLOP is spent on zeros, unlike a block-diagonal dense
// conv, nor on the zeros of a dilated input: with input dilation the 8 pixels of a block are output
// columns of one phase, which all meet real input columns under the same kernel taps.
//
// Kernel gradient: dW[i, j, c, o] = sum over pixels of dy[o] * x[the input under tap (i, j), channel c of
// o's group]. Per 16 output channels, accumulators for 3 taps x up to 8 input channels stay in registers
// while a few rows of x and dy (in L1) stream past; each input vector is permuted (or broadcast) once per
// input channel and used for all 3 taps of a kernel row.
//
// Work is shared out between the calling thread and XLA's intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t n, h, w, c, kh, kw, cg, sh, sw, ph, pw, ho, wo;
  int64_t dh = 1, dw = 1;  // forward only: input dilation (1 + the zeros between input rows/columns)
};

constexpr int kPixels = 8;  // forward: output pixels per register block

// Division rounding down, for negative offsets too; the common divisor 1 skips the division.
inline int64_t FloorDiv(int64_t a, int64_t b) {
  return b == 1 ? a : a / b - (a % b != 0 && (a < 0) != (b < 0));
}
inline int64_t FloorMod(int64_t a, int64_t b) { return b == 1 ? 0 : a - FloorDiv(a, b) * b; }

// Per input channel `c` of a group of CG (< 16) channels: lane l takes channel c of lane l's group.
template <int CG>
void GroupIndices(__m512i* index) {
  for (int c = 0; c < CG; ++c) {
    alignas(64) int32_t lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = (l / CG) * CG + c;
    index[c] = _mm512_load_si512(lanes);
  }
}

// One output row of the forward; `CG` (channels per group) is a compile-time constant so that every inner
// loop has a constant trip count and the accumulators stay in registers. CG < 16: one permute per input
// channel gathers each lane's input; CG >= 16: a whole vector of outputs shares one group, so a broadcast
// does. With input dilation (dw > 1, then sw == 1) output columns are taken one phase (column mod dw) at a
// time, so that a tap either reaches real input columns for all 8 pixels of a block or for none.
template <int CG>
void ConvRow(const float* x, const float* k, float* y, const Shape& s, int64_t row) {
  const int64_t n = row / s.ho, ho = row % s.ho, o = s.c, blocks = o / 16;
  __m512i index[CG < 16 ? CG : 1];
  if constexpr (CG < 16) GroupIndices<CG>(index);
  float* y_row = y + (n * s.ho + ho) * s.wo * o;
  // Output-channel blocks outermost: a block's kernel slice (kh * kw * CG vectors) stays in L1 across the row.
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t group_start = (b * 16) / CG * CG;  // first input channel of this vector's group
    for (int64_t phase = 0; phase < std::min(s.dw, s.wo); ++phase) {
      const int64_t count = (s.wo - phase + s.dw - 1) / s.dw;  // output columns phase, phase + dw, ...
      for (int64_t t0 = 0; t0 < count; t0 += kPixels) {
        __m512 acc[kPixels];
#pragma GCC unroll 8
        for (int p = 0; p < kPixels; ++p) acc[p] = _mm512_setzero_ps();
        for (int64_t i = 0; i < s.kh; ++i) {
          const int64_t m = ho * s.sh + i - s.ph;  // row of the dilated input
          if (m < 0 || FloorMod(m, s.dh) || FloorDiv(m, s.dh) >= s.h) continue;
          const float* x_row = x + (n * s.h + FloorDiv(m, s.dh)) * s.w * s.c;
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t d = phase + j - s.pw;
            if (FloorMod(d, s.dw)) continue;  // this phase meets only the dilation's zeros under tap j
            const int64_t base = FloorDiv(d, s.dw);
            const float* k_tap = k + (i * s.kw + j) * CG * o + b * 16;
            // Pixels past the row's end or on the padding read channel 0 of column 0, masked to zero.
            __mmask16 inside[kPixels], any = 0;
            const float* x_at[kPixels];
#pragma GCC unroll 8
            for (int p = 0; p < kPixels; ++p) {
              const int64_t wi = (t0 + p) * s.sw + base;
              const bool ok = t0 + p < count && wi >= 0 && wi < s.w;
              inside[p] = ok ? 0xFFFF : 0;
              any |= inside[p];
              x_at[p] = x_row + (ok ? wi : 0) * s.c;
            }
            if (!any) continue;
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
        const int64_t pixels = std::min<int64_t>(kPixels, count - t0);
        for (int64_t p = 0; p < pixels; ++p)
          _mm512_storeu_ps(y_row + (phase + (t0 + p) * s.dw) * o + b * 16, acc[p]);
      }
    }
  }
}

// The kernel gradient of 16 output channels (block `b`) over output rows [r0, r1) (row = n * ho + output
// row), added to `acc_buf` ((kh * kw) x CG x 16 floats: tap, input channel, lane). Accumulators for
// kTaps taps of one kernel row x kInputs input channels stay in registers while the rows stream past; the
// input is walked column by column (one stride phase at a time), so that each input vector is permuted
// (or broadcast) once per input channel and used for every tap of the kernel row that reaches it.
template <int CG>
void KernelGradRows(const float* x, const float* dy, float* acc_buf, const Shape& s, int64_t b, int64_t r0,
                    int64_t r1) {
  constexpr int kTaps = 3, kInputs = CG < 16 ? CG : 8;
  const int64_t o = s.c;
  __m512i index[CG < 16 ? CG : 1];
  if constexpr (CG < 16) GroupIndices<CG>(index);
  const int64_t x_offset = CG < 16 ? b * 16 : (b * 16) / CG * CG;  // x vector (CG < 16) or group start
  for (int64_t i = 0; i < s.kh; ++i) {
    for (int64_t j0 = 0; j0 < s.kw; j0 += kTaps) {
      const int taps = static_cast<int>(std::min<int64_t>(kTaps, s.kw - j0));
      for (int c0 = 0; c0 < CG; c0 += kInputs) {
        __m512 acc[kTaps][kInputs];
        float* acc_at = acc_buf + ((i * s.kw + j0) * CG + c0) * 16;
        for (int t = 0; t < kTaps; ++t)
          for (int c = 0; c < kInputs; ++c)
            acc[t][c] = t < taps ? _mm512_loadu_ps(acc_at + (t * CG + c) * 16) : _mm512_setzero_ps();
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t n = row / s.ho, ho = row % s.ho, hi = ho * s.sh + i - s.ph;
          if (hi < 0 || hi >= s.h) continue;
          const float* x_row = x + (n * s.h + hi) * s.w * s.c + x_offset + (CG < 16 ? 0 : c0);
          const float* dy_row = dy + (n * s.ho + ho) * s.wo * o + b * 16;
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
              __m512 dyv[kTaps];
#pragma GCC unroll 3
              for (int t = 0; t < kTaps; ++t) {
                const int64_t wo = q + offset[t];
                const bool ok = reaches[t] && wo >= 0 && wo < s.wo;
                dyv[t] = _mm512_maskz_loadu_ps(ok ? 0xFFFF : 0, dy_row + (ok ? wo : 0) * o);
              }
              const float* x_at = x_row + wi * s.c;
              if constexpr (CG < 16) {
                const __m512 xv = _mm512_loadu_ps(x_at);
#pragma GCC unroll 16
                for (int c = 0; c < kInputs; ++c) {
                  const __m512 xc = _mm512_permutexvar_ps(index[c], xv);
#pragma GCC unroll 3
                  for (int t = 0; t < kTaps; ++t) acc[t][c] = _mm512_fmadd_ps(xc, dyv[t], acc[t][c]);
                }
              } else {
#pragma GCC unroll 8
                for (int c = 0; c < kInputs; ++c) {
                  const __m512 xc = _mm512_set1_ps(x_at[c]);
#pragma GCC unroll 3
                  for (int t = 0; t < kTaps; ++t) acc[t][c] = _mm512_fmadd_ps(xc, dyv[t], acc[t][c]);
                }
              }
            }
          }
        }
        for (int t = 0; t < taps; ++t)
          for (int c = 0; c < kInputs; ++c) _mm512_storeu_ps(acc_at + (t * CG + c) * 16, acc[t][c]);
      }
    }
  }
}

using RowFn = void (*)(const float*, const float*, float*, const Shape&, int64_t);
using GradFn = void (*)(const float*, const float*, float*, const Shape&, int64_t, int64_t, int64_t);

struct Kernels {
  RowFn row;
  GradFn grad;
};

Kernels KernelsFor(int64_t cg) {
  switch (cg) {
    case 1: return {ConvRow<1>, KernelGradRows<1>};
    case 2: return {ConvRow<2>, KernelGradRows<2>};
    case 4: return {ConvRow<4>, KernelGradRows<4>};
    case 8: return {ConvRow<8>, KernelGradRows<8>};
    case 16: return {ConvRow<16>, KernelGradRows<16>};
    case 32: return {ConvRow<32>, KernelGradRows<32>};
    case 48: return {ConvRow<48>, KernelGradRows<48>};
    case 64: return {ConvRow<64>, KernelGradRows<64>};
    default: return {nullptr, nullptr};
  }
}

// Items handed out one at a time; tasks that start after the work is gone return at once, and the caller
// only waits for items in progress, so a busy pool cannot stall it.
struct Work {
  int64_t items;
  std::function<void(int64_t)> run_item;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  void Run() {
    for (int64_t item; (item = next.fetch_add(1)) < items;) {
      run_item(item);
      done.fetch_add(1);
    }
  }
};

void RunInParallel(ffi::ThreadPool& pool, int64_t items, std::function<void(int64_t)> run_item) {
  auto work = std::make_shared<Work>();
  work->items = items;
  work->run_item = std::move(run_item);
  // The calling thread works too: one helper fewer than the pool has threads (it may be one of them).
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load() < items) std::this_thread::yield();
}

ffi::Error GroupedConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                              ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                              int64_t dh, int64_t dw) {
  const auto xd = x.dimensions(), kd = kernel.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("grouped_conv_forward: rank-4 NHWC input, HWIO kernel and output");
  Shape s{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[2], sh, sw, ph, pw, yd[1], yd[2], dh, dw};
  const RowFn row_fn = KernelsFor(s.cg).row;
  if (s.c % 16 || kd[3] != s.c || yd[3] != s.c || s.c % s.cg || row_fn == nullptr)
    return ffi::Error::InvalidArgument("grouped_conv_forward: unsupported channels/groups");
  if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || (dw > 1 && sw > 1))
    return ffi::Error::InvalidArgument("grouped_conv_forward: strides and dilations >= 1, not both along W");
  const float *xp = x.typed_data(), *kp = kernel.typed_data();
  float* yp = y->typed_data();
  RunInParallel(pool, s.n * s.ho, [=](int64_t row) { row_fn(xp, kp, yp, s, row); });
  return ffi::Error::Success();
}

ffi::Error GroupedConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                 ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("grouped_conv_kernel_grad: rank-4 NHWC input, output and HWIO kernel");
  Shape s{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[2], sh, sw, ph, pw, yd[1], yd[2]};
  const GradFn grad_fn = KernelsFor(s.cg).grad;
  if (s.c % 16 || kd[3] != s.c || yd[3] != s.c || yd[0] != s.n || s.c % s.cg || grad_fn == nullptr)
    return ffi::Error::InvalidArgument("grouped_conv_kernel_grad: unsupported channels/groups");
  if (sh < 1 || sw < 1) return ffi::Error::InvalidArgument("grouped_conv_kernel_grad: strides >= 1");
  const int64_t blocks = s.c / 16, rows = s.n * s.ho, taps = s.kh * s.kw, block_size = taps * s.cg * 16;
  // Rows per pass over the accumulators: about 16 KiB of dy (and its input rows) stays in L1.
  const int64_t pass_rows = std::max<int64_t>(1, 16384 / (s.wo * 64));
  // Enough items for the pool (4 per thread); more than one slice of rows per block means partial sums.
  const int64_t slices = std::min<int64_t>(rows, std::max<int64_t>(1, (4 * pool.num_threads() + blocks - 1) / blocks));
  std::vector<float> partials(slices > 1 ? slices * blocks * block_size : 0);
  const float *xp = x.typed_data(), *dyp = dy.typed_data();
  float* dkp = dk->typed_data();
  const Shape shape = s;
  RunInParallel(pool, blocks * slices, [&, xp, dyp, dkp, grad_fn](int64_t item) {
    const int64_t b = item % blocks, slice = item / blocks;
    std::vector<float> acc(block_size, 0.0f);
    const int64_t first = rows * slice / slices, last = rows * (slice + 1) / slices;
    for (int64_t r0 = first; r0 < last; r0 += pass_rows)
      grad_fn(xp, dyp, acc.data(), shape, b, r0, std::min(last, r0 + pass_rows));
    if (slices > 1) {
      std::memcpy(&partials[(slice * blocks + b) * block_size], acc.data(), block_size * sizeof(float));
    } else {
      for (int64_t t = 0; t < taps * shape.cg; ++t)  // (tap, input channel) rows of 16 lanes
        std::memcpy(dkp + t * shape.c + b * 16, &acc[t * 16], 16 * sizeof(float));
    }
  });
  if (slices > 1) {
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t t = 0; t < taps * s.cg; ++t)
        for (int l = 0; l < 16; ++l) {
          float sum = 0.0f;
          for (int64_t slice = 0; slice < slices; ++slice) sum += partials[(slice * blocks + b) * block_size + t * 16 + l];
          dkp[t * s.c + b * 16 + l] = sum;
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
                                  .Attr<int64_t>("dw"));

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
