/* FBGEMM's float16 GEMM (the one torch.ops.quantized.linear_dynamic_fp16 runs) on weights packed by us.
 *
 * torch packs a weight with FBGEMM's element-by-element packer (tens of seconds for a 1B model); the
 * layout is plain block arithmetic (FbgemmPackMatrixB.h, `addr`), so engine/execution/packed_linear.py
 * lays it out with a few tensor copies, or maps it from a cache file, and this file hands that memory to
 * FBGEMM's own kernel through its pmat-taking constructor. The kernel and its arguments are torch's
 * (beta 0, one task a thread, the bias added afterwards by the caller), so the results are its bits.
 *
 * Built against the FBGEMM headers and library that torch ships (engine/execution/kernels.py).
 */
#include <fbgemm/FbgemmFP16.h>
#include <omp.h>

#include <cstdint>
#include <new>

using fbgemm::PackedGemmMatrixFP16;

extern "C" {

/* The column block width of FBGEMM's packed layout on this CPU (it picks AVX-512 or AVX2 kernels). */
int fp16_block_cols(void) {
    const int lanes = fbgemm::isZmm(fbgemm::fbgemmInstructionSet())
                          ? fbgemm::simd_info<fbgemm::inst_set_t::avx512>::WIDTH_32BIT_ELEMS
                          : fbgemm::simd_info<fbgemm::inst_set_t::avx2>::WIDTH_32BIT_ELEMS;
    return lanes * 2; /* kernel_ncol_blocks: FBGEMM's default, what its own packer uses */
}

/* A packed matrix of k rows (inputs) and n columns (outputs) over `pmat`, which the caller keeps alive
 * (FBGEMM neither copies nor frees it); NULL if it cannot be allocated. */
void *fp16_matrix(int k, int n, int brow, int bcol, void *pmat) {
    const int nbrow = (k + brow - 1) / brow, nbcol = (n + bcol - 1) / bcol;
    const int last_brow = k % brow == 0 ? brow : k % brow;
    const uint64_t size = static_cast<uint64_t>(brow) * nbrow * bcol * nbcol;
    return new (std::nothrow) PackedGemmMatrixFP16(k, n, brow, last_brow, bcol, nbrow, nbcol, size, 2, pmat);
}

void fp16_matrix_free(void *matrix) { delete static_cast<PackedGemmMatrixFP16 *>(matrix); }

/* c [m, n] = a [m, k] times the packed matrix, on `threads` threads (torch's task split); 0, or -1 if FBGEMM
 * threw (an exception must not cross this C boundary, nor leave an OpenMP region). */
int fp16_gemm(const float *a, int m, const void *matrix, float *c, int threads) {
    const auto &packed = *static_cast<const PackedGemmMatrixFP16 *>(matrix);
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)
    for (int task = 0; task < threads; task++) {
        try {
            fbgemm::cblas_gemm_compute(fbgemm::matrix_op_t::NoTranspose, m, a, packed, 0.0f, c, task, threads);
        } catch (...) {
            failed |= 1;
        }
    }
    return failed ? -1 : 0;
}
}
