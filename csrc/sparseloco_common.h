/* Helpers shared by the CPU and CUDA SparseLoCo kernels: geometry, bit packing, fp16 rounding and
 * the per-element quantizer formulas. Everything is __host__ __device__ so both back ends use
 * literally the same arithmetic (and therefore produce the same bits). */
#ifndef DISTRAIN_SPARSELOCO_COMMON_H
#define DISTRAIN_SPARSELOCO_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "distrain_kernels.h"

#ifdef __CUDACC__
#define DL_HD __host__ __device__ __forceinline__
#else
#define DL_HD inline
#endif

namespace dl {

constexpr int kMaxIndexBits = 25;  // every field fits a 4-byte window (bitpack.py)
constexpr int kLevels = 4;

inline const char* status_string(int32_t status) {
  switch (status) {
    case DL_OK: return "ok";
    case DL_ERR_INVALID: return "invalid argument";
    case DL_ERR_NONFINITE_DELTA: return "pseudo-gradient contains NaN or Inf";
    case DL_ERR_NONFINITE_EF: return "error-feedback buffer became NaN or Inf";
    case DL_ERR_INDEX_ORDER: return "indices within a chunk are not strictly increasing (a gap is 0)";
    case DL_ERR_INDEX: return "index out of range for its chunk";
    case DL_ERR_NO_MEMORY: return "out of memory";
    case DL_ERR_CUDA: return "CUDA error";
    default: return "unknown status";
  }
}

/* Whether the enum arguments of an entry point name a known quantizer, value dtype and index coding. */
inline bool valid_enums(int32_t quantizer, int32_t value_dtype, int32_t index_coding) {
  return quantizer >= DL_Q_REFERENCE && quantizer <= DL_Q_NONE &&
         (value_dtype == DL_V_FP16 || value_dtype == DL_V_FP32) &&
         (index_coding == DL_IDX_PACKED || index_coding == DL_IDX_GAPS);
}

/* Derived geometry: every quantity the kernels need, computed once. */
struct Geo {
  int64_t rows, cols, cr, cc;
  int64_t nbj;       // chunks per block row (ceil(cols / cc))
  int64_t n_chunks;  // (rows / cr) * nbj
  int64_t n_full;    // cr * cc
  int64_t k_full, k_last;
  int64_t nnz;       // (n_chunks - 1) * k_full + k_last
  int32_t bits;

