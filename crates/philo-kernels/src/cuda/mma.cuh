// Tensor-core building blocks shared by philo's kernels: mma.sync m16n8k16 (bf16 or f16 inputs,
// f32 accumulation), ldmatrix fragment loads from shared memory, cp.async copies and vector
// atomics. Fragment layouts are the PTX ISA's for m16n8k16: lane = 4·g + t holds A rows g and
// g + 8, B column g, C rows g and g + 8 at columns 2t and 2t + 1.
#pragma once
#include "common.cuh"

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

// ldmatrix: each lane passes the shared-memory address of one 8-element row of one of the 2 or
// 4 8×8 matrices (lanes 8i .. 8i + 7: matrix i); `trans` loads each matrix transposed.
template <bool trans>
__device__ __forceinline__ void ldsm_x4(const void* p, uint32_t* r) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    if constexpr (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
}
template <bool trans>
__device__ __forceinline__ void ldsm_x2(const void* p, uint32_t* r) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    if constexpr (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(addr));
}

// A fragments (16 × 16) of a row-major [m][k] tile from `row0` (row stride ld).
template <typename T>
__device__ __forceinline__ void load_a_x4(const T* row0, int ld, uint32_t* a) {
    int lane = threadIdx.x % 32;
    ldsm_x4<false>(row0 + (lane % 16) * ld + (lane / 16) * 8, a);
}

// A fragments (16 × 16) of the transpose of a row-major [k][m] tile: A[m][k] = tile[k][m], from
// `k0m0` (element (k0, m0)), row stride ld.
template <typename T>
__device__ __forceinline__ void load_at_x4(const T* k0m0, int ld, uint32_t* a) {
    int lane = threadIdx.x % 32, mi = lane / 8;
    ldsm_x4<true>(k0m0 + ((mi / 2) * 8 + lane % 8) * ld + (mi % 2) * 8, a);
}

// B fragment (k16 × n8) of a row-major [k][n] tile: `row0` points at element (k0, n0); `ld` is
// the row stride in elements.
template <typename T>
__device__ __forceinline__ void load_b_trans(const T* row0, int ld, uint32_t& b0, uint32_t& b1) {
    int lane = threadIdx.x % 32;
    uint32_t r[2];
    ldsm_x2<true>(row0 + (lane % 16) * ld, r);
    b0 = r[0];
    b1 = r[1];
}

// Two B fragments at once, for the n8 tiles n0 and n0 + 8 of a row-major [k][n] tile (k16 rows
// from `row0`): (b[0], b[1]) for n0, (b[2], b[3]) for n0 + 8.
template <typename T>
__device__ __forceinline__ void load_b_trans_x4(const T* row0, int ld, uint32_t* b) {
    int lane = threadIdx.x % 32, mi = lane / 8;
    ldsm_x4<true>(row0 + ((mi & 1) * 8 + lane % 8) * ld + (mi >> 1) * 8, b);
}

// B fragments of Xᵀ for a row-major [n][k] tile X (the "col" operand of m16n8k16 is X itself):
// for the 8 rows from `row0` and the k columns k0 .. k0 + 32, (b[0], b[1]) cover k0 .. k0 + 16
// and (b[2], b[3]) k0 + 16 .. k0 + 32.
template <typename T>
__device__ __forceinline__ void load_bt_x4(const T* row0, int ld, uint32_t* b) {
    int lane = threadIdx.x % 32;
    ldsm_x4<false>(row0 + (lane % 8) * ld + (lane / 8) * 8, b);
}

// The same for 16 columns: (b[0], b[1]) cover k0 .. k0 + 16.
template <typename T>
__device__ __forceinline__ void load_bt_x2(const T* row0, int ld, uint32_t* b) {
    int lane = threadIdx.x % 32;
    ldsm_x2<false>(row0 + (lane % 8) * ld + ((lane / 8) % 2) * 8, b);
}

// acc[m·NJ + j] (16 × 8) += A_m (16 × D, fragments a[m·(D / 16) + kc]) · X_jᵀ for m < MT and
// j < NJ, X_j being the 8 rows of X from `x + j·8·ld` (X a row-major [n][D] tile in shared
// memory with row stride `ld`). Each B fragment loaded from shared memory serves the MT row
// tiles. The k chunks (two at a time) are the outer loop: an MMA waits on at most the one
// before it, and the other warps of the SM fill that gap.
template <typename T, int D, int NJ, int MT = 1>
__device__ __forceinline__ void mma_a_xt(float (*acc)[4], const uint32_t (*a)[4], const T* x, int ld) {
    if constexpr ((D / 16) % 2 == 0) {
#pragma unroll
        for (int kc = 0; kc < D / 16; kc += 2) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                uint32_t b[4];
                load_bt_x4<T>(x + j * 8 * ld + kc * 16, ld, b);
                // Every row tile's first half before any second half: an MMA's accumulator
                // was last written MT MMAs ago.
#pragma unroll
                for (int m = 0; m < MT; ++m) Mma<T>::run(acc[m * NJ + j], a[m * (D / 16) + kc], b[0], b[1]);
#pragma unroll
                for (int m = 0; m < MT; ++m) Mma<T>::run(acc[m * NJ + j], a[m * (D / 16) + kc + 1], b[2], b[3]);
            }
        }
    } else {
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                uint32_t b[2];
                load_bt_x2<T>(x + j * 8 * ld + kc * 16, ld, b);
#pragma unroll
                for (int m = 0; m < MT; ++m) Mma<T>::run(acc[m * NJ + j], a[m * (D / 16) + kc], b[0], b[1]);
            }
        }
    }
}

// Adds (v0, v1) to p[0], p[1] (8-byte aligned): one vector atomic on Hopper, two before.
__device__ __forceinline__ void atomic_add2(float* p, float v0, float v1) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(v0, v1));
#else
    atomicAdd(p, v0);
    atomicAdd(p + 1, v1);
#endif
}

__device__ __forceinline__ uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// 16-byte asynchronous copy global → shared; with `valid` false the destination is zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

