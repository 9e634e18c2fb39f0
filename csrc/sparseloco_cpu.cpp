// CPU (OpenMP) SparseLoCo encode and the C API. See distrain_kernels.h; decode-aggregate is in
// sparseloco_cpu_decode.cpp.
//
// Encode touches the dense data once: a read-only check of the pseudo-gradient (the reference
// rejects a NaN before modifying anything), then one streaming pass per work item (a band of
// whole block rows) that updates ef = ef*beta + delta in place and records segment maxima, and
// selects each chunk of the band while the band is still in L2 (cpu_topk.h: linear time, exact
// tie rule). Everything after that runs over the selected fields only (k/4096 of the data):
// quantizer statistics, codes, ef -= sent, and packing, in fixed blocks of fields. Every float64
// sum is taken block by block in index order and the block sums are added in block order, so the
// results do not depend on the thread count, and they are rounded to fp32 exactly where the
// reference rounds. Must be compiled with -ffp-contract=off: the reference rounds after every
// fp32 operation.

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <vector>

#include "cpu_topk.h"
#include "cpu_util.h"
#include "sparseloco_common.h"

namespace {

using dl::Geo;
using dlcpu::ChunkPlan;
using dlcpu::Grow;
using dlcpu::kFieldBlock;

// e = e*beta + d, one rounding per operation; nonzero when a result is not finite.
inline uint32_t update_run(float* __restrict e, const float* __restrict d, int64_t n, float beta) {
  uint32_t bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float s = e[j] * beta;
    const float x = s + d[j];
    e[j] = x;
    bad |= (uint32_t)(dl::abs_key(x) >= 0x7f800000u);
  }
  return bad;
}

DL_CPU_CLONES uint32_t nonfinite_run(const float* __restrict d, int64_t n) {
  uint32_t bad = 0;
  for (int64_t j = 0; j < n; ++j) bad |= (uint32_t)(dl::abs_key(d[j]) >= 0x7f800000u);
  return bad;
}

// The selected fields of one encode, chunk-major, ascending local index within a chunk.
struct Fields {
  uint32_t* idx;  // local index
  float* val;     // updated ef value
  int64_t* off;   // flat offset into ef
  uint8_t* codes;
};

struct Plans {
  ChunkPlan full, last;
  int64_t gmax;  // most segments of any chunk
  const ChunkPlan& of(const Geo& g, int64_t c) const { return c == g.n_chunks - 1 ? last : full; }
};

// EF update and selection of one work item (see dlcpu::items_of).
DL_CPU_CLONES uint32_t update_and_select_item(float* ef, const float* delta, float beta, const Geo& g,
                                const dlcpu::Items& items, const Plans& plans, int64_t it,
                                uint32_t* segmax, dlcpu::SelectScratch& s, const Fields& f) {
  const int64_t bi = it / items.ngroups;
  const int64_t bj0 = (it % items.ngroups) * items.group;
  const int64_t bj1 = std::min(g.nbj, bj0 + items.group);
  const int64_t c0 = bj0 * g.cc, c1 = std::min(g.cols, bj1 * g.cc);
  uint32_t bad = 0;
  for (int64_t r = 0; r < g.cr; ++r) {
    const int64_t row = bi * g.cr + r;
    float* e = ef + row * g.cols;
    bad |= update_run(e + c0, delta + row * g.cols + c0, c1 - c0, beta);
    for (int64_t bj = bj0; bj < bj1; ++bj) {
      const ChunkPlan& p = plans.of(g, bi * g.nbj + bj);
      const float* base = e + bj * g.cc;
      uint32_t* sm = segmax + (bj - bj0) * plans.gmax + r * p.spr;
      for (int64_t q = 0; q < p.spr; ++q) {
        const int64_t lo = q * p.seg;
        sm[q] = dlcpu::max_key(base + lo, std::min(p.w, lo + p.seg) - lo);
      }
    }
  }
  for (int64_t bj = bj0; bj < bj1; ++bj) {
    const int64_t c = bi * g.nbj + bj;
    const ChunkPlan& p = plans.of(g, c);
    const int64_t origin = bi * g.cr * g.cols + bj * g.cc, f0 = g.field0(c);
    dlcpu::select_chunk(ef + origin, g.cols, g.cr, p, segmax + (bj - bj0) * plans.gmax, s,
                        f.idx + f0, f.val + f0, f.off + f0);
    for (int64_t j = 0; j < p.k; ++j) f.off[f0 + j] += origin;
  }
  return bad;
}

// ---- statistics over the selected values, in fixed blocks of fields --------------------------
inline int64_t nblocks(int64_t m) { return (m + kFieldBlock - 1) / kFieldBlock; }

