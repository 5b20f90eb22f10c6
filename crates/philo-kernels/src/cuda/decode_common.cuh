// Device helpers shared by the decode step's kernels (decode.cu) and the persistent kernel of
// its decoder layers (decode_layers.cu): the GEMV's input staging and epilogue, and the
// tensor-core GEMV's weight unpacking.
#pragma once
#include "mma.cuh"
#include "nf4_code.cuh"

// Rows of x a GEMV takes (sequences decoded together, or one sequence's verify rows): the
// tensor-core GEMV's mma has 16 input rows, of which it fills the first 8.
constexpr int MAXM = 8;
// Output rows one thread group computes: each x chunk read from shared memory serves R rows.
constexpr int R = 4;
// Elements of padding after each staged input row (16 bytes): rows of 3,072 or 8,192 would
// otherwise all start at the same shared-memory bank, and the tensor-core GEMV's lanes, which
// read the same columns of up to 8 rows at once, would conflict 8 ways (a step of 8 rows took
// 1.8x one of 1 row on the H200).
constexpr int XPAD = 8;

enum InputMode { IN_PLAIN = 0, IN_RMSNORM = 1, IN_SWIGLU = 2 };
enum Format { F_DENSE = 0, F_INT8 = 1, F_INT4 = 2, F_NF4 = 3 };

// Weights one 16-byte chunk of a row holds.
template <typename T, int FMT> struct Chunk;
template <typename T> struct Chunk<T, F_DENSE> { static constexpr int E = 16 / sizeof(T); };
template <typename T> struct Chunk<T, F_INT8> { static constexpr int E = 16; };
template <typename T> struct Chunk<T, F_INT4> { static constexpr int E = 32; };
template <typename T> struct Chunk<T, F_NF4> { static constexpr int E = 32; };

// Weights q·8 … q·8 + 7 of a chunk as floats (before any scale).
template <typename T, int FMT>
__device__ __forceinline__ void unpack8(const uint4& v, int q, float (&wf)[8], const float* nf4) {
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&v);
    if constexpr (FMT == F_DENSE) {
        const T* t = reinterpret_cast<const T*>(&v) + q * 8;
#pragma unroll
        for (int j = 0; j < 8; ++j) wf[j] = to_f32(t[j]);
    } else if constexpr (FMT == F_INT8) {
        // Codes are stored + 128.
#pragma unroll
        for (int j = 0; j < 8; ++j) wf[j] = (float)b[q * 8 + j] - 128.f;
    } else if constexpr (FMT == F_INT4) {
        // Even element in the low nibble, codes + 8.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            wf[2 * j] = (float)(b[q * 4 + j] & 15) - 8.f;
            wf[2 * j + 1] = (float)(b[q * 4 + j] >> 4) - 8.f;
        }
    } else {
        // bitsandbytes: first element in the high nibble.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            wf[2 * j] = nf4[b[q * 4 + j] >> 4];
            wf[2 * j + 1] = nf4[b[q * 4 + j] & 15];
        }
    }
}

// How a GEMV finds its weights' scales.
struct Scales {
    // INT8: absmax per row (× 1/127). INT4: per (row, group). NF4: per 64-block when plain.
    const float* s;
    // INT4 group length.
    int group;
    // NF4 double quantisation: scale = code2[q2[block]] · absmax2[block / block2] + offset2.
    const uint8_t* q2;
    const float* code2;
    const float* absmax2;
    float offset2;
    int block2;
};

// Scale of the chunk starting at column `col` of `row`, for the formats that scale per chunk.
template <int FMT>
__device__ __forceinline__ float chunk_scale(const Scales& sc, int row, int col, int k) {
    if constexpr (FMT == F_INT4) {
        return sc.s[(size_t)row * (k / sc.group) + col / sc.group];
    } else if constexpr (FMT == F_NF4) {
        size_t block = ((size_t)row * k + col) / 64;
        if (sc.q2 == nullptr) return sc.s[block];
        // Each step rounded to f32 as bitsandbytes does.
        return __fadd_rn(__fmul_rn(sc.code2[sc.q2[block]], sc.absmax2[block / sc.block2]), sc.offset2);
    } else {
        return 1.f;
    }
}

// 16-byte vectors of a staged row each thread holds: rows of up to 4 · 8 · blockDim.x elements
// (8,192 with 256 threads). All of a thread's loads are issued before any use: the staging is
// a prologue every block waits for, so it must cost one memory round trip, not one per element.
constexpr int VPT = 4;

