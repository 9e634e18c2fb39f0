// CUDA SparseLoCo kernels: fused encode and decode-aggregate. See distrain_kernels.h.
//
// Encode, all on one stream, no host synchronisation:
//   check_delta    reject a non-finite pseudo-gradient before anything is modified
//   select         one block per chunk: EF update (fp32, no FMA) written back to ef, then a 4-pass
//                  8-bit radix select of the k-th largest |v| and an index-ordered compaction
//                  (ties to the lower local index) of the chunk's selection
//   stats/codes    per-tensor quantizer statistics over the selected values only, as fixed-shape
//                  block reductions (deterministic) in float64, rounded to fp32 where the
//                  reference rounds
//   subtract_pack  ef -= dequant(sent) and bit packing, 8 fields (byte aligned) per thread
// Every kernel returns immediately once *status is non-zero, so a data error leaves the same
// state as on the CPU. Compile with -fmad=false (the reference rounds after every operation).

#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "sparseloco_common.h"

namespace {

using dl::Geo;

constexpr int kThreads = 256;
static_assert(kThreads == 256, "select_kernel keeps one histogram bin per thread");
constexpr int kMaxReduceBlocks = 1024;
constexpr int64_t kMaxGrid = int64_t(1) << 20;

// Device-side scalars of one encode (part of the workspace).
struct Scalars {
  float shift, scale, tau;
  float centroids[dl::kLevels];
  int32_t ef_nonfinite;
};

// Byte offsets of the workspace regions (each 256-byte aligned).
struct Workspace {
  int64_t idx, val, codes, partial, pcount, scalars, total;
  int reduce_blocks;
};

inline int64_t align256(int64_t x) { return (x + 255) / 256 * 256; }

Workspace workspace_layout(const Geo& g) {
  Workspace w;
  int64_t rb = (g.nnz + kThreads * 8 - 1) / (kThreads * 8);
  w.reduce_blocks = (int)(rb < 1 ? 1 : (rb > kMaxReduceBlocks ? kMaxReduceBlocks : rb));
  int64_t off = 0;
  w.idx = off;     off = align256(off + 4 * g.nnz);
  w.val = off;     off = align256(off + 4 * g.nnz);
  w.codes = off;   off = align256(off + g.nnz);
  w.partial = off; off = align256(off + (int64_t)sizeof(double) * dl::kLevels * w.reduce_blocks);
  w.pcount = off;  off = align256(off + (int64_t)sizeof(long long) * dl::kLevels * w.reduce_blocks);
  w.scalars = off; off = align256(off + (int64_t)sizeof(Scalars));
  w.total = off;
  return w;
}

__device__ __forceinline__ void set_status(int32_t* status, int32_t code) {
  atomicCAS(status, 0, code);  // the first error wins
}

// ---- encode ---------------------------------------------------------------------------------
__global__ void check_delta_kernel(const float* __restrict__ delta, int64_t n, int32_t* status) {
  bool bad = false;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    bad |= !dl::key_is_finite(dl::abs_key(delta[i]));
  if (__syncthreads_or(bad) && threadIdx.x == 0) set_status(status, DL_ERR_NONFINITE_DELTA);
}

__global__ void __launch_bounds__(kThreads)
select_kernel(float* ef, const float* __restrict__ delta, float beta, Geo g,
              uint32_t* __restrict__ out_idx, float* __restrict__ out_val, Scalars* sc,
              const int32_t* status) {
  if (*status != 0) return;  // written by check_delta_kernel, before this launch
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ unsigned int hist[256];
  __shared__ unsigned int s_prefix, s_need;
  const int tid = threadIdx.x, lane = tid & 31;
  bool nonfinite = false;

  for (int64_t c = blockIdx.x; c < g.n_chunks; c += gridDim.x) {
    const int64_t w = g.width(c), n = g.cr * w, k = g.k_of(c), f0 = g.field0(c);

    // 1. e = ef*beta + delta, one rounding per operation.
    for (int64_t l = tid; l < n; l += kThreads) {
      const int64_t gi = g.global(c, l, w);
      const float e = __fadd_rn(__fmul_rn(ef[gi], beta), delta[gi]);
      ef[gi] = e;
      nonfinite |= !dl::key_is_finite(dl::abs_key(e));
    }
    __syncthreads();  // ef of this chunk is complete (global memory, same block)

    // 2. Radix select: the k-th largest key T and how many keys equal to T are needed.
    unsigned int prefix = 0, pmask = 0, need = (unsigned int)k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[tid] = 0;  // kThreads == 256 bins
      __syncthreads();
      for (int64_t base = 0; base < n; base += kThreads) {  // uniform trip count per warp
        const int64_t l = base + tid;
        unsigned int bin = 0xffffffffu;
        if (l < n) {
          const uint32_t key = dl::abs_key(ef[g.global(c, l, w)]);
          if ((key & pmask) == prefix) bin = (key >> shift) & 0xffu;
        }
        const unsigned int peers = __match_any_sync(0xffffffffu, bin);
        if (bin != 0xffffffffu && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
      }
      __syncthreads();
      if (tid < 32) {  // warp 0: find the bin holding the need-th largest candidate
        unsigned int h[8], s = 0;
        for (int j = 0; j < 8; ++j) {
          h[j] = hist[255 - 8 * lane - j];
          s += h[j];
        }
        unsigned int incl = s;
        for (int off = 1; off < 32; off <<= 1) {
          const unsigned int y = __shfl_up_sync(0xffffffffu, incl, off);
          if (lane >= off) incl += y;
        }
        const unsigned int excl = incl - s;
        if (excl < need && need <= incl) {
          unsigned int cum = excl;
          for (int j = 0; j < 8; ++j) {
            if (cum + h[j] >= need) {
              s_prefix = prefix | ((unsigned int)(255 - 8 * lane - j) << shift);
              s_need = need - cum;
              break;
            }
            cum += h[j];
          }
        }
      }
      __syncthreads();
      prefix = s_prefix;
      need = s_need;
      pmask |= 0xffu << shift;
      __syncthreads();  // s_prefix / s_need / hist are rewritten in the next pass
    }
    const uint32_t T = prefix;  // keys > T are all kept; `need` keys == T, lowest index first

    // 3. Compaction in ascending local index.
    int sel_base = 0, eq_base = 0;
    for (int64_t base = 0; base < n && sel_base < k; base += kThreads) {
      const int64_t l = base + tid;
      float e = 0.0f;
      uint32_t key = 0;
      if (l < n) {
        e = ef[g.global(c, l, w)];
        key = dl::abs_key(e);
      }
      const int gt = (l < n && key > T) ? 1 : 0;
      const int eq = (l < n && key == T) ? 1 : 0;
      int eq_rank, eq_total;
      Scan(scan_tmp).ExclusiveSum(eq, eq_rank, eq_total);
      __syncthreads();
      const int sel = (gt || (eq && (unsigned int)(eq_base + eq_rank) < need)) ? 1 : 0;
      int pos, sel_total;
      Scan(scan_tmp).ExclusiveSum(sel, pos, sel_total);
      __syncthreads();
      if (sel) {
        out_idx[f0 + sel_base + pos] = (uint32_t)l;
        out_val[f0 + sel_base + pos] = e;
      }
      sel_base += sel_total;
      eq_base += eq_total;
    }
    __syncthreads();
  }
  if (__syncthreads_or(nonfinite) && tid == 0) atomicExch(&sc->ef_nonfinite, 1);
}

__global__ void merge_ef_flag_kernel(const Scalars* sc, int32_t* status) {
  if (*status == 0 && sc->ef_nonfinite) *status = DL_ERR_NONFINITE_EF;
}

enum SumOp { SUM_V = 0, SUM_SQDEV = 1, SUM_ABS = 2 };

// partial[b] = Σ op(v[i]) over block b's contiguous range (fixed order: deterministic).
__global__ void __launch_bounds__(kThreads)
partial_sum_kernel(const float* __restrict__ v, int64_t m, int op, const Scalars* sc,
                   double* partial, const int32_t* status) {
  if (*status != 0) return;
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t lo = m * blockIdx.x / gridDim.x, hi = m * (blockIdx.x + 1) / gridDim.x;
  const double shift = (double)sc->shift;
  double s = 0.0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const double x = (double)v[i];
    if (op == SUM_V) {
      s += x;
    } else if (op == SUM_SQDEV) {
      const double d = x - shift;
      s += d * d;
    } else {
      s += fabs(x);
    }
  }
  const double total = Reduce(tmp).Sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// Reduce the partials of partial_sum_kernel (one block) and derive a quantizer scalar.
__global__ void __launch_bounds__(kThreads)
scalar_kernel(const double* partial, int nparts, int op, int64_t m, Scalars* sc,
              const int32_t* status) {
  if (*status != 0) return;
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  double s = 0.0;
  for (int i = threadIdx.x; i < nparts; i += kThreads) s += partial[i];
  const double total = Reduce(tmp).Sum(s);
  if (threadIdx.x == 0) {
    if (op == SUM_V) sc->shift = dl::ref_shift(total, m);
    else if (op == SUM_SQDEV) sc->scale = dl::ref_scale(total, m);
    else sc->tau = dl::sym_tau(total, m);
  }
}

// Codes of the selected values plus per-level float64 sums and counts per block.
__global__ void __launch_bounds__(kThreads)
codes_kernel(const float* __restrict__ v, int64_t m, int quantizer, const Scalars* sc,
             uint8_t* __restrict__ codes, double* partial, long long* pcount,
             const int32_t* status) {
  if (*status != 0) return;
  using RD = cub::BlockReduce<double, kThreads>;
  using RL = cub::BlockReduce<long long, kThreads>;
  __shared__ typename RD::TempStorage tmp_d;
  __shared__ typename RL::TempStorage tmp_l;
  const int64_t lo = m * blockIdx.x / gridDim.x, hi = m * (blockIdx.x + 1) / gridDim.x;
  const float shift = sc->shift, scale = sc->scale, tau = sc->tau;
  double s[dl::kLevels] = {0.0, 0.0, 0.0, 0.0};
  long long cnt[dl::kLevels] = {0, 0, 0, 0};
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const float x = v[i];
    uint32_t c;
    int bin;
    double wgt;
    if (quantizer == DL_Q_REFERENCE) {
      c = dl::code_reference(x, shift, scale);
      bin = (int)c;
      wgt = (double)x;
    } else {
      c = dl::code_symmetric(x, tau);
      bin = (c == 0 || c == 3) ? 1 : 0;  // 0: small magnitude, 1: big
      wgt = fabs((double)x);
    }
    codes[i] = (uint8_t)c;
    for (int b = 0; b < dl::kLevels; ++b) {  // unrolled: no dynamic register indexing
      s[b] += (b == bin) ? wgt : 0.0;
      cnt[b] += (b == bin) ? 1 : 0;
    }
  }
  for (int b = 0; b < dl::kLevels; ++b) {
    const double ts = RD(tmp_d).Sum(s[b]);
    const long long tc = RL(tmp_l).Sum(cnt[b]);
    if (threadIdx.x == 0) {
      partial[blockIdx.x * dl::kLevels + b] = ts;
      pcount[blockIdx.x * dl::kLevels + b] = tc;
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads)
centroids_kernel(const double* partial, const long long* pcount, int nparts, int quantizer,
                 Scalars* sc, float* out_centroids, const int32_t* status) {
  if (*status != 0) return;
  using RD = cub::BlockReduce<double, kThreads>;
  using RL = cub::BlockReduce<long long, kThreads>;
  __shared__ typename RD::TempStorage tmp_d;
  __shared__ typename RL::TempStorage tmp_l;
  __shared__ double sums[dl::kLevels];
  __shared__ long long counts[dl::kLevels];
  for (int b = 0; b < dl::kLevels; ++b) {
    double s = 0.0;
    long long n = 0;
    for (int i = threadIdx.x; i < nparts; i += kThreads) {
      s += partial[i * dl::kLevels + b];
      n += pcount[i * dl::kLevels + b];
    }
    const double ts = RD(tmp_d).Sum(s);
    const long long tc = RL(tmp_l).Sum(n);
    if (threadIdx.x == 0) {
      sums[b] = ts;
      counts[b] = tc;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float cent[dl::kLevels];
    if (quantizer == DL_Q_REFERENCE) {
      for (int c = 0; c < dl::kLevels; ++c)
        cent[c] = dl::ref_centroid(c, sums[c], counts[c], sc->shift, sc->scale);
    } else {
      dl::sym_centroids(sums[0], counts[0], sums[1], counts[1], sc->tau, cent);
    }
    for (int c = 0; c < dl::kLevels; ++c) {
      sc->centroids[c] = cent[c];
      out_centroids[c] = cent[c];
    }
  }
}

// Quantizer "none": the values as sent (fp16 saturates at ±65504 like the reference).
__global__ void values_kernel(const float* __restrict__ v, int64_t m, int value_dtype,
                              void* out_values, const int32_t* status) {
  if (*status != 0) return;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < m;
       i += (int64_t)gridDim.x * blockDim.x) {
    if (value_dtype == DL_V_FP32)
      static_cast<float*>(out_values)[i] = v[i];
    else
      static_cast<uint16_t*>(out_values)[i] = dl::f32_to_f16_saturated(v[i]);
  }
}

__global__ void subtract_pack_kernel(float* ef, Geo g, int quantizer, int value_dtype,
                                     int index_coding, const uint32_t* __restrict__ idx,
                                     const float* __restrict__ val,
                                     const uint8_t* __restrict__ codes, const void* out_values,
                                     const Scalars* sc, uint8_t* __restrict__ out_indices,
                                     uint8_t* __restrict__ out_codes, const int32_t* status) {
  if (*status != 0) return;
  float cent[dl::kLevels];
  for (int c = 0; c < dl::kLevels; ++c) cent[c] = sc->centroids[c];
  const int64_t ngroups = (g.nnz + 7) / 8;
  for (int64_t grp = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; grp < ngroups;
       grp += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i1 = 8 * grp + 8 < g.nnz ? 8 * grp + 8 : g.nnz;
    for (int64_t i = 8 * grp; i < i1; ++i) {
      float dq;
      if (quantizer != DL_Q_NONE) {
        const uint32_t c = codes[i];
        dq = c == 0 ? cent[0] : c == 1 ? cent[1] : c == 2 ? cent[2] : cent[3];
      } else if (value_dtype == DL_V_FP16) {
        dq = dl::f16_to_f32(static_cast<const uint16_t*>(out_values)[i]);
      } else {
        dq = val[i];
      }
      const int64_t c = g.chunk_of_field(i);
      const int64_t gi = g.global(c, idx[i], g.width(c));
      ef[gi] = __fsub_rn(ef[gi], dq);
      if (index_coding == DL_IDX_GAPS) {
        const uint32_t gap = dl::gap_of(idx, i, g.field0(c));
        out_indices[i] = (uint8_t)(gap & 0xffu);
        out_indices[g.nnz + i] = (uint8_t)(gap >> 8);
      }
    }
    if (index_coding == DL_IDX_PACKED)
      dl::pack_group(grp, g.nnz, g.bits, out_indices, [idx](int64_t i) { return idx[i]; });
    if (quantizer != DL_Q_NONE)
      dl::pack_group(grp, g.nnz, 2, out_codes, [codes](int64_t i) { return (uint32_t)codes[i]; });
  }
}

// ---- decode-aggregate ------------------------------------------------------------------------
// One launch per part, in list order, one thread per chunk walking its fields in order (the gap
// coding is a running sum). Within a part every coordinate appears at most once (for validated
// payloads), so plain read-modify-writes are race free and the per-coordinate summation order is
// the reference's.
__global__ void scatter_part_kernel(Geo g, const uint8_t* const* indices, const void* const* values,
                                    const float* centroids, int64_t r, int quantizer,
                                    int value_dtype, int index_coding, float* __restrict__ out,
                                    int32_t* __restrict__ counts, int32_t* status) {
  const uint8_t* ib = indices[r];
  const void* vb = values[r];
  const int64_t ibytes = dl::packed_nbytes(g.nnz, g.bits);
  const int64_t cbytes = dl::packed_nbytes(g.nnz, 2);
  int32_t err = 0;
  for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < g.n_chunks;
       c += (int64_t)gridDim.x * blockDim.x) {
    const int64_t w = g.width(c), n = g.cr * w, k = g.k_of(c), f0 = g.field0(c);
    int64_t l = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = f0 + j;
      if (index_coding == DL_IDX_PACKED) {
        l = dl::read_field(ib, ibytes, i, g.bits);
      } else {
        const int64_t gap = (int64_t)ib[i] | ((int64_t)ib[g.nnz + i] << 8);
        if (j > 0 && gap == 0) err = DL_ERR_INDEX_ORDER;
        l = j == 0 ? gap : l + gap;
      }
      if (l >= n) {
        if (err == 0) err = DL_ERR_INDEX;
        continue;
      }
      float x;
      if (quantizer == DL_Q_NONE)
        x = value_dtype == DL_V_FP32 ? static_cast<const float*>(vb)[i]
                                     : dl::f16_to_f32(static_cast<const uint16_t*>(vb)[i]);
      else
        x = centroids[4 * r + dl::read_field(static_cast<const uint8_t*>(vb), cbytes, i, 2)];
      const int64_t gi = g.global(c, l, w);
      out[gi] = __fadd_rn(out[gi], x);
      if (counts != nullptr) counts[gi] += 1;
    }
  }
  if (err != 0) set_status(status, err);
}