// Σ fn(v[i]) in float64: per block in four interleaved partial sums (i % 4) added in lane order,
// then the block sums in block order, so the result does not depend on the thread count.
template <typename F>
double block_sum(const float* v, int64_t m, int T, double* part, F fn) {
  const int64_t nb = nblocks(m);
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kFieldBlock, hi = std::min(m, (b + 1) * kFieldBlock);
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = lo;
    for (; i + 4 <= hi; i += 4)
      for (int q = 0; q < 4; ++q) s[q] += fn(v[i + q]);
    for (int q = 0; i < hi; ++i, ++q) s[q] += fn(v[i]);
    part[b] = (s[0] + s[1]) + (s[2] + s[3]);
  }
  double s = 0.0;
  for (int64_t b = 0; b < nb; ++b) s += part[b];
  return s;
}

// Codes of every value, plus per-bin float64 sums of weight(v) (in index order) and counts.
template <typename Code, typename Weight>
void codes_and_sums(const float* v, int64_t m, int T, uint8_t* codes, Code code, Weight weight,
                    bool two_bins, double* part, int64_t* pcount, double* sums, int64_t* counts) {
  const int64_t nb = nblocks(m);
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kFieldBlock, hi = std::min(m, (b + 1) * kFieldBlock);
    for (int64_t i = lo; i < hi; ++i) codes[i] = (uint8_t)code(v[i]);  // vectorises
    double s[dl::kLevels] = {0, 0, 0, 0};
    int64_t n[dl::kLevels] = {0, 0, 0, 0};
    for (int64_t i = lo; i < hi; ++i) {
      const uint32_t c = codes[i];
      const int bin = two_bins ? (int)(c == 0 || c == 3) : (int)c;
      s[bin] += weight(v[i]);
      n[bin] += 1;
    }
    for (int q = 0; q < dl::kLevels; ++q) part[b * dl::kLevels + q] = s[q], pcount[b * dl::kLevels + q] = n[q];
  }
  for (int q = 0; q < dl::kLevels; ++q) {
    sums[q] = 0.0;
    counts[q] = 0;
    for (int64_t b = 0; b < nb; ++b) sums[q] += part[b * dl::kLevels + q], counts[q] += pcount[b * dl::kLevels + q];
  }
}

// ---- packing ----------------------------------------------------------------------------------
// Pack n fields of `bits` bits (bits <= 25) starting at a byte boundary; the last byte's unused
// high bits are zero.
template <typename Get>
inline void pack_run(int64_t n, int bits, uint8_t* out, Get get) {
  if (bits == 0) return;
  uint64_t acc = 0;
  int nacc = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc |= (uint64_t)get(i) << nacc;
    nacc += bits;
    while (nacc >= 8) {
      *out++ = (uint8_t)acc;
      acc >>= 8;
      nacc -= 8;
    }
  }
  if (nacc > 0) *out = (uint8_t)acc;
}

inline void pack_codes(const uint8_t* codes, int64_t n, uint8_t* out) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    *out++ = (uint8_t)(codes[i] | codes[i + 1] << 2 | codes[i + 2] << 4 | codes[i + 3] << 6);
  if (i < n) {
    uint8_t b = 0;
    for (int s = 0; i < n; ++i, s += 2) b |= (uint8_t)(codes[i] << s);
    *out = b;
  }
}

// ef -= dequant and the index/code streams for fields [b0, b1) (b0 a multiple of 8).
template <typename Dequant>
void subtract_and_pack_block(float* ef, const Geo& g, const Fields& f, int64_t b0, int64_t b1,
                             Dequant dq, int32_t index_coding, uint8_t* out_indices,
                             uint8_t* out_codes) {
  for (int64_t i = b0; i < b1; ++i) ef[f.off[i]] = ef[f.off[i]] - dq(i);
  if (index_coding == DL_IDX_PACKED) {
    const uint32_t* idx = f.idx + b0;
    pack_run(b1 - b0, g.bits, out_indices + b0 * g.bits / 8, [idx](int64_t i) { return idx[i]; });
  } else {
    int64_t next = (b0 + g.k_full - 1) / g.k_full * g.k_full;  // first field of a chunk
    for (int64_t i = b0; i < b1; ++i) {
      uint32_t gap;
      if (i == next) {
        gap = f.idx[i];
        next += g.k_full;
      } else {
        gap = f.idx[i] - f.idx[i - 1];
      }
      out_indices[i] = (uint8_t)(gap & 0xffu);
      out_indices[g.nnz + i] = (uint8_t)((gap >> 8) & 0xffu);
    }
  }
  if (out_codes != nullptr) pack_codes(f.codes + b0, b1 - b0, out_codes + b0 / 4);
}

