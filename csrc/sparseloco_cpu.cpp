// CPU (OpenMP) SparseLoCo kernels: fused encode and decode-aggregate. See distrain_kernels.h.
//
// Encode is one pass over the dense data (EF update fused with a threshold-filtered top-k that walks
// the tensor row by row, so memory is streamed once) followed by short passes over the selected
// values only (about k/4096 of the data): statistics, codes, EF subtraction and packing.
// Every floating-point reduction uses a fixed static partition combined in thread order, so
// results depend only on the thread count, and float64 sums are rounded to float32 exactly where
// the reference does. Loops whose iterations are independent (top-k work items, packing groups,
// decode chunks) are scheduled dynamically: on a shared machine a preempted thread then does not
// stall the others, and the result cannot depend on which thread ran which item.
// Must be compiled with -ffp-contract=off: the reference rounds after every fp32 operation.

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <new>
#include <vector>

#include "sparseloco_common.h"

namespace {

using dl::Geo;

constexpr int64_t kMinWorkPerThread = 1 << 15;  // elements; below this a thread costs more than it saves
constexpr int64_t kGroupCols = 1024;            // columns a top-k work item spans (streaming run)

int thread_count(int32_t requested, int64_t work) {
  int64_t t = requested > 0 ? requested : omp_get_max_threads();
  t = std::min<int64_t>(t, std::max<int64_t>(1, work / kMinWorkPerThread));
  return (int)std::max<int64_t>(1, t);
}

// [lo, hi) of part t of n items split into T contiguous parts.
inline int64_t part_lo(int64_t n, int t, int T) { return n * t / T; }

// ---- top-k ------------------------------------------------------------------------------------
// A candidate is (|v| key, local index) packed so that a larger composite is a better candidate:
// larger |v| first, then the lower local index.
inline uint64_t composite(uint32_t key, int64_t l) {
  return ((uint64_t)key << 32) | (uint64_t)(0xffffffffu - (uint32_t)l);
}
inline int64_t composite_index(uint64_t c) { return (int64_t)(0xffffffffu - (uint32_t)c); }

// Per-chunk candidate buffer of capacity 2k. Candidates whose key beats the current threshold are
// appended; a full buffer is cut back to its k best with nth_element, and the k-th best key
// becomes the threshold. Elements arrive in ascending local index, so a newcomer whose |v| equals
// the threshold key never beats the k-th best (its index is higher): comparing keys alone
// implements the tie rule, and the buffer always holds the chunk's top k so far.
struct Candidates {
  uint64_t* buf;
  int64_t k, size;
  uint32_t thr;
  bool has_thr;

