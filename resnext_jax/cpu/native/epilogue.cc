// Inference epilogue of a residual block for XLA:CPU: out = relu((y - mean) * scale + shift + (residual -
// rmean) * rscale + rshift), channels last, float32, per-channel vectors: a batch norm with running
// statistics (scale = gamma / sqrt(var + eps)), and the shortcut's own batch norm or the identity. The
// mean is subtracted first, as XLA's batch norm does, not folded into the shift: with a large mean that
// would cancel digits. Called from JAX through the XLA FFI
// (resnext_jax/cpu/build.py builds and registers it). AVX-512 or AVX2, as the build's flags say.
//
// Why a kernel for one memory pass: XLA:CPU fuses a block's output computation into every consumer,
// including the next block's residual add, so each block's output fusion recomputed all the earlier
// blocks of its stage from their conv outputs (stage 1's third block read four 25 MB tensors instead of
// two). A custom call's result is a buffer that later fusions read, not recompute.
#include <immintrin.h>

#include <cstdint>

#include "parallel.h"
#include "tail.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error AffineAddRelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> mean,
                         ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> residual,
                         ffi::Buffer<ffi::F32> rmean, ffi::Buffer<ffi::F32> rscale, ffi::Buffer<ffi::F32> rshift,
                         ffi::ResultBuffer<ffi::F32> out, int64_t relu) {
  const auto yd = y.dimensions();
  if (yd.size() < 1) return ffi::Error::InvalidArgument("affine_add_relu: y needs a channel axis");
  const int64_t c = yd[yd.size() - 1], size = y.element_count();
  for (const auto* v : {&mean, &scale, &shift, &rmean, &rscale, &rshift})
    if (v->element_count() != c) return ffi::Error::InvalidArgument("affine_add_relu: 6 vectors of C channels");
  if (residual.element_count() != size || out->element_count() != size)
    return ffi::Error::InvalidArgument("affine_add_relu: y, residual and out of one shape");
  if (c == 0 || size == 0) return ffi::Error::Success();
  const int64_t rows = size / c;
  const float *yp = y.typed_data(), *rp = residual.typed_data(), *mp = mean.typed_data(), *sp = scale.typed_data(),
              *bp = shift.typed_data(), *rmp = rmean.typed_data(), *rsp = rscale.typed_data(),
              *rbp = rshift.typed_data();
  float* op = out->typed_data();
  // Items of about 64 KiB of output: enough of them to balance the pool, few enough to cost nothing.
  const int64_t rows_per_item = std::max<int64_t>(1, 16384 / c), items = (rows + rows_per_item - 1) / rows_per_item;
#if defined(__AVX512F__) && defined(__AVX512VL__)
  const __m512 zero = _mm512_setzero_ps();
  resnext_jax::RunInParallel(pool, items, [=](int64_t item) {
    const int64_t first = item * rows_per_item, last = std::min(rows, first + rows_per_item);
    for (int64_t r = first; r < last; ++r) {
      for (int64_t ch = 0; ch < c; ch += 16) {
        const __mmask16 m = c - ch >= 16 ? 0xFFFF : (__mmask16)((1u << (c - ch)) - 1);
        const int64_t at = r * c + ch;
        auto load = [m](const float* p) { return _mm512_maskz_loadu_ps(m, p); };
        const __m512 t = _mm512_fmadd_ps(_mm512_sub_ps(load(yp + at), load(mp + ch)), load(sp + ch), load(bp + ch));
        const __m512 rt = _mm512_fmadd_ps(_mm512_sub_ps(load(rp + at), load(rmp + ch)), load(rsp + ch), load(rbp + ch));
        __m512 v = _mm512_add_ps(t, rt);
        if (relu) v = _mm512_max_ps(zero, v);  // zero first: a NaN in v is kept (MAXPS returns its second operand on NaN)
        _mm512_mask_storeu_ps(op + at, m, v);
      }
    }
  });
#else
  // AVX2: 8 channels at a time; the last few of a row (C not a multiple of 8) with masked loads and stores.
  const __m256 zero = _mm256_setzero_ps();
  const __m256i tail = resnext_jax::TailMask8(c);
  resnext_jax::RunInParallel(pool, items, [=](int64_t item) {
    const int64_t first = item * rows_per_item, last = std::min(rows, first + rows_per_item);
    for (int64_t r = first; r < last; ++r) {
      for (int64_t ch = 0; ch < c; ch += 8) {
        const bool full = c - ch >= 8;
        const int64_t at = r * c + ch;
        auto load = [full, tail](const float* p) { return resnext_jax::LoadOrTail(p, full, tail); };
        const __m256 t = _mm256_fmadd_ps(_mm256_sub_ps(load(yp + at), load(mp + ch)), load(sp + ch), load(bp + ch));
        const __m256 rt = _mm256_fmadd_ps(_mm256_sub_ps(load(rp + at), load(rmp + ch)), load(rsp + ch), load(rbp + ch));
        __m256 v = _mm256_add_ps(t, rt);
        if (relu) v = _mm256_max_ps(zero, v);  // zero first: a NaN in v is kept, as XLA keeps it
        if (full) _mm256_storeu_ps(op + at, v);
        else _mm256_maskstore_ps(op + at, tail, v);
      }
    }
  });
#endif
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextJaxAffineAddRelu, AffineAddRelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("relu"));