template <typename Dequant>
void subtract_and_pack(float* ef, const Geo& g, const Fields& f, int T, Dequant dq,
                       int32_t index_coding, uint8_t* out_indices, uint8_t* out_codes) {
  const int64_t nb = nblocks(g.nnz);
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t b = 0; b < nb; ++b)
    subtract_and_pack_block(ef, g, f, b * kFieldBlock, std::min(g.nnz, (b + 1) * kFieldBlock), dq,
                            index_coding, out_indices, out_codes);
}

// Scratch of one encode, kept per calling thread between calls.
struct EncodeScratch {
  Grow<uint32_t> idx, segmax, ckey, cidx;
  Grow<float> val, cval;
  Grow<int64_t> off, coff, pcount;
  Grow<uint8_t> codes;
  Grow<double> part;
};

int32_t encode(float* ef, const float* delta, float beta, const Geo& g, int32_t quantizer,
               int32_t value_dtype, int32_t index_coding, uint8_t* out_indices, void* out_values,
               float* out_centroids, int32_t num_threads) {
  static thread_local EncodeScratch ws;
  const int64_t n = g.numel();
  const int T = dlcpu::thread_count(num_threads, n);

  // 1. Reject a non-finite pseudo-gradient before touching ef (the reference raises first), then
  // 2. EF update + top-k, the only pass that writes the dense data: one parallel region, one
  // barrier between them (each barrier costs a time slice when a thread is preempted).
  Plans plans;
  plans.full = dlcpu::plan_chunk(g.cr, g.cc, g.k_full);
  plans.last = dlcpu::plan_chunk(g.cr, g.width(g.n_chunks - 1), g.k_last);
  plans.gmax = std::max(plans.full.G, plans.last.G);
  const dlcpu::Items items = dlcpu::items_of(g);
  const size_t nf = (size_t)g.n_full;
  uint32_t* segmax = ws.segmax.get((size_t)T * items.group * plans.gmax);
  uint32_t* ckey = ws.ckey.get((size_t)T * nf);
  uint32_t* cidx = ws.cidx.get((size_t)T * nf);
  float* cval = ws.cval.get((size_t)T * nf);
  int64_t* coff = ws.coff.get((size_t)T * nf);
  Fields f{ws.idx.get((size_t)g.nnz), ws.val.get((size_t)g.nnz), ws.off.get((size_t)g.nnz),
           ws.codes.get((size_t)g.nnz)};
  const int64_t check_blocks = (n + dlcpu::kItemElems - 1) / dlcpu::kItemElems;
  uint32_t bad = 0, nonfinite = 0;
#pragma omp parallel num_threads(T)
  {
#pragma omp for schedule(dynamic, 4) reduction(| : bad)
    for (int64_t b = 0; b < check_blocks; ++b)
      bad |= nonfinite_run(delta + b * dlcpu::kItemElems,
                           std::min(dlcpu::kItemElems, n - b * dlcpu::kItemElems));
    if (!bad) {  // the same value in every thread after the loop's barrier
      const int t = omp_get_thread_num();
      dlcpu::SelectScratch s{ckey + (size_t)t * nf, cidx + (size_t)t * nf, cval + (size_t)t * nf,
                             coff + (size_t)t * nf};
      uint32_t* sm = segmax + (size_t)t * items.group * plans.gmax;
#pragma omp for schedule(dynamic, 1) reduction(| : nonfinite) nowait
      for (int64_t it = 0; it < items.count; ++it)
        nonfinite |= update_and_select_item(ef, delta, beta, g, items, plans, it, sm, s, f);
    }
  }
  if (bad) return DL_ERR_NONFINITE_DELTA;
  if (nonfinite) return DL_ERR_NONFINITE_EF;

  // 3.-5. Quantize the selected values, subtract what is sent, pack.
  const int Ts = dlcpu::thread_count(num_threads, g.nnz);  // one thread below 32K fields
  const float* v = f.val;
  double* part = ws.part.get((size_t)nblocks(g.nnz) * dl::kLevels);
  int64_t* pcount = ws.pcount.get((size_t)nblocks(g.nnz) * dl::kLevels);
  uint8_t* out_codes = quantizer == DL_Q_NONE ? nullptr : static_cast<uint8_t*>(out_values);
  if (quantizer == DL_Q_NONE) {
    if (value_dtype == DL_V_FP32) {
      std::memcpy(out_values, v, sizeof(float) * (size_t)g.nnz);
      subtract_and_pack(ef, g, f, Ts, [v](int64_t i) { return v[i]; }, index_coding, out_indices,
                        nullptr);
      return DL_OK;
    }
    uint16_t* outh = static_cast<uint16_t*>(out_values);
#pragma omp parallel for num_threads(Ts) schedule(static)
    for (int64_t i = 0; i < g.nnz; ++i) outh[i] = dl::f32_to_f16_saturated(v[i]);
    subtract_and_pack(ef, g, f, Ts, [outh](int64_t i) { return dl::f16_to_f32(outh[i]); },
                      index_coding, out_indices, nullptr);
    return DL_OK;
  }
  double sums[dl::kLevels];
  int64_t counts[dl::kLevels];
  if (quantizer == DL_Q_REFERENCE) {
    const float shift = dl::ref_shift(block_sum(v, g.nnz, Ts, part, [](float x) { return (double)x; }), g.nnz);
    const double shift64 = (double)shift;
    const float scale = dl::ref_scale(block_sum(v, g.nnz, Ts, part, [shift64](float x) {
                                        const double d = (double)x - shift64;
                                        return d * d;
                                      }), g.nnz);
    codes_and_sums(
        v, g.nnz, Ts, f.codes, [shift, scale](float x) { return dl::code_reference(x, shift, scale); },
        [](float x) { return (double)x; }, false, part, pcount, sums, counts);
    for (int c = 0; c < dl::kLevels; ++c)
      out_centroids[c] = dl::ref_centroid(c, sums[c], counts[c], shift, scale);
  } else {
    const float tau = dl::sym_tau(block_sum(v, g.nnz, Ts, part, [](float x) { return fabs((double)x); }), g.nnz);
    codes_and_sums(
        v, g.nnz, Ts, f.codes, [tau](float x) { return dl::code_symmetric(x, tau); },
        [](float x) { return fabs((double)x); }, true, part, pcount, sums, counts);
    dl::sym_centroids(sums[0], counts[0], sums[1], counts[1], tau, out_centroids);
  }
  const uint8_t* cd = f.codes;
  float cent[dl::kLevels];
  std::memcpy(cent, out_centroids, sizeof(cent));
  subtract_and_pack(ef, g, f, Ts, [cd, &cent](int64_t i) { return cent[cd[i]]; }, index_coding,
                    out_indices, out_codes);
  return DL_OK;
}

}  // namespace

