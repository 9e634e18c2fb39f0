/* Helpers shared by the CPU kernel sources: thread counts, reusable scratch, work items. */
#ifndef DISTRAIN_CPU_UTIL_H
#define DISTRAIN_CPU_UTIL_H

#include <omp.h>

#include <algorithm>
#include <memory>
#include <stdint.h>

#include "sparseloco_common.h"

/* Hot loops compiled twice, for AVX2 and for baseline x86-64, picked once at load time (GCC
 * ifunc): the library stays portable and still uses 256-bit vectors where the CPU has them. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DL_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DL_CPU_CLONES
#endif

namespace dlcpu {

constexpr int64_t kMinWorkPerThread = 1 << 15;  // elements; below this a thread costs more than it saves
constexpr int64_t kItemElems = 1 << 16;         // dense elements per work item (~256 KiB of fp32)
constexpr int64_t kFieldBlock = 4096;           // selected fields per statistics/packing block (multiple of 8)

inline int thread_count(int32_t requested, int64_t work) {
  int64_t t = requested > 0 ? requested : omp_get_max_threads();
  t = std::min<int64_t>(t, std::max<int64_t>(1, work / kMinWorkPerThread));
  return (int)std::max<int64_t>(1, t);
}

/* A grow-only buffer: allocated on first use, reused by later calls from the same thread (no
 * page faults and no zero-filling of fresh memory on every call). */
template <typename T>
struct Grow {
  std::unique_ptr<T[]> p;
  size_t n = 0;
  T* get(size_t want) {
    if (want > n) {
      p.reset(new T[want]);
      n = want;
    }
    return p.get();
  }
};

/* Work items: a band of cr rows (one block row) times a run of `group` adjacent chunk columns, so
 * that a worker streams whole row segments (good prefetching) and a band stays in L2 while its
 * chunks are selected. */
struct Items {
  int64_t group, ngroups, count;
};
inline Items items_of(const dl::Geo& g) {
  Items it;
  const int64_t cols_per_item = std::max<int64_t>(g.cc, kItemElems / g.cr);
  it.group = std::max<int64_t>(1, std::min<int64_t>(g.nbj, cols_per_item / g.cc));
  it.ngroups = (g.nbj + it.group - 1) / it.group;
  it.count = (g.rows / g.cr) * it.ngroups;
  return it;
}

/* Decode-aggregate entry (csrc/sparseloco_cpu_decode.cpp). */
int32_t decode_aggregate(const dl::Geo& g, int64_t R, const uint8_t* const* indices,
                         const void* const* values, const float* centroids, int32_t quantizer,
                         int32_t value_dtype, int32_t index_coding, int32_t aggregation,
                         float* out, int32_t num_threads);

}  // namespace dlcpu

#endif  // DISTRAIN_CPU_UTIL_H