  DL_HD int64_t numel() const { return rows * cols; }
  DL_HD int64_t width(int64_t c) const {  // columns of chunk c (cc except a short last 1-D chunk)
    int64_t col0 = (c % nbj) * cc;
    return cols - col0 < cc ? cols - col0 : cc;
  }
  DL_HD int64_t size(int64_t c) const { return cr * width(c); }
  DL_HD int64_t k_of(int64_t c) const { return c == n_chunks - 1 ? k_last : k_full; }
  DL_HD int64_t field0(int64_t c) const { return c * k_full; }  // first field of chunk c
  DL_HD int64_t chunk_of_field(int64_t i) const {
    int64_t c = i / k_full;
    return c < n_chunks ? c : n_chunks - 1;
  }
  /* Row-major flat index of local index l of chunk c (w = width(c)). */
  DL_HD int64_t global(int64_t c, int64_t l, int64_t w) const {
    int64_t row = (c / nbj) * cr + l / w;
    int64_t col = (c % nbj) * cc + l % w;
    return row * cols + col;
  }
};

DL_HD int64_t packed_nbytes(int64_t count, int64_t bits) { return (count * bits + 7) / 8; }

/* Validate a dl_geometry and derive a Geo; false when the geometry is not one chunking.py makes. */
inline bool make_geo(const dl_geometry* g, Geo* out) {
  if (g == nullptr || g->reserved != 0) return false;
  if (g->rows <= 0 || g->cols <= 0 || g->cr <= 0 || g->cc <= 0) return false;
  if (g->rows % g->cr != 0 || g->cc > g->cols) return false;
  if (g->cols % g->cc != 0 && g->rows != 1) return false;
  if (g->index_bits < 0 || g->index_bits > kMaxIndexBits) return false;
  const int64_t n_full = g->cr * g->cc;
  if (g->rows > (int64_t(1) << 40) / g->cols) return false;  // keeps every product in range
  if (n_full > (int64_t(1) << g->index_bits)) return false;  // every local index must fit
  Geo r;
  r.rows = g->rows; r.cols = g->cols; r.cr = g->cr; r.cc = g->cc;
  r.nbj = (g->cols + g->cc - 1) / g->cc;
  r.n_chunks = (g->rows / g->cr) * r.nbj;
  r.n_full = n_full;
  r.k_full = g->k_full; r.k_last = g->k_last;
  r.bits = g->index_bits;
  if (r.k_full < 1 || r.k_full > n_full) return false;
  if (r.k_last < 1 || r.k_last > r.size(r.n_chunks - 1)) return false;
  if (r.size(r.n_chunks - 1) == n_full && r.k_last != r.k_full) return false;  // a full last chunk
  r.nnz = (r.n_chunks - 1) * r.k_full + r.k_last;
  *out = r;
  return true;
}

/* |v| as an order-preserving unsigned key (IEEE bits of a non-negative float, -0 -> +0). */
DL_HD uint32_t abs_key(float v) {
  uint32_t b;
  memcpy(&b, &v, 4);
  return b & 0x7fffffffu;
}
DL_HD bool key_is_finite(uint32_t key) { return key < 0x7f800000u; }

/* fp32 -> fp16 bits, round to nearest even (what torch's .to(float16) does); finite inputs. */
DL_HD uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                                     // below 2^-14: subnormal half
    float a;
    memcpy(&a, &ax, 4);
    // a * 2^24 is exact; rintf rounds half to even; 1024 becomes the smallest normal (0x400).
    return (uint16_t)(sign | (uint32_t)rintf(a * 16777216.0f));
  }
  uint32_t h = ((ax >> 23) - 112u) << 10 | ((ax >> 13) & 0x3ffu);
  const uint32_t rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1u;  // carries into the exponent
  return (uint16_t)(sign | h);
}

/* fp16 bits -> fp32 (exact). */
DL_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  uint32_t x;
  if (exp == 0x1fu) {
    x = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    float m = (float)man * 5.9604644775390625e-08f;  // man * 2^-24, exact
    memcpy(&x, &m, 4);
    x |= sign;
  } else {
    x = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &x, 4);
  return f;
}
/* What the reference sends for quantizer none / fp16: clamp to ±65504, then round. */
DL_HD uint16_t f32_to_f16_saturated(float f) {
  const float lim = 65504.0f;
  return f32_to_f16(f > lim ? lim : (f < -lim ? -lim : f));
}

/* Reference quantizer code of one value: clamp(round_half_even((v - shift) / scale + 2), 0, 3),
 * three fp32 operations in this order (callers compile without FMA contraction). The rounding
 * needs no rintf: round_half_even(t) >= 1 iff t > 0.5, >= 2 iff t >= 1.5, >= 3 iff t > 2.5 (each
 * tie goes to its even neighbour), so the code is three comparisons (NaN gives 0), branch-free
 * and vectorisable. */
DL_HD uint32_t code_reference(float v, float shift, float scale) {
  float t = (v - shift) / scale;
  t = t + 2.0f;
  return (uint32_t)(t > 0.5f) + (uint32_t)(t >= 1.5f) + (uint32_t)(t > 2.5f);
}

/* Symmetric quantizer code: 0 (neg, big) | 1 (neg, small) | 2 (pos, small) | 3 (pos, big). */
DL_HD uint32_t code_symmetric(float v, float tau) {
  const bool big = fabsf(v) > tau;
  const bool neg = v < 0.0f;
  return neg ? (big ? 0u : 1u) : (big ? 3u : 2u);
}

