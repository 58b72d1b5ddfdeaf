// The last channels of a row that are fewer than a vector (C not a multiple of 8), for the elementwise and
// reduction kernels' 8-lane AVX2 loops (epilogue.cc, channel_sums.cc, matmul.cc's prologue).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace resnext_jax {

// Lanes 0 .. c % 8 - 1 set: the mask of a row's last, partial vector.
inline __m256i TailMask8(int64_t c) {
  alignas(32) int32_t lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = l < c % 8 ? -1 : 0;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
}

// 8 floats at p, or (not `full`) only the lanes of `tail`, the others 0: nothing past the row is read.
inline __m256 LoadOrTail(const float* p, bool full, __m256i tail) {
  return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail);
}

}  // namespace resnext_jax