// Stages the GEMV's input rows in shared memory as T, transformed as the layer wants them:
// plain; RMSNorm (x·rsqrt(ms + eps) rounded, times g, as rms_norm.cu); or SwiGLU of [gate | up]
// (silu(gate) rounded, times up, as swiglu.cu). k % 8 == 0, k ≤ VPT · 8 · blockDim.x. With
// PAIRS each group of 8 elements is stored in the order INT4 nibbles unpack in on the tensor-core
// path: 0, 4, 1, 5, 2, 6, 3, 7. Row r starts at xs + r · (k + XPAD).
// One staged 16-byte vector: `a` (8 inputs) transformed with `b` (the norm weights, or the up
// half for SwiGLU) and `inv` (the row's 1/rms), written at `dst`.
template <typename T, bool PAIRS>
__device__ __forceinline__ void stage_vector(const uint4& a, const uint4& b, float inv, int mode, T* dst) {
    if (mode == IN_PLAIN && !PAIRS) {
        *reinterpret_cast<uint4*>(dst) = a;
        return;
    }
    float fa[8], fb[8], o[8];
    load8(reinterpret_cast<const T*>(&a), fa);
    load8(reinterpret_cast<const T*>(&b), fb);
#pragma unroll
    for (int j = 0; j < 8; ++j)
        o[j] = mode == IN_PLAIN     ? fa[j]
               : mode == IN_RMSNORM ? fb[j] * round_to<T>(fa[j] * inv)
                                    : round_to<T>(fa[j] / (1.f + __expf(-fa[j]))) * fb[j];
    if (PAIRS) {
        float p[8] = {o[0], o[4], o[1], o[5], o[2], o[6], o[3], o[7]};
        store8(dst, p);
    } else {
        store8(dst, o);
    }
}

// One row: each thread holds its vectors in registers, so the norm takes no second pass. Also
// the transform of one row into global memory (transform_rows). With CG, x is read through L2
// only: the persistent layers kernel reads rows other blocks of the same grid wrote.
template <typename T, bool PAIRS = false, bool CG = false>
__device__ void stage_row(const T* x, const T* g, float eps, int mode, int k, T* xs) {
    const int nv = k / 8;
    const uint4* src = reinterpret_cast<const uint4*>(x);
    uint4 a[VPT], b[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        int v = threadIdx.x + i * blockDim.x;
        if (v < nv) {
            a[i] = CG ? __ldcg(src + v) : src[v];
            if (mode == IN_SWIGLU) b[i] = CG ? __ldcg(src + nv + v) : src[nv + v];
            else if (mode == IN_RMSNORM) b[i] = reinterpret_cast<const uint4*>(g)[v];
        }
    }
    float inv = 1.f;
    if (mode == IN_RMSNORM) {
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
            if (threadIdx.x + i * blockDim.x < nv) {
                float f[8];
                load8(reinterpret_cast<const T*>(&a[i]), f);
#pragma unroll
                for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
            }
        }
        inv = rsqrtf(block_sum(ss) / k + eps);
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        int v = threadIdx.x + i * blockDim.x;
        if (v >= nv) continue;
        stage_vector<T, PAIRS>(a[i], b[i], inv, mode, xs + (size_t)v * 8);
    }
    __syncthreads();
}

