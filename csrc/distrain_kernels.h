/* distrain kernels: C API of the SparseLoCo compression and aggregation kernels.
 *
 * Torch-free on purpose (cf. bitsandbytes): raw pointers, sizes and a cudaStream_t passed as
 * void*, integer status codes instead of exceptions, everything behind extern "C" so that
 * Python loads the libraries with ctypes. The specification is the PyTorch reference codec
 * comm/codecs/sparseloco.py (+ chunking.py, quantizers.py, bitpack.py); every function here
 * reproduces it bit for bit.
 *
 * Tensor view. Every tensor is a row-major [rows, cols] fp32 array cut into chunks of
 * [cr, cc] elements, numbered row-major over the block grid; a chunk's local index is row-major
 * inside the block. A 2-D tensor uses its own shape with cc | cols; any other tensor is
 * flattened to rows = cr = 1, where the last chunk may be shorter (cols % cc != 0). Chunk c keeps
 * k_full elements, except the last chunk, which keeps k_last. Selected elements are stored
 * chunk-major, ascending local index; chunk c's fields start at c * k_full.
 */
#ifndef DISTRAIN_KERNELS_H
#define DISTRAIN_KERNELS_H

#include <stdint.h>

#if defined(_WIN32)
#define DL_API __declspec(dllexport)
#else
#define DL_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature or struct below changes; the Python loader checks it. */
#define DL_ABI_VERSION 1

enum dl_status {
  DL_OK = 0,
  DL_ERR_INVALID = 1,          /* bad geometry, enum or pointer */
  DL_ERR_NONFINITE_DELTA = 2,  /* the pseudo-gradient holds NaN/Inf (nothing was modified) */
  DL_ERR_NONFINITE_EF = 3,     /* beta*ef + delta is NaN/Inf (ef was updated, nothing sent) */
  DL_ERR_INDEX_ORDER = 4,      /* decode, gap coding: a gap of 0 (indices not increasing) */
  DL_ERR_INDEX = 5,            /* decode: a local index is outside its chunk */
  DL_ERR_NO_MEMORY = 6,
  DL_ERR_CUDA = 7              /* a CUDA runtime call or kernel launch failed */
};

enum dl_quantizer { DL_Q_REFERENCE = 0, DL_Q_SYMMETRIC = 1, DL_Q_NONE = 2 };
enum dl_value_dtype { DL_V_FP16 = 0, DL_V_FP32 = 1 };
enum dl_aggregation { DL_AGG_MEAN_SELECTED = 0, DL_AGG_SUM_OVER_R = 1 };
/* Index buffer layout (comm/codecs/index_coding.py): fixed-width bit fields, or per-chunk gaps
 * (first = the index, then differences) as uint16 in two byte planes (all low bytes, then all
 * high bytes; 2*nnz bytes). */
enum dl_index_coding { DL_IDX_PACKED = 0, DL_IDX_GAPS = 1 };

typedef struct dl_geometry {
  int64_t rows, cols; /* row-major view of the tensor */
  int64_t cr, cc;     /* chunk block shape: rows % cr == 0; cols % cc != 0 only when rows == 1 */
  int64_t k_full;     /* kept per full chunk (1 <= k_full <= cr*cc) */
  int64_t k_last;     /* kept in the last chunk (1 <= k_last <= its size) */
  int32_t index_bits; /* packed width of a local index: ceil(log2(cr*cc)), <= 25 */
  int32_t reserved;   /* must be 0 */
} dl_geometry;

DL_API int32_t dl_abi_version(void);
/* Human-readable name of a status code (static string). */
DL_API const char* dl_status_string(int32_t status);
/* Total selected elements of a geometry, or -1 if the geometry is invalid. */
DL_API int64_t dl_nnz(const dl_geometry* geo);

/* ---- CPU (csrc/sparseloco_cpu.cpp) --------------------------------------------------------
 * encode: ef = ef*f32(beta) + delta (in place), per-chunk top-k, quantize, ef -= dequant, pack.
 *   out_indices:   packed: packed_nbytes(nnz, index_bits) bytes; gaps: 2*nnz bytes
 *   out_values:    quantizer reference/symmetric: packed 2-bit codes, packed_nbytes(nnz, 2) bytes;
 *                  quantizer none: nnz fp16 (as uint16 bits; saturated at +-65504) or fp32 values
 *   out_centroids: 4 floats (ignored, may be NULL, for quantizer none)
 * num_threads <= 0 uses the OpenMP default. */
DL_API int32_t dl_cpu_sparseloco_encode(float* ef, const float* delta, float beta,
                                        const dl_geometry* geo, int32_t quantizer,
                                        int32_t value_dtype, int32_t index_coding,
                                        uint8_t* out_indices,
                                        void* out_values, float* out_centroids,
                                        int32_t num_threads);

/* decode_aggregate: scatter n_parts contributions in list order into an fp32 sum, then divide
 * each coordinate by the number of parts that selected it (mean_selected; 0 where none did) or by
 * n_parts (sum_over_r). indices[r] / values[r] point to part r's buffers laid out as encode
 * writes them; centroids holds n_parts*4 floats (unused for quantizer none). out: rows*cols. */
DL_API int32_t dl_cpu_sparseloco_decode_aggregate(const dl_geometry* geo, int64_t n_parts,
                                                  const uint8_t* const* indices,
                                                  const void* const* values,
                                                  const float* centroids, int32_t quantizer,
                                                  int32_t value_dtype, int32_t index_coding,
                                                  int32_t aggregation, float* out,
                                                  int32_t num_threads);

/* ---- CUDA (csrc/sparseloco_cuda.cu) -------------------------------------------------------
 * Same semantics; every pointer is device memory except geo. Work is enqueued on `stream`
 * (a cudaStream_t; NULL = legacy default stream) and the call returns without synchronising:
 * the return value reports invalid arguments and launch failures only, while data errors
 * (non-finite input, bad index) land in *status (a device int32 the caller zeroes
 * first and reads after the stream work completes). Once *status is non-zero the remaining
 * kernels leave ef and the outputs untouched, so the error semantics equal the CPU ones.
 *
 * encode needs a device workspace of dl_cuda_encode_workspace_bytes(geo) bytes (any content).
 * decode_aggregate: indices/values are device arrays of n_parts device pointers, centroids is a
 * device array of n_parts*4 floats, out (rows*cols floats) and counts (rows*cols int32, needed
 * only for mean_selected) must be zero-filled by the caller. */
DL_API int64_t dl_cuda_encode_workspace_bytes(const dl_geometry* geo);
DL_API int32_t dl_cuda_sparseloco_encode(float* ef, const float* delta, float beta,
                                         const dl_geometry* geo, int32_t quantizer,
                                         int32_t value_dtype, int32_t index_coding,
                                         uint8_t* out_indices, void* out_values,
                                         float* out_centroids, void* workspace,
                                         int64_t workspace_bytes, int32_t* status, void* stream);
DL_API int32_t dl_cuda_sparseloco_decode_aggregate(const dl_geometry* geo, int64_t n_parts,
                                                   const uint8_t* const* indices,
                                                   const void* const* values,
                                                   const float* centroids, int32_t quantizer,
                                                   int32_t value_dtype, int32_t index_coding,
                                                   int32_t aggregation, float* out,
                                                   int32_t* counts, int32_t* status, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* DISTRAIN_KERNELS_H */
