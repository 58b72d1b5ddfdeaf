// Per-channel sums for training-mode batch norm on XLA:CPU, channels last, float32:
//   sum_a[c] = sum over rows of a'[r, c],  sum_ab[c] = sum over rows of a'[r, c] * (b[r, c] - shift[c]),
// where a' = a, or with `masked`, a where mask > 0 and 0 elsewhere (a ReLU's backward from its output).
// The forward's statistics are (x, x, 0): sum x and sum x^2; the backward's are (dy, x, mean) masked by
// the block's output: sum dz and sum dz * (x - mean). Called from JAX through the XLA FFI
// (resnext_jax/cpu/build.py builds and registers it).
//
// Why a kernel: XLA:CPU's reductions over all but the channel axis ran at 6-15 GB/s in a ResNeXt-50 train
// step on the 2-core AMD EPYC, ~117 ms of its ~1.9 s (docs/benchmarks-history.md, tenth session); this is one
// streaming pass on all the pool's threads. 8-lane AVX2 code in both builds: it is memory-bound.
//
// Deterministic: the rows are cut into items by the shape alone, each item sums its (at most 64) rows in
// float32, and the items' partial sums are added in item order in double, whatever thread ran them.
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "parallel.h"
#include "tail.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error ChannelSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> sum_a,
                       ffi::ResultBuffer<ffi::F32> sum_ab, int64_t masked) {
  const auto ad = a.dimensions();
  if (ad.size() < 1) return ffi::Error::InvalidArgument("channel_sums: a needs a channel axis");
  const int64_t c = ad[ad.size() - 1], size = a.element_count();
  if (b.element_count() != size || (masked && mask.element_count() != size))
    return ffi::Error::InvalidArgument("channel_sums: a, b (and mask) of one shape");
  if (shift.element_count() != c || sum_a->element_count() != c || sum_ab->element_count() != c)
    return ffi::Error::InvalidArgument("channel_sums: shift and the results need one entry per channel");
  float *sa = sum_a->typed_data(), *sab = sum_ab->typed_data();
  if (c == 0) return ffi::Error::Success();
  const int64_t rows = size / c;
  // Items of at most 64 rows (and 128 KiB of `a`): each float32 running sum has at most 64 terms. Longer ones
  // (4096 rows of 8 channels) put an 8-device train step's parameters 1.3x the tolerance away from the
  // 1-device step's (tests/test_train_multidevice.py): E[x^2] - E[x]^2 magnifies their rounding.
  const int64_t rows_per_item = std::clamp<int64_t>(32768 / c, 1, 64);
  const int64_t items = (rows + rows_per_item - 1) / rows_per_item;
  const int64_t cv = (c + 7) / 8 * 8;  // channels rounded up to whole vectors
  const float *ap = a.typed_data(), *bp = b.typed_data(), *shp = shift.typed_data(),
              *mp = masked ? mask.typed_data() : nullptr;
  const __m256i tail = resnext_jax::TailMask8(c);
  std::vector<double> total;
  resnext_jax::SumInWaves(pool, items, 2 * cv, [=](int64_t item, float* acc_a) {
    const int64_t first = item * rows_per_item, last = std::min(rows, first + rows_per_item);
    float* acc_ab = acc_a + cv;  // zeroed; the two halves whole vectors apart
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t r = first; r < last; ++r) {
      for (int64_t ch = 0; ch < c; ch += 8) {
        const bool full = c - ch >= 8;
        const int64_t at = r * c + ch;
        auto load = [full, tail](const float* p) { return resnext_jax::LoadOrTail(p, full, tail); };
        __m256 va = load(ap + at);
        if (mp != nullptr) va = _mm256_and_ps(va, _mm256_cmp_ps(load(mp + at), zero, _CMP_GT_OQ));
        const __m256 vb = _mm256_sub_ps(load(bp + at), load(shp + ch));
        _mm256_storeu_ps(acc_a + ch, _mm256_add_ps(_mm256_loadu_ps(acc_a + ch), va));
        _mm256_storeu_ps(acc_ab + ch, _mm256_fmadd_ps(va, vb, _mm256_loadu_ps(acc_ab + ch)));
      }
    }
  }, total);
  for (int64_t ch = 0; ch < c; ++ch) {
    sa[ch] = static_cast<float>(total[ch]);
    sab[ch] = static_cast<float>(total[cv + ch]);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextJaxChannelSums, ChannelSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("masked"));