// stage_row for several rows: one row per group of warps at a time (the block's warps split
// into the power of two of groups at or above the rows, up to one warp a row, so that up to 8
// rows take one round), each group walking its row in batches of VPT vectors per thread.
// Staged one after another, every row cost a memory round trip and a block reduction: about
// 2 µs per row and GEMV, a verify step's main cost. (H200, INT4 verify steps of 6-7 rows: 1.35
// and 1.38× a one-row step in two rounds of 4 groups, 1.31 and 1.34× in one round.)
template <typename T, bool PAIRS = false>
__device__ void stage_rows(const T* x, const T* g, float eps, int mode, int m, int k, T* xs) {
    __shared__ float sums[32];
    const int nv = k / 8;
    const int warps = blockDim.x / 32;
    int groups = 1;
    while (groups < m && groups * 2 <= warps) groups *= 2;
    const int gw = warps / groups, gt = gw * 32;
    const int group = threadIdx.x / gt, t = threadIdx.x % gt;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint4* g4 = reinterpret_cast<const uint4*>(g);
    // Every thread runs the same rounds (the reduction synchronises the block).
    for (int r0 = 0; r0 < m; r0 += groups) {
        const int r = r0 + group;
        const bool active = r < m;
        const uint4* src =
            reinterpret_cast<const uint4*>(x + (size_t)(active ? r : 0) * (mode == IN_SWIGLU ? 2 * k : k));
        float inv = 1.f;
        if (mode == IN_RMSNORM) {
            float ss = 0.f;
            for (int v0 = 0; v0 < nv; v0 += VPT * gt) {
                uint4 a[VPT];
#pragma unroll
                for (int i = 0; i < VPT; ++i) {
                    int v = v0 + t + i * gt;
                    if (active && v < nv) a[i] = src[v];
                }
#pragma unroll
                for (int i = 0; i < VPT; ++i) {
                    int v = v0 + t + i * gt;
                    if (active && v < nv) {
                        float f[8];
                        load8(reinterpret_cast<const T*>(&a[i]), f);
#pragma unroll
                        for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
                    }
                }
            }
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
            if (lane == 0) sums[warp] = ss;
            __syncthreads();
            float total = 0.f;
            for (int w = group * gw; w < (group + 1) * gw; ++w) total += sums[w];
            inv = rsqrtf(total / k + eps);
            __syncthreads();  // sums is written again next round
        }
        if (!active) continue;
        for (int v0 = 0; v0 < nv; v0 += VPT * gt) {
            uint4 a[VPT], b[VPT];
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
                int v = v0 + t + i * gt;
                if (v < nv) {
                    a[i] = src[v];
                    if (mode == IN_SWIGLU) b[i] = src[nv + v];
                    else if (mode == IN_RMSNORM) b[i] = g4[v];
                }
            }
#pragma unroll
            for (int i = 0; i < VPT; ++i) {
                int v = v0 + t + i * gt;
                if (v >= nv) continue;
                stage_vector<T, PAIRS>(a[i], b[i], inv, mode, xs + (size_t)(r * (nv + 1) + v) * 8);
            }
        }
    }
    __syncthreads();
}

// The GEMV epilogue for input row r, output `row` of n, given its sum v: INT8's per-row scale,
// then T (optionally added to `residual` in place, as `x + y` rounds), or f32 rounded through T.
template <typename T, int FMT>
__device__ __forceinline__ void store_output(float v, int r, int row, int n, const float* int8_absmax,
                                             T* out, float* out_f32, const T* residual) {
    if (FMT == F_INT8) v = v * int8_absmax[row] * (1.f / 127.f);
    size_t at = (size_t)r * n + row;
    if (out_f32 != nullptr) {
        out_f32[at] = round_to<T>(v);
    } else if (residual != nullptr) {
        out[at] = from_f32<T>(to_f32(residual[at]) + round_to<T>(v));
    } else {
        out[at] = from_f32<T>(v);
    }
}

template <typename T> struct Nibbles;
template <> struct Nibbles<__nv_bfloat16> {
    // Bits 0–3 and 16–19 of u as a bf16 pair: 128 + nibble (exact), minus 136.
    static __device__ __forceinline__ uint32_t pair(uint32_t u) {
        uint32_t v = (u & 0x000F000Fu) | 0x43004300u;
        __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), __floats2bfloat162_rn(136.f, 136.f));
        return *reinterpret_cast<uint32_t*>(&r);
    }
};
template <> struct Nibbles<__half> {
    // 1024 + nibble (exact), minus 1032.
    static __device__ __forceinline__ uint32_t pair(uint32_t u) {
        uint32_t v = (u & 0x000F000Fu) | 0x64006400u;
        __half2 r = __hsub2(*reinterpret_cast<__half2*>(&v), __floats2half2_rn(1032.f, 1032.f));
        return *reinterpret_cast<uint32_t*>(&r);
    }
};

// INT8 codes (+ 128) in bytes j and j + 1 of u as a pair of T, exact: 2²³ + byte as a float's
// bits, minus 2²³ + 128.
template <typename T>
__device__ __forceinline__ uint32_t int8_pair(uint32_t u, int j) {
    float lo = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540 + j)) - 8388736.f;
    float hi = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541 + j)) - 8388736.f;
    return Mma<T>::pack(lo, hi);
}

// Bytes of one warp tile in shared memory: 8 rows × 512, and for INT4 the tile's 8 × 8 scales.
template <int FMT> constexpr int tc_tile_bytes() { return 8 * 512 + (FMT == F_INT4 ? 256 : 0); }