  void compact() {
    std::nth_element(buf, buf + (k - 1), buf + size, std::greater<uint64_t>());
    size = k;
    thr = (uint32_t)(buf[k - 1] >> 32);
    has_thr = true;
  }
  void push(uint32_t key, int64_t l) {
    buf[size++] = composite(key, l);
    if (size == 2 * k) compact();
  }
  // Offer e[0..w), local indices base..base+w-1.
  void offer_row(const float* e, int64_t w, int64_t base) {
    int64_t j = 0;
    for (; j < w && !has_thr; ++j) push(dl::abs_key(e[j]), base + j);
    constexpr int64_t B = 16;
    for (; j + B <= w; j += B) {
      // Vectorisable screen: does any of the next B keys beat the threshold?
      int32_t any = 0;
      for (int64_t t = 0; t < B; ++t) any |= (int32_t)dl::abs_key(e[j + t]) > (int32_t)thr;
      if (!any) continue;
      for (int64_t t = 0; t < B; ++t) {
        const uint32_t key = dl::abs_key(e[j + t]);
        if (key > thr) push(key, base + j + t);  // thr may rise inside the block
      }
    }
    for (; j < w; ++j) {
      const uint32_t key = dl::abs_key(e[j]);
      if (!has_thr || key > thr) push(key, base + j);
    }
  }
  // The k selected local indices, ascending.
  void finish(uint32_t* out) {
    if (size > k) compact();
    for (int64_t j = 0; j < k; ++j) out[j] = (uint32_t)composite_index(buf[j]);
    std::sort(out, out + k);
  }
};

// EF update and per-chunk top-k. Writes the selected local indices (ascending per chunk) and the
// updated values to idx/val at each chunk's field offset. Returns false if ef became non-finite.
bool update_and_select(float* ef, const float* delta, float beta, const Geo& g, int T,
                       uint32_t* idx, float* val, std::vector<uint64_t>& buffers,
                       std::vector<Candidates>& states) {
  const int64_t group = std::max<int64_t>(1, std::min(g.nbj, kGroupCols / g.cc));
  const int64_t ngroups = (g.nbj + group - 1) / group;
  const int64_t items = (g.rows / g.cr) * ngroups;
  const int64_t buf_stride = group * 2 * g.k_full;
  uint32_t nonfinite = 0;
#pragma omp parallel num_threads(T) reduction(| : nonfinite)
  {
    const int t = omp_get_thread_num();
    uint64_t* bufs = buffers.data() + (size_t)t * buf_stride;
    Candidates* cand = states.data() + (size_t)t * group;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t bi = it / ngroups;
      const int64_t bj0 = (it % ngroups) * group;
      const int64_t bj1 = std::min(g.nbj, bj0 + group);
      const int64_t c0 = bj0 * g.cc, c1 = std::min(g.cols, bj1 * g.cc);
      for (int64_t bj = bj0; bj < bj1; ++bj) {
        const int64_t c = bi * g.nbj + bj;
        cand[bj - bj0] = Candidates{bufs + (bj - bj0) * 2 * g.k_full, g.k_of(c), 0, 0, false};
      }
      for (int64_t r = 0; r < g.cr; ++r) {
        const int64_t row = bi * g.cr + r;
        float* e = ef + row * g.cols;
        const float* d = delta + row * g.cols;
        uint32_t bad = 0;
        for (int64_t j = c0; j < c1; ++j) {
          const float s = e[j] * beta;
          const float x = s + d[j];
          e[j] = x;
          bad |= (uint32_t)(dl::abs_key(x) >= 0x7f800000u);
        }
        nonfinite |= bad;
        for (int64_t bj = bj0; bj < bj1; ++bj) {
          const int64_t c = bi * g.nbj + bj;
          const int64_t w = g.width(c);
          cand[bj - bj0].offer_row(e + bj * g.cc, w, r * w);
        }
      }
      for (int64_t bj = bj0; bj < bj1; ++bj) {
        const int64_t c = bi * g.nbj + bj;
        const int64_t k = g.k_of(c), w = g.width(c), f0 = g.field0(c);
        uint32_t* out = idx + f0;
        cand[bj - bj0].finish(out);
        for (int64_t j = 0; j < k; ++j) val[f0 + j] = ef[g.global(c, out[j], w)];
      }
    }
  }
  return nonfinite == 0;
}

// ---- quantizers --------------------------------------------------------------------------------
// Sum of f(v[i]) in float64 over a static partition, combined in thread order.
template <typename F>
double sum64(const float* v, int64_t m, int T, F f) {
  std::vector<double> part(T, 0.0);
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num();
    double s = 0.0;
    for (int64_t i = part_lo(m, t, T); i < part_lo(m, t + 1, T); ++i) s += f(v[i]);
    part[t] = s;
  }
  double s = 0.0;
  for (double p : part) s += p;
  return s;
}

