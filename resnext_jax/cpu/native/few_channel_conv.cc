// Forward of a dense conv with few input channels, channels last, float32, on an input padded beforehand:
//   y[n, oy, ox, o] = sum over i, j, c of x[n, oy * sh + i, ox * sw + j, c] * w[i, j, c, o],
// x (N, Hp, Wp, C), w (kh, kw, C, O), y (N, (Hp - kh) / sh + 1, (Wp - kw) / sw + 1, O), O a multiple of 16.
// The ResNet stem's 7x7/2 conv on 3 channels and RegNet's 3x3/2 one (`native.few_channel_conv` pads and
// calls it). Called from JAX through the XLA FFI (resnext_jax/cpu/build.py builds and registers it).
//
// Why a kernel: XLA:CPU ran ResNeXt-50's stem conv at about 80 GFLOP/s (24 ms of the ~470 ms inference step
// at batch 8 on the 2-core AMD EPYC, docs/benchmarks-history.md, eleventh session), its 3 input channels too few for
// its convolution's vector code. Here, for one kernel row i, the kw * C inputs an output pixel reads are
// contiguous in memory, so the conv is a matmul with K = kh * kw * C whose rows are read in place: register
// blocks of 6 output pixels x 16 output channels (12 AVX2 accumulators), the weights repacked per 16 output
// channels so that a block's 147 x 16 floats (stem) stay in L1. 8-lane AVX2 code in both builds.
//
// Deterministic: each output row is one work item, summed in a fixed order.
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;  // output channels per register block (two 8-lane vectors)
constexpr int kPixels = 6;      // output pixels per register block

// y[p, 0:16] = sum over i < kh, t < kwc of x[i * row + p * step + t] * w[(i * kwc + t) * 16 + 0:16] for the
// P <= 6 pixels p of one block. Accumulators are named, not an array, so that GCC keeps them in registers.
template <int P>
inline void PixelBlock(const float* x, int64_t row, int64_t step, const float* w, int64_t kh, int64_t kwc,
                       int64_t o, float* y) {
  static_assert(P >= 1 && P <= kPixels);
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t i = 0; i < kh; ++i) {
    const float* xr = x + i * row;
    const float* wr = w + i * kwc * kLanes;
    for (int64_t t = 0; t < kwc; ++t) {
      const __m256 w0 = _mm256_loadu_ps(wr + t * kLanes), w1 = _mm256_loadu_ps(wr + t * kLanes + 8);
      __m256 b = _mm256_broadcast_ss(xr + t);
      c00 = _mm256_fmadd_ps(b, w0, c00);
      c01 = _mm256_fmadd_ps(b, w1, c01);
      if constexpr (P > 1) {
        b = _mm256_broadcast_ss(xr + step + t);
        c10 = _mm256_fmadd_ps(b, w0, c10);
        c11 = _mm256_fmadd_ps(b, w1, c11);
      }
      if constexpr (P > 2) {
        b = _mm256_broadcast_ss(xr + 2 * step + t);
        c20 = _mm256_fmadd_ps(b, w0, c20);
        c21 = _mm256_fmadd_ps(b, w1, c21);
      }
      if constexpr (P > 3) {
        b = _mm256_broadcast_ss(xr + 3 * step + t);
        c30 = _mm256_fmadd_ps(b, w0, c30);
        c31 = _mm256_fmadd_ps(b, w1, c31);
      }
      if constexpr (P > 4) {
        b = _mm256_broadcast_ss(xr + 4 * step + t);
        c40 = _mm256_fmadd_ps(b, w0, c40);
        c41 = _mm256_fmadd_ps(b, w1, c41);
      }
      if constexpr (P > 5) {
        b = _mm256_broadcast_ss(xr + 5 * step + t);
        c50 = _mm256_fmadd_ps(b, w0, c50);
        c51 = _mm256_fmadd_ps(b, w1, c51);
      }
    }
  }
  _mm256_storeu_ps(y, c00);
  _mm256_storeu_ps(y + 8, c01);
  if constexpr (P > 1) _mm256_storeu_ps(y + o, c10), _mm256_storeu_ps(y + o + 8, c11);
  if constexpr (P > 2) _mm256_storeu_ps(y + 2 * o, c20), _mm256_storeu_ps(y + 2 * o + 8, c21);
  if constexpr (P > 3) _mm256_storeu_ps(y + 3 * o, c30), _mm256_storeu_ps(y + 3 * o + 8, c31);
  if constexpr (P > 4) _mm256_storeu_ps(y + 4 * o, c40), _mm256_storeu_ps(y + 4 * o + 8, c41);
  if constexpr (P > 5) _mm256_storeu_ps(y + 5 * o, c50), _mm256_storeu_ps(y + 5 * o + 8, c51);
}

ffi::Error FewChannelConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("few_channel_conv: x, w and y of rank 4");
  const int64_t n = xd[0], hp = xd[1], wp = xd[2], c = xd[3], kh = wd[0], kw = wd[1], o = wd[3];
  const int64_t ho = yd[1], wo = yd[2];
  if (sh < 1 || sw < 1 || wd[2] != c || o % kLanes || yd[0] != n || yd[3] != o || kh > hp || kw > wp ||
      ho != (hp - kh) / sh + 1 || wo != (wp - kw) / sw + 1)
    return ffi::Error::InvalidArgument(
        "few_channel_conv: x (N, Hp, Wp, C), w (kh, kw, C, O) with O a multiple of 16, y (N, (Hp - kh) / sh + 1, "
        "(Wp - kw) / sw + 1, O), positive strides");
  const int64_t kwc = kw * c, taps = kh * kwc, blocks = o / kLanes;
  // Weights repacked per block of 16 output channels: (O / 16, kh * kw * C, 16).
  std::vector<float> packed(static_cast<size_t>(taps * o));
  const float* wsrc = w.typed_data();
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t k = 0; k < taps; ++k)
      for (int64_t l = 0; l < kLanes; ++l) packed[(b * taps + k) * kLanes + l] = wsrc[k * o + b * kLanes + l];
  const float *xp = x.typed_data(), *wpk = packed.data();
  float* out = y->typed_data();
  const int64_t row = wp * c, step = sw * c;
  resnext_jax::RunInParallel(pool, n * ho, [=](int64_t item) {
    const int64_t image = item / ho, oy = item % ho;
    const float* xrow = xp + (image * hp + oy * sh) * row;
    float* yrow = out + item * wo * o;
    for (int64_t b = 0; b < blocks; ++b) {
      const float* wb = wpk + b * taps * kLanes;
      float* yb = yrow + b * kLanes;
      int64_t ox = 0;
      for (; ox + kPixels <= wo; ox += kPixels)
        PixelBlock<kPixels>(xrow + ox * step, row, step, wb, kh, kwc, o, yb + ox * o);
      const float* xt = xrow + ox * step;
      float* yt = yb + ox * o;
      switch (wo - ox) {
        case 5: PixelBlock<5>(xt, row, step, wb, kh, kwc, o, yt); break;
        case 4: PixelBlock<4>(xt, row, step, wb, kh, kwc, o, yt); break;
        case 3: PixelBlock<3>(xt, row, step, wb, kh, kwc, o, yt); break;
        case 2: PixelBlock<2>(xt, row, step, wb, kh, kwc, o, yt); break;
        case 1: PixelBlock<1>(xt, row, step, wb, kh, kwc, o, yt); break;
        default: break;
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextJaxFewChannelConv, FewChannelConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw"));
