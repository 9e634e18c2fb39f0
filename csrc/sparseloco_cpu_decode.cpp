// CPU (OpenMP) SparseLoCo decode-aggregate. See distrain_kernels.h.
//
// Work item = a band of chunks (cpu_util.h). Per chunk, every part's fields are decoded in list
// order and added into a chunk-sized scratch held in local-index order (in L1), with a count per
// coordinate; only the coordinates some part selected are divided (count, or R), and the
// scratch is then copied row by row into the output block, the one dense pass of the whole
// operation. The scratch is cleared again at the touched coordinates only, so no chunk pays for
// a dense fill. Summation per coordinate is in list order, starting from +0, exactly as the
// reference's index_add_ into zeros.

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <new>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_util.h"
#include "sparseloco_common.h"

namespace {

using dl::Geo;

// Field i of a packed stream: one unaligned 4-byte load away from the stream end.
inline uint32_t field_at(const uint8_t* buf, int64_t nbytes, int64_t i, int bits, uint32_t mask) {
  const int64_t pos = i * bits;
  const int64_t byte = pos >> 3;
  if (byte + 4 <= nbytes) {
    uint32_t w;
    std::memcpy(&w, buf + byte, 4);
    return (w >> (pos & 7)) & mask;
  }
  return dl::read_field(buf, nbytes, i, bits);
}

// The output is usually fresh memory (torch.empty): its first touch is a page fault per 4 KiB,
// which in a VM can cost more than the whole aggregation. Ask for transparent huge pages on the
// 2 MiB-aligned part of it; only a hint (no effect when THP is off, and nothing else changes).
void advise_huge_pages(void* p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1), e = ((uintptr_t)p + n) & ~(huge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

struct Part {
  const uint8_t* idx;
  const void* val;
  const float* cent;
};

struct Scratch {
  float* acc;     // n_full
  float* cnt;     // n_full
  int32_t* hit;   // R * k_full: local indices touched in this chunk
};

// Decode and add every part's fields of chunk c into the scratch; returns the error status.
int32_t scatter_chunk(const Geo& g, int64_t c, int64_t R, const Part* parts, int32_t quantizer,
                      int32_t value_dtype, int32_t index_coding, Scratch& s, int64_t* nhit) {
  const int64_t n = g.size(c), k = g.k_of(c), f0 = g.field0(c);
  const int64_t ibytes = dl::packed_nbytes(g.nnz, g.bits);
  const uint32_t mask = g.bits >= 32 ? 0xffffffffu : ((1u << g.bits) - 1u);
  int32_t err = DL_OK;
  int64_t h = *nhit;
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* ib = parts[r].idx;
    int64_t l = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = f0 + j;
      if (index_coding == DL_IDX_PACKED) {
        l = g.bits == 0 ? 0 : field_at(ib, ibytes, i, g.bits, mask);
      } else {
        const int64_t gap = (int64_t)ib[i] | ((int64_t)ib[g.nnz + i] << 8);
        if (j > 0 && gap == 0) err = DL_ERR_INDEX_ORDER;
        l = j == 0 ? gap : l + gap;
      }
      if (l >= n) {
        if (err == DL_OK) err = DL_ERR_INDEX;
        continue;
      }
      float x;
      if (quantizer == DL_Q_NONE) {
        x = value_dtype == DL_V_FP32 ? static_cast<const float*>(parts[r].val)[i]
                                     : dl::f16_to_f32(static_cast<const uint16_t*>(parts[r].val)[i]);
      } else {
        const uint8_t byte = static_cast<const uint8_t*>(parts[r].val)[i >> 2];
        x = parts[r].cent[(byte >> (2 * (i & 3))) & 3u];
      }
      s.acc[l] = s.acc[l] + x;
      s.cnt[l] = s.cnt[l] + 1.0f;
      s.hit[h++] = (int32_t)l;
    }
  }
  *nhit = h;
  return err;
}

}  // namespace

namespace dlcpu {

int32_t decode_aggregate(const Geo& g, int64_t R, const uint8_t* const* indices,
                         const void* const* values, const float* centroids, int32_t quantizer,
                         int32_t value_dtype, int32_t index_coding, int32_t aggregation,
                         float* out, int32_t num_threads) {
  const int T = thread_count(num_threads, g.numel());
  static thread_local Grow<float> acc_buf, cnt_buf;
  static thread_local Grow<int32_t> hit_buf;
  static thread_local Grow<Part> part_buf;
  float* acc_all = acc_buf.get((size_t)T * g.n_full);
  float* cnt_all = cnt_buf.get((size_t)T * g.n_full);
  int32_t* hit_all = hit_buf.get((size_t)T * R * g.k_full);
  Part* parts = part_buf.get((size_t)R);
  for (int64_t r = 0; r < R; ++r)
    parts[r] = Part{indices[r], values[r], quantizer == DL_Q_NONE ? nullptr : centroids + 4 * r};
  const Items items = items_of(g);
  advise_huge_pages(out, sizeof(float) * (size_t)g.numel());
  const float r_f32 = (float)R;  // reference: total / float(R)
  int32_t status = DL_OK;
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num();
    Scratch s{acc_all + (size_t)t * g.n_full, cnt_all + (size_t)t * g.n_full,
              hit_all + (size_t)t * R * g.k_full};
    std::fill(s.acc, s.acc + g.n_full, 0.0f);
    std::fill(s.cnt, s.cnt + g.n_full, 0.0f);
    int32_t err = DL_OK;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items.count; ++it) {
      const int64_t bi = it / items.ngroups;
      const int64_t bj0 = (it % items.ngroups) * items.group;
      const int64_t bj1 = std::min(g.nbj, bj0 + items.group);
      for (int64_t bj = bj0; bj < bj1; ++bj) {
        const int64_t c = bi * g.nbj + bj, w = g.width(c);
        int64_t nhit = 0;
        const int32_t e = scatter_chunk(g, c, R, parts, quantizer, value_dtype, index_coding, s,
                                        &nhit);
        if (e != DL_OK && (err == DL_OK || e == DL_ERR_INDEX_ORDER)) err = e;
        // Divide each touched coordinate once (its count is then reset, marking it done).
        for (int64_t h = 0; h < nhit; ++h) {
          const int32_t l = s.hit[h];
          const float m = s.cnt[l];
          if (m == 0.0f) continue;
          s.acc[l] = aggregation == DL_AGG_MEAN_SELECTED ? s.acc[l] / m : s.acc[l] / r_f32;
          s.cnt[l] = 0.0f;
        }
        float* o = out + (bi * g.cr) * g.cols + bj * g.cc;
        for (int64_t rr = 0; rr < g.cr; ++rr) {  // short rows: an inline loop beats memcpy calls
          float* __restrict dst = o + rr * g.cols;
          const float* __restrict src = s.acc + rr * w;
          for (int64_t j = 0; j < w; ++j) dst[j] = src[j];
        }
        for (int64_t h = 0; h < nhit; ++h) s.acc[s.hit[h]] = 0.0f;
      }
    }
    if (err != DL_OK) {
#pragma omp critical(dl_decode_status)
      if (status == DL_OK || (err == DL_ERR_INDEX_ORDER && status == DL_ERR_INDEX)) status = err;
    }
  }
  return status;
}

}  // namespace dlcpu
