/* CPU per-chunk top-k selection with the reference tie rule, in time linear in the chunk size.
 *
 * While the EF update streams a chunk's rows it also records the largest |v| key of every segment
 * (a run of `seg` elements inside one row). With G >= k segments, the k-th largest segment
 * maximum t is a lower bound on the chunk's k-th largest key: the k segments with the largest
 * maxima hold at least k keys >= t. So every selected element has key >= t, and only segments
 * whose maximum reaches t need to be scanned. The scan appends the candidates (key >= t) in
 * ascending local index without branches; with G ~ 2k a 4096-element chunk typically yields
 * ~90 candidates for k = 64. The exact k-th best candidate by (key, -index) then comes from
 * nth_element over the candidates only, and a last in-order pass keeps the candidates at or above
 * it: exactly k, already in ascending local index (no sort).
 *
 * Keys are the IEEE bits of |v| (order preserving for non-negative floats, -0 == +0), so a larger
 * composite (key << 32 | ~index) is a better candidate: larger |v| first, then the lower index.
 */
#ifndef DISTRAIN_CPU_TOPK_H
#define DISTRAIN_CPU_TOPK_H

#include <algorithm>
#include <functional>
#include <stdint.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "sparseloco_common.h"

#ifndef DL_THR_BITS
#define DL_THR_BITS 16
#endif
namespace dlcpu {

/* Segmentation of one chunk shape (cr rows of w elements, k kept). */
struct ChunkPlan {
  int64_t w = 0, n = 0, k = 0;
  int64_t seg = 1;  // elements per segment (the last one of a row may be shorter)
  int64_t spr = 0;  // segments per row
  int64_t G = 0;    // segments per chunk (cr * spr), always >= k
};

inline ChunkPlan plan_chunk(int64_t cr, int64_t w, int64_t k) {
  ChunkPlan p;
  p.w = w;
  p.n = cr * w;
  p.k = k;
  // About 2k segments: the k-th largest of ~2k maxima sits near the median of the segment
  // maxima, which keeps both the candidate count and the segments scanned small.
  int64_t seg = std::max<int64_t>(1, std::min<int64_t>(w, p.n / (2 * k)));
  for (;;) {
    const int64_t spr = (w + seg - 1) / seg;
    if (cr * spr >= k || seg == 1) {
      p.seg = seg;
      p.spr = spr;
      p.G = cr * spr;
      break;
    }
    seg = std::max<int64_t>(1, seg / 2);
  }
  return p;
}

/* Largest key of p[0..n). */
inline uint32_t max_key(const float* __restrict p, int64_t n) {
  uint32_t m = 0;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, dl::abs_key(p[j]));
  return m;
}

/* Number of v[0..n) >= x (keys < 2^31, so a signed compare is exact; vectorises). */
inline int64_t count_at_least(const uint32_t* __restrict v, int64_t n, uint32_t x) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += (int32_t)v[i] >= (int32_t)x ? 1 : 0;
  return c;
}

/* A lower bound t on the k-th largest of v[0..n) (n >= k) with count(v >= t) >= k: the exact
 * k-th largest rounded down to its top `bits` bits, found by a branch-free descent over those
 * bits (each step one vectorised count), which is far cheaper than a selection with
 * data-dependent branches. */
inline uint32_t kth_bound(const uint32_t* v, int64_t n, int64_t k, int bits) {
  uint32_t t = 0;
  for (int b = 30; b > 30 - bits; --b) {
    const uint32_t x = t | (1u << b);
    if (count_at_least(v, n, x) >= k) t = x;
  }
  return t;
}

/* The exact k-th largest of v[0..n), given lo <= it <= hi: the same descent, started below the
 * leading bits that lo and hi share. */
inline uint32_t kth_at_least(const uint32_t* v, int64_t n, int64_t k, uint32_t lo, uint32_t hi) {
  if (lo == hi) return lo;
  const int first = 31 - __builtin_clz(lo ^ hi);  // highest bit where lo and hi differ
  uint32_t t = lo & ~((2u << first) - 1u);         // their common prefix, zeros below
  for (int b = first; b >= 0; --b) {
    const uint32_t x = t | (1u << b);
    if (count_at_least(v, n, x) >= k) t = x;
  }
  return t;
}