// Codes of all values plus per-level float64 sums of `weight(v)` and member counts.
template <typename Code, typename Weight>
void codes_and_sums(const float* v, int64_t m, int T, uint8_t* codes, Code code, Weight weight,
                    double* sums, int64_t* counts, int levels) {
  std::vector<double> ps((size_t)T * dl::kLevels, 0.0);
  std::vector<int64_t> pc((size_t)T * dl::kLevels, 0);
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num();
    double s[dl::kLevels] = {0, 0, 0, 0};
    int64_t n[dl::kLevels] = {0, 0, 0, 0};
    for (int64_t i = part_lo(m, t, T); i < part_lo(m, t + 1, T); ++i) {
      const uint32_t c = code(v[i]);
      codes[i] = (uint8_t)c;
      const int b = levels == 2 ? (int)(c == 0 || c == 3) : (int)c;
      s[b] += weight(v[i]);
      n[b] += 1;
    }
    for (int b = 0; b < dl::kLevels; ++b) ps[(size_t)t * dl::kLevels + b] = s[b], pc[(size_t)t * dl::kLevels + b] = n[b];
  }
  for (int b = 0; b < levels; ++b) {
    sums[b] = 0.0;
    counts[b] = 0;
    for (int t = 0; t < T; ++t) sums[b] += ps[(size_t)t * dl::kLevels + b], counts[b] += pc[(size_t)t * dl::kLevels + b];
  }
}

void quantize_reference(const float* v, int64_t m, int T, uint8_t* codes, float* centroids) {
  const float shift = dl::ref_shift(sum64(v, m, T, [](float x) { return (double)x; }), m);
  const double shift64 = (double)shift;
  const float scale = dl::ref_scale(sum64(v, m, T, [shift64](float x) {
                                      const double d = (double)x - shift64;
                                      return d * d;
                                    }), m);
  double sums[dl::kLevels];
  int64_t counts[dl::kLevels];
  codes_and_sums(
      v, m, T, codes, [shift, scale](float x) { return dl::code_reference(x, shift, scale); },
      [](float x) { return (double)x; }, sums, counts, dl::kLevels);
  for (int c = 0; c < dl::kLevels; ++c)
    centroids[c] = dl::ref_centroid(c, sums[c], counts[c], shift, scale);
}

void quantize_symmetric(const float* v, int64_t m, int T, uint8_t* codes, float* centroids) {
  const float tau = dl::sym_tau(sum64(v, m, T, [](float x) { return fabs((double)x); }), m);
  double sums[2];
  int64_t counts[2];
  codes_and_sums(
      v, m, T, codes, [tau](float x) { return dl::code_symmetric(x, tau); },
      [](float x) { return fabs((double)x); }, sums, counts, 2);
  dl::sym_centroids(sums[0], counts[0], sums[1], counts[1], tau, centroids);
}

// ---- EF subtraction and packing ------------------------------------------------------------
// One parallel loop over groups of 8 fields: subtract what was sent from ef and pack the group's
// indices and codes (each group is byte aligned in both streams, so groups never share a byte).
template <typename Dequant>
void subtract_and_pack(float* ef, const Geo& g, int T, const uint32_t* idx, const uint8_t* codes,
                       Dequant dq, int32_t index_coding, uint8_t* out_indices,
                       uint8_t* out_codes) {
  const int64_t ngroups = (g.nnz + 7) / 8;
#pragma omp parallel for num_threads(T) schedule(dynamic, 256)
  for (int64_t grp = 0; grp < ngroups; ++grp) {
    const int64_t i1 = std::min(g.nnz, 8 * grp + 8);
    for (int64_t i = 8 * grp; i < i1; ++i) {
      const int64_t c = g.chunk_of_field(i);
      const int64_t gi = g.global(c, idx[i], g.width(c));
      ef[gi] = ef[gi] - dq(i);
      if (index_coding == DL_IDX_GAPS) {
        const uint32_t gap = dl::gap_of(idx, i, g.field0(c));
        out_indices[i] = (uint8_t)(gap & 0xffu);
        out_indices[g.nnz + i] = (uint8_t)(gap >> 8);
      }
    }
    if (index_coding == DL_IDX_PACKED)
      dl::pack_group(grp, g.nnz, g.bits, out_indices, [idx](int64_t i) { return idx[i]; });
    if (out_codes != nullptr)
      dl::pack_group(grp, g.nnz, 2, out_codes, [codes](int64_t i) { return (uint32_t)codes[i]; });
  }
}