/* Read field i (bits wide) of a packed stream of nbytes bytes, never reading past the end. */
DL_HD uint32_t read_field(const uint8_t* buf, int64_t nbytes, int64_t i, int bits) {
  if (bits == 0) return 0;
  const int64_t pos = i * bits;
  const int64_t byte = pos >> 3;
  const int shift = (int)(pos & 7);
  uint32_t w = 0;
  const int need = (shift + bits + 7) >> 3;
  for (int t = 0; t < need; ++t)
    if (byte + t < nbytes) w |= (uint32_t)buf[byte + t] << (8 * t);
  return (w >> shift) & ((bits == 32) ? 0xffffffffu : ((1u << bits) - 1u));
}

/* Gap of field i (index coding "gaps"): the index itself at a chunk's first field, else the
 * difference to the previous field's index; stored as uint16 (wraps like numpy's astype). */
DL_HD uint32_t gap_of(const uint32_t* idx, int64_t i, int64_t f0) {
  return (i == f0 ? idx[i] : idx[i] - idx[i - 1]) & 0xffffu;
}

/* Pack fields [8*g, min(8*g + 8, count)) into their `bits` bytes (the group is byte aligned:
 * 8 fields of b bits = b bytes). Bytes past the stream end are not written; the last byte's
 * unused high bits are zero. */
template <typename Get>
DL_HD void pack_group(int64_t g, int64_t count, int bits, uint8_t* out, Get get) {
  if (bits == 0) return;
  const int64_t first = 8 * g;
  const int64_t last = first + 8 < count ? first + 8 : count;
  const int64_t byte0 = g * bits;
  const int64_t byte_end = packed_nbytes(count, bits);
  uint64_t acc = 0;
  int nacc = 0;
  int64_t b = byte0;
  for (int64_t i = first; i < last; ++i) {
    acc |= (uint64_t)get(i) << nacc;
    nacc += bits;
    while (nacc >= 8) {
      out[b++] = (uint8_t)(acc & 0xffu);
      acc >>= 8;
      nacc -= 8;
    }
  }
  if (nacc > 0 && b < byte_end) out[b++] = (uint8_t)(acc & 0xffu);
}

/* Per-tensor quantizer parameters, computed from float64 sums exactly as quantizers.py does:
 * every float64 quantity is rounded to float32 once, at the point where the reference does. */
/* sum = Σ f64(v) over the m >= 1 selected values. */
DL_HD float ref_shift(double sum, int64_t m) { return (float)(sum / (double)m); }
/* sq = Σ (f64(v) - f64(shift))²; sigma = (sq / (m - 1)) ** 0.5 (Python pow), scale = f32(1.5σ). */
DL_HD float ref_scale(double sq, int64_t m) {
#ifdef __CUDA_ARCH__
  // Device pow is not correctly rounded; sqrt is, and glibc's pow(x, 0.5) (what Python's ** 0.5
  // calls) agrees with the correctly rounded root. Either way σ is rounded to fp32 afterwards.
  const double sigma = m >= 2 ? sqrt(sq / (double)(m - 1)) : 0.0;
#else
  const double sigma = m >= 2 ? pow(sq / (double)(m - 1), 0.5) : 0.0;
#endif
  const float scale = (float)(1.5 * sigma);
  return (scale > 0.0f && scale < INFINITY) ? scale : 1.0f;
}
/* Centroid of level c: mean of its members, or shift + (c - 2)·scale when it has none. */
DL_HD float ref_centroid(int c, double sum, int64_t count, float shift, float scale) {
  if (count > 0) return (float)(sum / (double)count);
  return (float)((double)shift + (double)(c - 2) * (double)scale);
}
/* Symmetric: tau = f32(Σ|f64(v)| / m); levels [-L, -S, S, L] from the magnitude-bin means. */
DL_HD float sym_tau(double abs_sum, int64_t m) { return (float)(abs_sum / (double)m); }
DL_HD void sym_centroids(double small_sum, int64_t small_n, double big_sum, int64_t big_n,
                         float tau, float* out) {
  const double s = small_n > 0 ? small_sum / (double)small_n : 0.0;
  const double l = big_n > 0 ? big_sum / (double)big_n : (double)tau;
  out[0] = (float)(-l);
  out[1] = (float)(-s);
  out[2] = (float)s;
  out[3] = (float)l;
}

}  // namespace dl

#endif  // DISTRAIN_SPARSELOCO_COMMON_H