/* Per-thread buffers of one selection (sized for the largest chunk; reused for every chunk). */
struct SelectScratch {
  uint32_t* key;   // n: candidate keys
  uint32_t* idx;   // n: candidate local indices
  float* cval;     // n
  int64_t* coff;   // n
};

/* Bit q set when |p[q]| has key >= t, for q < 32. */
inline uint32_t mask32_at_least(const float* p, uint32_t t) {
#if defined(__SSE2__)
  const __m128i abs_mask = _mm_set1_epi32(0x7fffffff);
  const __m128i below = _mm_set1_epi32((int32_t)t - 1);  // keys < 2^31: signed compare is exact
  uint32_t mask = 0;
  for (int q = 0; q < 8; ++q) {
    const __m128i v = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 4 * q)), abs_mask);
    mask |= (uint32_t)_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(v, below))) << (4 * q);
  }
  return mask;
#else
  uint32_t mask = 0;
  for (int q = 0; q < 32; ++q) mask |= (dl::abs_key(p[q]) >= t ? 1u : 0u) << q;
  return mask;
#endif
}

/* Append the elements of row[lo, hi) with key >= t (ascending index) to the candidates. */
inline int64_t scan_segment(const float* row, int64_t lo, int64_t hi, uint32_t t, int64_t lbase,
                            int64_t obase, SelectScratch& s, int64_t m) {
  int64_t j = lo;
  for (; j + 32 <= hi; j += 32) {
    for (uint32_t mask = mask32_at_least(row + j, t); mask != 0; mask &= mask - 1) {
      const int64_t q = j + __builtin_ctz(mask);
      s.key[m] = dl::abs_key(row[q]);
      s.idx[m] = (uint32_t)(lbase + q);
      s.cval[m] = row[q];
      s.coff[m] = obase + q;
      ++m;
    }
  }
  for (; j < hi; ++j) {
    const uint32_t key = dl::abs_key(row[j]);
    if (key < t) continue;
    s.key[m] = key;
    s.idx[m] = (uint32_t)(lbase + j);
    s.cval[m] = row[j];
    s.coff[m] = obase + j;
    ++m;
  }
  return m;
}

/* Select the chunk whose row r starts at base + r * stride (its segment maxima in segmax[r*spr +
 * s]). Writes, in ascending local index, the k local indices, values and offsets (r * stride +
 * column, relative to base). */
inline void select_chunk(const float* base, int64_t stride, int64_t cr, const ChunkPlan& p,
                         const uint32_t* segmax, SelectScratch& s, uint32_t* out_idx,
                         float* out_val, int64_t* out_off) {
  const int64_t k = p.k;
  // 12 bits: exponent and 4 mantissa bits, within 1/16 of the exact k-th largest maximum.
  const uint32_t t = kth_bound(segmax, p.G, k, DL_THR_BITS);
  int64_t m = 0;
  for (int64_t r = 0; r < cr; ++r) {
    const float* row = base + r * stride;
    const uint32_t* sm = segmax + r * p.spr;
    for (int64_t g = 0; g < p.spr; ++g) {
      if (sm[g] < t) continue;
      const int64_t lo = g * p.seg;
      m = scan_segment(row, lo, std::min(p.w, lo + p.seg), t, r * p.w, r * stride, s, m);
    }
  }
  // m >= k here (see the header comment).
  if (m == k) {
    std::copy(s.idx, s.idx + k, out_idx);
    std::copy(s.cval, s.cval + k, out_val);
    std::copy(s.coff, s.coff + k, out_off);
    return;
  }
  // The exact k-th largest key T: every key > T is kept, and of the keys == T the lowest indices
  // (they come first) until k are kept. t <= T <= the largest key, so T shares their common
  // leading bits and the descent only resolves the bits below.
  uint32_t top = 0;
  for (int64_t i = 0; i < p.G; ++i) top = std::max(top, segmax[i]);
  const uint32_t T = kth_at_least(s.key, m, k, t, top);
  int64_t ties = k - count_at_least(s.key, m, T + 1);  // keys == T that are kept
  int64_t j = 0;
  for (int64_t i = 0; i < m && j < k; ++i) {
    const uint32_t key = s.key[i];
    if (key < T || (key == T && ties-- <= 0)) continue;
    out_idx[j] = s.idx[i];
    out_val[j] = s.cval[i];
    out_off[j] = s.coff[i];
    ++j;
  }
}

}  // namespace dlcpu

#endif  // DISTRAIN_CPU_TOPK_H