extern "C" {

DL_API int32_t dl_abi_version(void) { return DL_ABI_VERSION; }

DL_API const char* dl_status_string(int32_t status) { return dl::status_string(status); }

DL_API int64_t dl_nnz(const dl_geometry* geo) {
  Geo g;
  return dl::make_geo(geo, &g) ? g.nnz : -1;
}

DL_API int32_t dl_cpu_sparseloco_encode(float* ef, const float* delta, float beta,
                                        const dl_geometry* geo, int32_t quantizer,
                                        int32_t value_dtype, int32_t index_coding,
                                        uint8_t* out_indices, void* out_values,
                                        float* out_centroids, int32_t num_threads) {
  Geo g;
  if (!dl::make_geo(geo, &g) || !dl::valid_enums(quantizer, value_dtype, index_coding) ||
      ef == nullptr || delta == nullptr || out_values == nullptr ||
      (out_indices == nullptr && (g.bits > 0 || index_coding == DL_IDX_GAPS)) ||
      (quantizer != DL_Q_NONE && out_centroids == nullptr))
    return DL_ERR_INVALID;
  try {
    return encode(ef, delta, beta, g, quantizer, value_dtype, index_coding, out_indices,
                  out_values, out_centroids, num_threads);
  } catch (const std::bad_alloc&) {
    return DL_ERR_NO_MEMORY;
  }
}

DL_API int32_t dl_cpu_sparseloco_decode_aggregate(const dl_geometry* geo, int64_t n_parts,
                                                  const uint8_t* const* indices,
                                                  const void* const* values,
                                                  const float* centroids, int32_t quantizer,
                                                  int32_t value_dtype, int32_t index_coding,
                                                  int32_t aggregation, float* out,
                                                  int32_t num_threads) {
  Geo g;
  if (!dl::make_geo(geo, &g) || !dl::valid_enums(quantizer, value_dtype, index_coding) ||
      n_parts < 1 || indices == nullptr || values == nullptr || out == nullptr ||
      (quantizer != DL_Q_NONE && centroids == nullptr) ||
      (aggregation != DL_AGG_MEAN_SELECTED && aggregation != DL_AGG_SUM_OVER_R))
    return DL_ERR_INVALID;
  for (int64_t r = 0; r < n_parts; ++r)
    if ((indices[r] == nullptr && (g.bits > 0 || index_coding == DL_IDX_GAPS)) ||
        values[r] == nullptr)
      return DL_ERR_INVALID;
  try {
    return dlcpu::decode_aggregate(g, n_parts, indices, values, centroids, quantizer, value_dtype,
                                   index_coding, aggregation, out, num_threads);
  } catch (const std::bad_alloc&) {
    return DL_ERR_NO_MEMORY;
  }
}

}  // extern "C"
