// Gradient of a max pool (channels last, float32, padding that never wins): each output's gradient goes to
// the first maximum of its window in row-major order, as torch's MaxPool2d and XLA's select-and-scatter
// (`>=` keeps the earlier element) send it. Called from JAX through the XLA FFI (resnext_jax/cpu/build.py
// builds and registers it).
//
// Why a kernel: XLA:CPU lowers the select-and-scatter of ResNet's 3x3/2 stem pool to index iotas, a concatenate
// and a scatter, ~35 ms of a ResNeXt-50 train step at batch 8 on the 2-core AMD EPYC (docs/benchmarks-history.md,
// tenth session); this is one pass over the window values. 8-lane AVX2 code in both builds: memory-bound.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 16;  // channels per work item: one 64-byte line (with C a multiple of 16)

ffi::Error MaxPoolGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                       ffi::ResultBuffer<ffi::F32> dx, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                       int64_t pw) {
  const auto xd = x.dimensions(), yd = dy.dimensions();
  if (xd.size() != 4 || yd.size() != 4 || xd[0] != yd[0] || xd[3] != yd[3] || xd[3] % 8)
    return ffi::Error::InvalidArgument("max_pool_grad: x (N, H, W, C) and dy (N, H', W', C), C a multiple of 8");
  if (kh < 1 || kw < 1 || kh * kw > 64 || sh < 1 || sw < 1 || ph < 0 || pw < 0)
    return ffi::Error::InvalidArgument("max_pool_grad: 1 to 64 window taps, positive strides, padding >= 0");
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3], ho = yd[1], wo = yd[2];
  if (ho != (h + 2 * ph - kh) / sh + 1 || wo != (w + 2 * pw - kw) / sw + 1)
    return ffi::Error::InvalidArgument("max_pool_grad: dy's height and width do not match the pool's");
  const float *xp = x.typed_data(), *gp = dy.typed_data();
  float* out = dx->typed_data();
  const int64_t blocks = (c + kBlock - 1) / kBlock;
  resnext_jax::RunInParallel(pool, n * blocks, [=](int64_t item) {
    const int64_t image = item / blocks, first = item % blocks * kBlock, last = std::min(c, first + kBlock);
    const float* xi = xp + image * h * w * c;
    const float* gi = gp + image * ho * wo * c;
    float* di = out + image * h * w * c;
    for (int64_t p = 0; p < h * w; ++p) std::memset(di + p * c + first, 0, (last - first) * sizeof(float));
    const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < ho; ++i) {
      for (int64_t j = 0; j < wo; ++j) {
        int64_t at[64];  // the window's in-bounds taps: pixel offsets, in row-major order
        int taps = 0;
        for (int64_t a = 0; a < kh; ++a) {
          const int64_t r = i * sh - ph + a;
          if (r < 0 || r >= h) continue;
          for (int64_t b = 0; b < kw; ++b) {
            const int64_t col = j * sw - pw + b;
            if (col >= 0 && col < w) at[taps++] = (r * w + col) * c;
          }
        }
        for (int64_t ch = first; ch < last; ch += 8) {
          __m256 best = minus_inf, which = _mm256_set1_ps(-1.0f);
          for (int t = 0; t < taps; ++t) {
            const __m256 v = _mm256_loadu_ps(xi + at[t] + ch);
            // Strictly greater, so the first maximum stays; a NaN beats every number and the first NaN stays,
            // so that a NaN the forward pool passed on gets its gradient too.
            const __m256 nan_over_number = _mm256_andnot_ps(_mm256_cmp_ps(best, best, _CMP_UNORD_Q),
                                                            _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            const __m256 greater = _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), nan_over_number);
            best = _mm256_blendv_ps(best, v, greater);
            which = _mm256_blendv_ps(which, _mm256_set1_ps(static_cast<float>(t)), greater);
          }
          const __m256 g = _mm256_loadu_ps(gi + (i * wo + j) * c + ch);
          for (int t = 0; t < taps; ++t) {
            const __m256 mine = _mm256_cmp_ps(which, _mm256_set1_ps(static_cast<float>(t)), _CMP_EQ_OQ);
            float* d = di + at[t] + ch;
            _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), _mm256_and_ps(g, mine)));
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextJaxMaxPoolGrad, MaxPoolGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));