int32_t encode(float* ef, const float* delta, float beta, const Geo& g, int32_t quantizer,
               int32_t value_dtype, int32_t index_coding, uint8_t* out_indices, void* out_values,
               float* out_centroids, int32_t num_threads) {
  const int T = thread_count(num_threads, g.numel());
  // 1. Reject a non-finite pseudo-gradient before touching ef (the reference raises first).
  uint32_t bad = 0;
  const int64_t n = g.numel();
#pragma omp parallel for num_threads(T) reduction(| : bad) schedule(dynamic, 1 << 16)
  for (int64_t i = 0; i < n; ++i) bad |= (uint32_t)(dl::abs_key(delta[i]) >= 0x7f800000u);
  if (bad) return DL_ERR_NONFINITE_DELTA;

  // 2. EF update + top-k (the only pass over the dense data).
  const int64_t group = std::max<int64_t>(1, std::min(g.nbj, kGroupCols / g.cc));
  std::vector<uint64_t> buffers((size_t)T * group * 2 * g.k_full);
  std::vector<Candidates> states((size_t)T * group);
  std::vector<uint32_t> idx((size_t)g.nnz);
  std::vector<float> val((size_t)g.nnz);
  if (!update_and_select(ef, delta, beta, g, T, idx.data(), val.data(), buffers, states))
    return DL_ERR_NONFINITE_EF;
  buffers = std::vector<uint64_t>();

  // 3.-5. Quantize the selected values, subtract what is sent, pack.
  const int Ts = thread_count(num_threads, g.nnz);
  const float* v = val.data();
  if (quantizer == DL_Q_NONE) {
    if (value_dtype == DL_V_FP32) {
      float* outv = static_cast<float*>(out_values);
      std::memcpy(outv, v, sizeof(float) * (size_t)g.nnz);
      subtract_and_pack(ef, g, Ts, idx.data(), nullptr, [v](int64_t i) { return v[i]; },
                        index_coding, out_indices, nullptr);
      return DL_OK;
    }
    uint16_t* outh = static_cast<uint16_t*>(out_values);
#pragma omp parallel for num_threads(Ts) schedule(static)
    for (int64_t i = 0; i < g.nnz; ++i) outh[i] = dl::f32_to_f16_saturated(v[i]);
    subtract_and_pack(ef, g, Ts, idx.data(), nullptr,
                      [outh](int64_t i) { return dl::f16_to_f32(outh[i]); }, index_coding,
                      out_indices, nullptr);
    return DL_OK;
  }
  std::vector<uint8_t> codes((size_t)g.nnz);
  if (quantizer == DL_Q_REFERENCE)
    quantize_reference(v, g.nnz, Ts, codes.data(), out_centroids);
  else
    quantize_symmetric(v, g.nnz, Ts, codes.data(), out_centroids);
  const uint8_t* cd = codes.data();
  subtract_and_pack(ef, g, Ts, idx.data(), cd,
                    [cd, out_centroids](int64_t i) { return out_centroids[cd[i]]; },
                    index_coding, out_indices, static_cast<uint8_t*>(out_values));
  return DL_OK;
}