__global__ void finalize_kernel(float* __restrict__ out, const int32_t* __restrict__ counts,
                                int64_t n, int aggregation, float r_f32) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    if (aggregation == DL_AGG_MEAN_SELECTED)
      out[i] = __fdiv_rn(out[i], fmaxf((float)counts[i], 1.0f));
    else
      out[i] = __fdiv_rn(out[i], r_f32);
  }
}

int grid_for(int64_t work, int64_t per_block) {
  int64_t b = (work + per_block - 1) / per_block;
  return (int)(b < 1 ? 1 : (b > kMaxGrid ? kMaxGrid : b));
}

int32_t launch_ok() { return cudaGetLastError() == cudaSuccess ? DL_OK : DL_ERR_CUDA; }

}  // namespace

extern "C" {

DL_API int32_t dl_abi_version(void) { return DL_ABI_VERSION; }

DL_API const char* dl_status_string(int32_t status) { return dl::status_string(status); }

DL_API int64_t dl_cuda_encode_workspace_bytes(const dl_geometry* geo) {
  Geo g;
  if (!dl::make_geo(geo, &g)) return -1;
  return workspace_layout(g).total;
}

DL_API int32_t dl_cuda_sparseloco_encode(float* ef, const float* delta, float beta,
                                         const dl_geometry* geo, int32_t quantizer,
                                         int32_t value_dtype, int32_t index_coding,
                                         uint8_t* out_indices, void* out_values,
                                         float* out_centroids, void* workspace,
                                         int64_t workspace_bytes, int32_t* status, void* stream) {
  Geo g;
  if (!dl::make_geo(geo, &g) || !dl::valid_enums(quantizer, value_dtype, index_coding) ||
      ef == nullptr || delta == nullptr || out_values == nullptr || status == nullptr ||
      workspace == nullptr ||
      (out_indices == nullptr && (g.bits > 0 || index_coding == DL_IDX_GAPS)) ||
      (quantizer != DL_Q_NONE && out_centroids == nullptr))
    return DL_ERR_INVALID;
  const Workspace w = workspace_layout(g);
  if (workspace_bytes < w.total) return DL_ERR_INVALID;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  char* ws = static_cast<char*>(workspace);
  uint32_t* idx = reinterpret_cast<uint32_t*>(ws + w.idx);
  float* val = reinterpret_cast<float*>(ws + w.val);
  uint8_t* codes = reinterpret_cast<uint8_t*>(ws + w.codes);
  double* partial = reinterpret_cast<double*>(ws + w.partial);
  long long* pcount = reinterpret_cast<long long*>(ws + w.pcount);
  Scalars* sc = reinterpret_cast<Scalars*>(ws + w.scalars);
  if (cudaMemsetAsync(sc, 0, sizeof(Scalars), s) != cudaSuccess) return DL_ERR_CUDA;

  const int64_t n = g.numel();
  check_delta_kernel<<<grid_for(n, 4 * kThreads), kThreads, 0, s>>>(delta, n, status);
  select_kernel<<<grid_for(g.n_chunks, 1), kThreads, 0, s>>>(ef, delta, beta, g, idx, val, sc,
                                                              status);
  merge_ef_flag_kernel<<<1, 1, 0, s>>>(sc, status);
  const int rb = w.reduce_blocks;
  if (quantizer == DL_Q_REFERENCE) {
    partial_sum_kernel<<<rb, kThreads, 0, s>>>(val, g.nnz, SUM_V, sc, partial, status);
    scalar_kernel<<<1, kThreads, 0, s>>>(partial, rb, SUM_V, g.nnz, sc, status);
    partial_sum_kernel<<<rb, kThreads, 0, s>>>(val, g.nnz, SUM_SQDEV, sc, partial, status);
    scalar_kernel<<<1, kThreads, 0, s>>>(partial, rb, SUM_SQDEV, g.nnz, sc, status);
  } else if (quantizer == DL_Q_SYMMETRIC) {
    partial_sum_kernel<<<rb, kThreads, 0, s>>>(val, g.nnz, SUM_ABS, sc, partial, status);
    scalar_kernel<<<1, kThreads, 0, s>>>(partial, rb, SUM_ABS, g.nnz, sc, status);
  }
  if (quantizer == DL_Q_NONE) {
    values_kernel<<<grid_for(g.nnz, kThreads), kThreads, 0, s>>>(val, g.nnz, value_dtype,
                                                                  out_values, status);
  } else {
    codes_kernel<<<rb, kThreads, 0, s>>>(val, g.nnz, quantizer, sc, codes, partial, pcount,
                                         status);
    centroids_kernel<<<1, kThreads, 0, s>>>(partial, pcount, rb, quantizer, sc, out_centroids,
                                            status);
  }
  subtract_pack_kernel<<<grid_for((g.nnz + 7) / 8, kThreads), kThreads, 0, s>>>(
      ef, g, quantizer, value_dtype, index_coding, idx, val, codes, out_values, sc, out_indices,
      quantizer == DL_Q_NONE ? nullptr : static_cast<uint8_t*>(out_values), status);
  return launch_ok();
}

DL_API int32_t dl_cuda_sparseloco_decode_aggregate(const dl_geometry* geo, int64_t n_parts,
                                                   const uint8_t* const* indices,
                                                   const void* const* values,
                                                   const float* centroids, int32_t quantizer,
                                                   int32_t value_dtype, int32_t index_coding,
                                                   int32_t aggregation, float* out,
                                                   int32_t* counts, int32_t* status,
                                                   void* stream) {
  Geo g;
  if (!dl::make_geo(geo, &g) || !dl::valid_enums(quantizer, value_dtype, index_coding) ||
      n_parts < 1 ||
      indices == nullptr || values == nullptr || out == nullptr || status == nullptr ||
      (quantizer != DL_Q_NONE && centroids == nullptr) ||
      (aggregation != DL_AGG_MEAN_SELECTED && aggregation != DL_AGG_SUM_OVER_R) ||
      (aggregation == DL_AGG_MEAN_SELECTED && counts == nullptr))
    return DL_ERR_INVALID;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int32_t* cnt = aggregation == DL_AGG_MEAN_SELECTED ? counts : nullptr;
  for (int64_t r = 0; r < n_parts; ++r) {
    scatter_part_kernel<<<grid_for(g.n_chunks, kThreads), kThreads, 0, s>>>(
        g, indices, values, centroids, r, quantizer, value_dtype, index_coding, out, cnt, status);
    if (cudaPeekAtLastError() != cudaSuccess) return launch_ok();
  }
  finalize_kernel<<<grid_for(g.numel(), 4 * kThreads), kThreads, 0, s>>>(
      out, cnt, g.numel(), aggregation, (float)n_parts);
  return launch_ok();
}

}  // extern "C"
