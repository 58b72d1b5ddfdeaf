// Kernel gradient of a stride-1, unpadded dense conv with few input channels, channels last, float32:
//   dw[p, q, i, o] = sum over n, y, x of xs[n, y + p, x + q, i] * dy[n, y, x, o],
// xs (N, H, W, C), dy (N, H - th + 1, W - tw + 1, O), dw (th, tw, C, O), O a multiple of 32. The ResNet stem's
// 7x7/2 conv on 3 channels becomes one of these after space-to-depth (4 x 4 taps of 12 channels;
// `models.layers._kernel_grad_space_to_depth`). Called from JAX through the XLA FFI
// (resnext_jax/cpu/build.py builds and registers it).
//
// Why a kernel: as XLA ops that gradient is 16 strided slices of a 12-channel tensor and 16 thin matmuls,
// ~80 ms of a ResNeXt-50 train step at batch 8 on the 2-core AMD EPYC (docs/benchmarks-history.md, tenth session).
// Here each output row's taps are read in place: register blocks of 2 input channels x 32 output channels
// (8 AVX2 accumulators), the row of dy reused from L1 for every tap. 8-lane AVX2 code in both builds.
//
// Deterministic: the output rows are cut into items by the shape alone; each item sums into its own float32
// copy of dw, and the copies are added in double in item order (`SumInWaves`).
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// dw_block[i, o0 + 8v + l] += sum over the row's outputs x of xs[x + q, i0 + i] * dy[x, o0 + 8v + l], for
// input channels i < I (2 or 1) and 32 output channels: 4 * I accumulators, named rather than an array, which
// GCC 12 kept on the stack (a store per FMA, 2.7x slower).
template <int I>
inline void RowBlock(const float* xrow, const float* dyrow, int64_t wo, int64_t c, int64_t o, float* dw_block) {
  static_assert(I == 1 || I == 2);
  float* d1 = dw_block + (I - 1) * o;  // the second row (aliases the first for I == 1, which leaves it alone)
  __m256 a0 = _mm256_loadu_ps(dw_block), a1 = _mm256_loadu_ps(dw_block + 8), a2 = _mm256_loadu_ps(dw_block + 16),
         a3 = _mm256_loadu_ps(dw_block + 24);
  __m256 b0 = _mm256_loadu_ps(d1), b1 = _mm256_loadu_ps(d1 + 8), b2 = _mm256_loadu_ps(d1 + 16),
         b3 = _mm256_loadu_ps(d1 + 24);
  for (int64_t x = 0; x < wo; ++x) {
    const float* g = dyrow + x * o;
    const __m256 g0 = _mm256_loadu_ps(g), g1 = _mm256_loadu_ps(g + 8), g2 = _mm256_loadu_ps(g + 16),
                 g3 = _mm256_loadu_ps(g + 24);
    const __m256 u = _mm256_broadcast_ss(xrow + x * c);
    a0 = _mm256_fmadd_ps(u, g0, a0);
    a1 = _mm256_fmadd_ps(u, g1, a1);
    a2 = _mm256_fmadd_ps(u, g2, a2);
    a3 = _mm256_fmadd_ps(u, g3, a3);
    if constexpr (I == 2) {
      const __m256 v = _mm256_broadcast_ss(xrow + x * c + 1);
      b0 = _mm256_fmadd_ps(v, g0, b0);
      b1 = _mm256_fmadd_ps(v, g1, b1);
      b2 = _mm256_fmadd_ps(v, g2, b2);
      b3 = _mm256_fmadd_ps(v, g3, b3);
    }
  }
  _mm256_storeu_ps(dw_block, a0);
  _mm256_storeu_ps(dw_block + 8, a1);
  _mm256_storeu_ps(dw_block + 16, a2);
  _mm256_storeu_ps(dw_block + 24, a3);
  if constexpr (I == 2) {
    _mm256_storeu_ps(d1, b0);
    _mm256_storeu_ps(d1 + 8, b1);
    _mm256_storeu_ps(d1 + 16, b2);
    _mm256_storeu_ps(d1 + 24, b3);
  }
}

ffi::Error FewChannelKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> dy,
                                ffi::ResultBuffer<ffi::F32> dw) {
  const auto xd = xs.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("few_channel_kernel_grad: xs, dy and dw of rank 4");
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3], ho = yd[1], wo = yd[2], o = yd[3];
  const int64_t th = wd[0], tw = wd[1];
  if (yd[0] != n || wd[2] != c || wd[3] != o || o % 32 || ho != h - th + 1 || wo != w - tw + 1)
    return ffi::Error::InvalidArgument(
        "few_channel_kernel_grad: xs (N, H, W, C), dy (N, H - th + 1, W - tw + 1, O), dw (th, tw, C, O), "
        "O a multiple of 32");
  const int64_t size = th * tw * c * o, rows = n * ho;
  float* out = dw->typed_data();
  // Items of 16 output rows: float32 sums of 16 * W' terms per item.
  const int64_t rows_per_item = 16, items = (rows + rows_per_item - 1) / rows_per_item;
  const float *xp = xs.typed_data(), *gp = dy.typed_data();
  std::vector<double> total;
  resnext_jax::SumInWaves(pool, items, size, [=](int64_t item, float* mine) {
    for (int64_t row = item * rows_per_item; row < std::min(rows, (item + 1) * rows_per_item); ++row) {
      const int64_t image = row / ho, y = row % ho;
      const float* dyrow = gp + (image * ho + y) * wo * o;
      for (int64_t p = 0; p < th; ++p) {
        for (int64_t q = 0; q < tw; ++q) {
          const float* xrow = xp + ((image * h + y + p) * w + q) * c;
          float* tap = mine + (p * tw + q) * c * o;
          for (int64_t ob = 0; ob < o; ob += 32) {
            int64_t i = 0;
            for (; i + 2 <= c; i += 2) RowBlock<2>(xrow + i, dyrow + ob, wo, c, o, tap + i * o + ob);
            if (i < c) RowBlock<1>(xrow + i, dyrow + ob, wo, c, o, tap + i * o + ob);
          }
        }
      }
    }
  }, total);
  for (int64_t k = 0; k < size; ++k) out[k] = static_cast<float>(total[k]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextJaxFewChannelKernelGrad, FewChannelKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