// ---- decode-aggregate ----------------------------------------------------------------------
// Chunk by chunk: accumulate every part's values in list order in a chunk-sized scratch
// (count per coordinate alongside), then write the chunk's block of the output once.
int32_t decode_aggregate(const Geo& g, int64_t R, const uint8_t* const* indices,
                         const void* const* values, const float* centroids, int32_t quantizer,
                         int32_t value_dtype, int32_t index_coding, int32_t aggregation,
                         float* out, int32_t num_threads) {
  const int T = thread_count(num_threads, g.numel());
  const int64_t ibytes = dl::packed_nbytes(g.nnz, g.bits);
  const int64_t cbytes = dl::packed_nbytes(g.nnz, 2);
  const float r_f32 = (float)R;  // reference: total / float(R)
  std::vector<float> acc_all((size_t)T * g.n_full);
  std::vector<float> cnt_all((size_t)T * g.n_full);
  uint32_t bad_index = 0, bad_order = 0;
#pragma omp parallel num_threads(T) reduction(| : bad_index, bad_order)
  {
    const int t = omp_get_thread_num();
    float* acc = acc_all.data() + (size_t)t * g.n_full;
    float* cnt = cnt_all.data() + (size_t)t * g.n_full;
#pragma omp for schedule(dynamic, 16)
    for (int64_t c = 0; c < g.n_chunks; ++c) {
      const int64_t n = g.size(c), k = g.k_of(c), f0 = g.field0(c), w = g.width(c);
      std::fill(acc, acc + n, 0.0f);
      std::fill(cnt, cnt + n, 0.0f);
      for (int64_t r = 0; r < R; ++r) {
        const uint8_t* ib = indices[r];
        int64_t l = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t i = f0 + j;
          if (index_coding == DL_IDX_PACKED) {
            l = dl::read_field(ib, ibytes, i, g.bits);
          } else {
            const int64_t gap = (int64_t)ib[i] | ((int64_t)ib[g.nnz + i] << 8);
            if (j > 0 && gap == 0) bad_order = 1;
            l = j == 0 ? gap : l + gap;
          }
          if (l >= n) {
            bad_index = 1;
            continue;
          }
          float x;
          if (quantizer == DL_Q_NONE)
            x = value_dtype == DL_V_FP32 ? static_cast<const float*>(values[r])[i]
                                         : dl::f16_to_f32(static_cast<const uint16_t*>(values[r])[i]);
          else
            x = centroids[4 * r + dl::read_field(static_cast<const uint8_t*>(values[r]), cbytes, i, 2)];
          acc[l] = acc[l] + x;
          cnt[l] = cnt[l] + 1.0f;
        }
      }
      const int64_t row0 = (c / g.nbj) * g.cr, col0 = (c % g.nbj) * g.cc;
      for (int64_t rr = 0; rr < g.cr; ++rr) {
        float* o = out + (row0 + rr) * g.cols + col0;
        const float* a = acc + rr * w;
        const float* m = cnt + rr * w;
        if (aggregation == DL_AGG_MEAN_SELECTED)
          for (int64_t j = 0; j < w; ++j) o[j] = a[j] / std::max(m[j], 1.0f);
        else
          for (int64_t j = 0; j < w; ++j) o[j] = a[j] / r_f32;
      }
    }
  }
  return bad_order ? DL_ERR_INDEX_ORDER : (bad_index ? DL_ERR_INDEX : DL_OK);
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
      n_parts < 1 ||
      indices == nullptr || values == nullptr || out == nullptr ||
      (quantizer != DL_Q_NONE && centroids == nullptr) ||
      (aggregation != DL_AGG_MEAN_SELECTED && aggregation != DL_AGG_SUM_OVER_R))
    return DL_ERR_INVALID;
  for (int64_t r = 0; r < n_parts; ++r)
    if ((indices[r] == nullptr && (g.bits > 0 || index_coding == DL_IDX_GAPS)) ||
        values[r] == nullptr)
      return DL_ERR_INVALID;
  try {
    return decode_aggregate(g, n_parts, indices, values, centroids, quantizer, value_dtype,
                            index_coding, aggregation, out, num_threads);
  } catch (const std::bad_alloc&) {
    return DL_ERR_NO_MEMORY;
  }
}

}  // extern "C"
